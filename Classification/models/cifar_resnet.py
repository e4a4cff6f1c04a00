"""ResNet-s for 32x32 CIFAR images (He et al. 2016, section 4.2), the A-FAN release's model.

Three stages of 16/32/64 channels with ``n = (depth - 2) / 6`` basic blocks each, and
parameter-free "option A" shortcuts (stride-2 subsampling plus zero channels) where the
shape changes; ResNet-56s has about 0.85M parameters.

State-dict keys: ``stem.0.weight`` (conv), ``stem.1.*`` (BN),
``layer{1,2,3}.{i}.conv1.weight``, ``.bn1.*``, ``.conv2.weight``, ``.bn2.*``,
``fc.weight``, ``fc.bias``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from afan import Normalize
from afan.input_norm import CIFAR10_MEAN, CIFAR10_STD

from .split import SplitModel, Stage

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
ARCHS = tuple(DEPTHS)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        # Option A: subsample, then add the missing channels as zeros split evenly before
        # and after the existing ones, so the shortcut has no parameters.
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(SplitModel, nn.Module):
    classifier_key = "fc.weight"

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        blocks = (DEPTHS[arch] - 2) // 6
        self.arch = arch
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.split_points = ("stem", "layer1", "layer2", "layer3")
        # He-normal initialisation of convolutions and classifier, as in the release.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def stages(self) -> list[Stage]:
        return [
            ("normalize", self.normalize),
            ("stem", self.stem),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("pool", self.pool),
            ("flatten", lambda h: torch.flatten(h, 1)),
            ("fc", self.fc),
        ]
