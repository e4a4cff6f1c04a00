"""An endless, resumable shuffle for iteration-based training (detection, segmentation).

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, and the sampler
can start at any position of that stream, so a run resumed at iteration ``i`` sees exactly
the samples an uninterrupted run would have seen, without reading the skipped ones. Under
``torchrun`` the stream is cut into global batches and each process takes its own part of
every one, so the processes together see what one process would.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of ``size`` samples, epoch after epoch, starting after ``start`` samples.

    ``start`` counts samples already consumed over all epochs (iterations x global batch
    size). The stream is endless: the training loop decides when to stop. With
    ``world_size > 1`` this process yields samples ``rank * local_batch`` to
    ``(rank + 1) * local_batch`` of every global batch of ``world_size * local_batch``.
    """

    def __init__(self, size: int, seed: int, *, shuffle: bool = True, start: int = 0, rank: int = 0,
                 world_size: int = 1, local_batch: int = 1):
        if size < 1:
            raise ValueError(f"ResumableSampler needs at least one sample, got size={size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if not 0 <= rank < world_size or local_batch < 1:
            raise ValueError(f"need 0 <= rank < world_size and local_batch >= 1, got rank={rank}, "
                             f"world_size={world_size}, local_batch={local_batch}")
        self.size, self.seed, self.shuffle, self.start = size, seed, shuffle, start
        self.rank, self.world_size, self.local_batch = rank, world_size, local_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def _stream(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            yield from self.epoch_order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        if self.world_size == 1:
            yield from self._stream()
            return
        stream = self._stream()
        mine = range(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        while True:
            batch = [next(stream) for _ in range(self.world_size * self.local_batch)]
            yield from (batch[i] for i in mine)
