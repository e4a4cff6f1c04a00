"""Input normalisation as a layer, so models take images in [0, 1].

Keeping the mean/std subtraction inside the model lets checkpoints, attacks and the
data pipeline all work in pixel space. (The original release used advertorch for this
layer; advertorch no longer imports on current PyTorch.)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of an ``(N, C, H, W)`` batch.

    ``mean`` and ``std`` are 1-D buffers of length ``C`` (the layout of the original
    release's checkpoints). They are left out of the state dict unless
    ``persistent=True``, so a model stays loadable from checkpoints without them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = False):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"Normalize: mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t, persistent=persistent)
        self.register_buffer("std", std_t, persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.numel():
            raise ValueError(
                f"Normalize expects (N, {self.mean.numel()}, H, W) images, got {tuple(x.shape)}"
            )
        shape = (1, -1, 1, 1)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
