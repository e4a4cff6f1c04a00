"""An endless, resumable shuffle for iteration-based training (detection, segmentation).

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, and the sampler
can start at any position of that stream, so a run resumed at iteration ``i`` sees exactly
the samples an uninterrupted run would have seen, without reading the skipped ones.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of ``size`` samples, epoch after epoch, starting after ``start`` samples.

    ``start`` counts samples already consumed over all epochs (iterations x batch size).
    The stream is endless: the training loop decides when to stop.
    """

    def __init__(self, size: int, seed: int, *, shuffle: bool = True, start: int = 0):
        if size < 1:
            raise ValueError(f"ResumableSampler needs at least one sample, got size={size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.seed, self.shuffle, self.start = size, seed, shuffle, start

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            yield from self.epoch_order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0
