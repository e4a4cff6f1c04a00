"""torchvision's ImageNet ResNets with input normalisation and a head/tail split.

A subclass of ``torchvision.models.ResNet``, so its state-dict keys are torchvision's own
(``conv1``, ``bn1``, ``layer1`` ... ``fc``) and torchvision state dicts load with
``strict=True``; the ``normalize`` buffers are not persistent and add no keys.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from afan import Normalize
from afan.input_norm import IMAGENET_MEAN, IMAGENET_STD

from .split import SplitModel, Stage

LAYOUTS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
ARCHS = tuple(LAYOUTS)


class TorchvisionResNet(SplitModel, ResNet):
    classifier_key = "fc.weight"

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, **kw):
        block, layers = LAYOUTS[arch]
        super().__init__(block, layers, num_classes=num_classes, **kw)
        self.arch = arch
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.split_points = ("layer1", "layer2", "layer3", "layer4")

    def stages(self) -> list[Stage]:
        # The order of torchvision's ResNet._forward_impl.
        return [
            ("normalize", self.normalize),
            ("conv1", self.conv1),
            ("bn1", self.bn1),
            ("relu", self.relu),
            ("maxpool", self.maxpool),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", self.layer4),
            ("avgpool", self.avgpool),
            ("flatten", lambda h: torch.flatten(h, 1)),
            ("fc", self.fc),
        ]
