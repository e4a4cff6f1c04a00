"""A three-block CNN for CPU runs on the built-in Shapes data and for quick experiments.

Each block is conv 3x3 - BN - ReLU - max-pool (32, 64, 128 channels), then global average
pooling and a linear classifier: about 0.1M parameters, a few seconds per Shapes epoch on
two CPU cores, where the deeper ResNet-s learn far more slowly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from afan import Normalize

from .split import SplitModel, Stage

ARCHS = ("smallcnn",)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(SplitModel, nn.Module):
    classifier_key = "fc.weight"

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25)):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.block1, self.block2, self.block3 = _block(3, 32), _block(32, 64), _block(64, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        self.split_points = ("block1", "block2", "block3")

    def stages(self) -> list[Stage]:
        return [
            ("normalize", self.normalize),
            ("block1", self.block1),
            ("block2", self.block2),
            ("block3", self.block3),
            ("pool", self.pool),
            ("flatten", lambda h: torch.flatten(h, 1)),
            ("fc", self.fc),
        ]
