"""Shared fixtures: a tiny CNN split into head and tail, small enough for fast CPU tests."""
import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-BN-ReLU head, then a tail with two BatchNorms and a linear classifier."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tail = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )

    def forward(self, x):
        return self.tail(self.head(x))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
