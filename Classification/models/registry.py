"""Model names, input normalisations and ``create_model``."""
from __future__ import annotations

import numbers

from torch import nn

from afan_harness.settings import unknown_name
from afan.input_norm import IMAGENET_MEAN, IMAGENET_STD

from . import cifar_resnet, efficientnet, library, small_cnn, torchvision_resnet

_CLASSES = {
    **{name: cifar_resnet.CifarResNet for name in cifar_resnet.ARCHS},
    **{name: torchvision_resnet.TorchvisionResNet for name in torchvision_resnet.ARCHS},
    **{name: efficientnet.TimmEfficientNet for name in efficientnet.ARCHS},
    **{name: small_cnn.SmallCNN for name in small_cnn.ARCHS},
}
MODEL_NAMES = tuple(_CLASSES)

# "auto" keeps each model's own convention (see create_model); the others are fixed
# (mean, std) pairs.
INPUT_NORMS = {"auto": None, "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}


def model_class(name: str) -> type:
    """The class that builds ``name``; ValueError listing the valid names otherwise."""
    if name in _CLASSES:
        return _CLASSES[name]
    if efficientnet.is_efficientnet(str(name)):  # with a weights tag, checked when building
        return efficientnet.TimmEfficientNet
    if library.is_library_name(name):  # tv:NAME / timm:NAME, checked when building
        return library.LibraryClassifier
    note = " A weights tag follows a dot, e.g. 'tf_efficientnet_b0.ap_in1k' (AdvProp)." \
        if str(name).startswith("tf_efficientnet") else ""
    raise unknown_name("model", name, [*MODEL_NAMES, "or any torchvision or timm classifier as tv:NAME / timm:NAME "
                                                     "(e.g. tv:resnet50, timm:convnext_atto)"], note)


def create_model(name: str, num_classes: int, input_norm: str = "auto", **kw) -> nn.Module:
    """Build model ``name`` (random weights) for ``num_classes`` classes.

    It takes images in [0, 1] and normalises them inside. ``input_norm="auto"``: CIFAR-10
    statistics for ResNet-s, ImageNet's for torchvision ResNets, those of the weights tag for
    EfficientNets (0.5/0.5 for ``.ap_in1k``); ``"imagenet"`` or ``"half"`` (mean = std = 0.5)
    for any model. ``mean=``/``std=`` win over both; other keywords go to torchvision's or
    timm's constructor.
    """
    cls = model_class(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    if INPUT_NORMS[input_norm] is not None:
        mean, std = INPUT_NORMS[input_norm]
        kw = {"mean": mean, "std": std, **kw}
    return cls(name, int(num_classes), **kw)
