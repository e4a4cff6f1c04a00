"""DeepLabv3+ with the module names of DeepLabV3Plus-Pytorch, cut where A-FAN perturbs it.

The layout (``backbone.*`` with torchvision's ResNet names, ``classifier.project``,
``classifier.aspp.convs.{0..4}``, ``classifier.aspp.project``, ``classifier.classifier``) is
the one DeepLabV3Plus-Pytorch checkpoints use, so its ``{'model_state': ...}`` files load with
``strict=True`` and predict the same. The ImageNet normalisation lives inside the model as
non-persistent buffers: images are in [0, 1] and the state dict holds no extra keys.

The backbone runs as an ordered list of named blocks. ``head(x, at)`` runs the blocks up to
split point ``at`` and also returns the low-level feature the decoder reads (ResNet
``layer1``, stride 4); ``encode(h, at)`` runs the rest of the backbone and the ASPP;
``decode`` is ``fuse`` (the projected low-level feature concatenated with the upsampled ASPP
output, 304 channels: the release's ``concat`` feature) then ``classify`` (the decoder's
convolutions, logits upsampled to image size). ``forward(x)`` is exactly
``decode(encode(*head(x, at)), ...)`` for any ``at``.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet50, resnet101
from torchvision.models.segmentation.deeplabv3 import ASPP

import afan
from afan_harness.settings import unknown_name
from afan.input_norm import IMAGENET_MEAN, IMAGENET_STD, Normalize

SPLIT_POINTS = ("layer1", "layer2", "layer3", "layer4")
# Where SD perturbs the decoder: the ASPP output (the VOC release) or the concatenated
# feature ``fuse`` returns (the Cityscapes release).
SD_LAYERS = ("aspp", "concat")
OUTPUT_STRIDES = (8, 16)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # DeepLabv3+'s rates for each output stride
ASPP_DROPOUT = 0.1  # DeepLabV3Plus-Pytorch's (torchvision's ASPP defaults to 0.5)
LOW_LEVEL_OUT = 48  # channels of the decoder's low-level projection
DECODER_IN = LOW_LEVEL_OUT + 256

# MobileNetV2 (t, c, n, s) stages, as in the paper and torchvision.
_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


class Features(NamedTuple):
    """The clean head output: the feature at the split point and the decoder's low-level
    input (the same tensor when the split point is the low-level block)."""

    feature: Tensor
    low_level: Tensor


def _resnet_backbone(build, output_stride: int) -> tuple[nn.Module, list[str], dict, str, int, int]:
    # Output stride 16 dilates layer4, 8 dilates layer3 and layer4 (torchvision's option).
    dilate = [False, output_stride == 8, True]
    resnet = build(weights=None, replace_stride_with_dilation=dilate)
    blocks = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    backbone = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in blocks))
    return backbone, blocks, {p: p for p in SPLIT_POINTS}, "layer1", 256, 2048


class _PaddedInvertedResidual(nn.Module):
    """A MobileNetV2 block that zero-pads its *input* for the depth-wise convolution, as
    DeepLabV3Plus-Pytorch's does (its convolutions have no padding of their own). This is not
    the same as torchvision's padding inside the depth-wise convolution: the padded zeros pass
    the expansion convolution and its BatchNorm first. Kept so its checkpoints predict the same."""

    def __init__(self, block: nn.Module, stride: int, dilation: int):
        super().__init__()
        self.conv = block.conv  # same children, same state-dict keys
        depthwise = self.conv[-3][0]
        depthwise.stride, depthwise.dilation, depthwise.padding = (stride, stride), (dilation, dilation), (0, 0)
        self.use_res_connect = block.use_res_connect
        self.pad = (dilation, dilation, dilation, dilation)  # 3x3 kernel: dilation on each side

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.pad(x, self.pad))
        return x + out if self.use_res_connect else out


def _mobilenet_backbone(output_stride: int) -> tuple[nn.Module, list[str], dict, str, int, int]:
    net = mobilenet_v2(weights=None)
    features = list(net.features)
    features[0][0].padding = (0, 0)  # DeepLabV3Plus-Pytorch's stem convolution has no padding
    # Past the output stride, strides become dilations (first block of a stage keeps the
    # previous dilation), as DeepLabV3Plus-Pytorch builds it.
    stride, dilation, index = 2, 1, 1
    for _, _, repeats, s in _MOBILENET_STAGES:
        previous = dilation
        if stride == output_stride:
            block_stride, dilation = 1, dilation * s
        else:
            block_stride, stride = s, stride * s
        for i in range(repeats):
            features[index] = _PaddedInvertedResidual(features[index], block_stride if i == 0 else 1,
                                                      previous if i == 0 else dilation)
            index += 1
    # Stride 4 (24 channels) ends the low-level part; the final 1x1 (1280) is not used.
    backbone = nn.Module()
    backbone.low_level_features = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(4)))
    backbone.high_level_features = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(4, 18)))
    blocks = [f"low_level_features.{i}" for i in range(4)] + [f"high_level_features.{i}" for i in range(4, 18)]
    # Stage ends at strides 4, 8, 16 and the last block (320 channels).
    split = {"layer1": "low_level_features.3", "layer2": "high_level_features.6",
             "layer3": "high_level_features.13", "layer4": "high_level_features.17"}
    return backbone, blocks, split, "low_level_features.3", 24, 320


BACKBONES = {
    "deeplabv3plus_resnet50": lambda os_: _resnet_backbone(resnet50, os_),
    "deeplabv3plus_resnet101": lambda os_: _resnet_backbone(resnet101, os_),
    "deeplabv3plus_mobilenet": _mobilenet_backbone,
}
MODEL_NAMES = tuple(BACKBONES)


def check_name(name: str) -> str:
    if name not in BACKBONES:
        raise unknown_name("segmentation model", name, MODEL_NAMES)
    return name


class DecoderHead(nn.Module):
    """DeepLabv3+'s ASPP and decoder (DeepLabV3Plus-Pytorch's ``DeepLabHeadV3Plus`` names)."""

    def __init__(self, in_channels: int, low_level_channels: int, num_classes: int, rates):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, LOW_LEVEL_OUT, 1, bias=False),
                                     nn.BatchNorm2d(LOW_LEVEL_OUT), nn.ReLU(inplace=True))
        self.aspp = ASPP(in_channels, rates)
        self.aspp.project[-1].p = ASPP_DROPOUT
        self.classifier = nn.Sequential(nn.Conv2d(DECODER_IN, 256, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def fuse(self, aspp_out: Tensor, low_level: Tensor) -> Tensor:
        """The projected low-level feature and the upsampled ASPP output, concatenated."""
        low = self.project(low_level)
        up = F.interpolate(aspp_out, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, up], dim=1)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ taking [0, 1] images; see the module docstring for the split."""

    split_points = SPLIT_POINTS
    classifier_key = "classifier.classifier.3.weight"

    def __init__(self, arch: str, num_classes: int, output_stride: int = 16):
        super().__init__()
        backbone, blocks, split, low_level, low_channels, high_channels = BACKBONES[arch](output_stride)
        self.arch = arch
        self.num_classes = num_classes
        self.model_kwargs = {"output_stride": output_stride}
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)  # not persistent: no state-dict keys
        self.backbone = backbone
        self.classifier = DecoderHead(high_channels, low_channels, num_classes, ASPP_RATES[output_stride])
        # Names, not modules: convert_aux_bn may replace a block (ResNet's bn1) later.
        self._blocks = blocks
        self._split = split
        self._low_level = blocks.index(low_level)

    def _check_split(self, at: str) -> int:
        if at not in self._split:
            raise ValueError(f"{self.arch}: unknown split point {at!r}; valid split points: {', '.join(SPLIT_POINTS)}")
        return self._blocks.index(self._split[at])

    def _run(self, x: Tensor, start: int, stop: int, low_level=None):
        for index in range(start, stop):
            x = self.backbone.get_submodule(self._blocks[index])(x)
            if index == self._low_level:
                low_level = x
        return x, low_level

    def head(self, images: Tensor, at: str) -> Features:
        """Normalisation and the backbone up to and including split point ``at``."""
        stop = self._check_split(at) + 1
        feature, low_level = self._run(self.normalize(images), 0, stop)
        return Features(feature, low_level)

    def encode(self, feature: Tensor, at: str) -> Tensor:
        """The backbone after ``at`` and the ASPP: the feature SD perturbs."""
        out, _ = self._run(feature, self._check_split(at) + 1, len(self._blocks))
        return self.classifier.aspp(out)

    def fuse(self, aspp_out: Tensor, low_level: Tensor) -> Tensor:
        """The decoder's concatenated feature (``DECODER_IN`` channels at stride 4)."""
        return self.classifier.fuse(aspp_out, low_level)

    def classify(self, fused: Tensor, size) -> Tensor:
        """Logits from the concatenated feature, bilinearly upsampled to ``size`` (the
        image's height, width)."""
        logits = self.classifier.classifier(fused)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def decode(self, aspp_out: Tensor, low_level: Tensor, size) -> Tensor:
        """Decoder logits at ``size``: ``classify(fuse(aspp_out, low_level), size)``."""
        return self.classify(self.fuse(aspp_out, low_level), size)

    def tail(self, feature: Tensor, at: str, low_level: Tensor, size) -> Tensor:
        """Logits from a (possibly perturbed) feature at ``at``, the decoder reading the
        ``low_level`` feature it is given. As released, that is the clean one even when ``at``
        is the low-level block itself (``layer1``): the perturbation then reaches the decoder
        only through the rest of the backbone and the ASPP."""
        return self.decode(self.encode(feature, at), low_level, size)

    def convert_aux_bn(self, at: str) -> None:
        """Auxiliary BN (``afan.convert_aux_bn``) in the layers A-FAN's adversarial passes
        perturb: the backbone blocks after ``at``, the ASPP and the decoder's convolutions.
        The low-level projection keeps plain BN: every pass gives it the clean feature."""
        self._check_split(at)
        later = afan.norm.registered_after(self.backbone, self._split[at])
        if any(isinstance(self.backbone.get_submodule(name), nn.BatchNorm2d) for name in later):  # none after layer4
            afan.convert_aux_bn(self.backbone, after=self._split[at])
        afan.convert_aux_bn(self.classifier.aspp)
        afan.convert_aux_bn(self.classifier.classifier)

    def set_backbone_bn_momentum(self, momentum: float) -> None:
        """The running-statistics momentum of every BatchNorm in the backbone (auxiliary
        branches included); the decoder's keep PyTorch's 0.1. The release sets 0.01
        (DeepLabV3Plus-Pytorch's ``set_bn_momentum(model.backbone, 0.01)``)."""
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum

    def parts_to_compile(self) -> list[nn.Module]:
        """The backbone blocks, the ASPP and the decoder's layers, which head, encode and
        decode call (for ``afan_harness.runtime.compile_parts``)."""
        head = self.classifier
        return [self.backbone.get_submodule(b) for b in self._blocks] + [head.aspp, head.project, head.classifier]

    def forward(self, images: Tensor) -> Tensor:
        out, low_level = self._run(self.normalize(images), 0, len(self._blocks))
        return self.decode(self.classifier.aspp(out), low_level, images.shape[-2:])


def create_model(name: str, num_classes: int, output_stride: int = 16) -> DeepLabV3Plus:
    """DeepLabv3+ ``name`` with random weights (nothing is downloaded); ``num_classes``
    includes the background (VOC: 21, Cityscapes: 19)."""
    check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    return DeepLabV3Plus(name, int(num_classes), int(output_stride))
