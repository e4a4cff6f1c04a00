"""Model names and ``create_model``."""
from __future__ import annotations

import difflib
import numbers

from torch import nn

from . import cifar_resnet, efficientnet, small_cnn, torchvision_resnet

_CLASSES = {
    **{name: cifar_resnet.CifarResNet for name in cifar_resnet.ARCHS},
    **{name: torchvision_resnet.TorchvisionResNet for name in torchvision_resnet.ARCHS},
    **{name: efficientnet.TimmEfficientNet for name in efficientnet.ARCHS},
    **{name: small_cnn.SmallCNN for name in small_cnn.ARCHS},
}
MODEL_NAMES = tuple(_CLASSES)


def model_class(name: str) -> type:
    """The class that builds ``name``; ValueError listing the valid names otherwise."""
    if name not in _CLASSES:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(MODEL_NAMES)}")
    return _CLASSES[name]


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` (random weights) for ``num_classes`` classes.

    It takes images in [0, 1]; ``mean=``/``std=`` override the normalisation inside the
    model, other keywords go to torchvision's or timm's constructor.
    """
    cls = model_class(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return cls(name, int(num_classes), **kw)
