"""Data-loading pieces every task shares: the data error, image reading, seeded loaders."""
from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from torch.utils.data import DataLoader, Dataset

from afan_harness.distributed import Process, local_batch_size
from afan_harness.sampler import ResumableSampler


class DataError(RuntimeError):
    """A data set that cannot be used; the message names the problem and how to fix it."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises DataError naming it.

    Module level (not a closure) so that DataLoader worker processes can pickle it.
    """
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            return image.convert("RGB")  # convert() decodes the whole file: truncation shows here
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {path} ({error}); delete or replace this file") from error


def check_images(paths, what: str) -> None:
    """Open every file in ``paths`` as an image and check its structure (PIL's ``verify``: a
    JPEG's segments up to its end, a PNG's chunks and checksums), so that a missing, garbage
    or cut-off file stops the run before anything is written or trained, with a DataError
    naming it. (Damage that only decoding finds still shows in ``load_rgb``, when it is read.)"""
    paths = list(paths)
    for path in tqdm(paths, desc=f"checking {what}", disable=None if len(paths) > 2000 else True, leave=False):
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error}); delete or replace this file") from error


def seed_worker(worker_id: int) -> None:
    # torch gives each worker its own seed (from the loader's generator); numpy and random
    # would otherwise repeat the parent's state in every worker.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    seed: int,
    sampler=None,
    drop_last: Optional[bool] = None,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A DataLoader whose order and augmentations are reproducible from ``seed``.

    Training shuffles with a seeded generator unless a ``sampler`` (e.g. DistributedSampler
    or ``afan_harness.sampler.ResumableSampler``) decides the order.  ``drop_last=None`` drops the
    last partial batch when training (a batch of one or two images gives BatchNorm useless
    statistics), unless that would leave no batch at all.
    """
    if drop_last is None:
        drop_last = train and sampler is None and len(dataset) > batch_size
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        # Workers start anew each epoch and take their seeds from `generator`, so a run
        # that reseeds it per epoch replays the same augmentations after a resume.
        persistent_workers=False,
        worker_init_fn=seed_worker,
        generator=generator,  # also seeds the workers' torch RNG, hence the augmentations
    )


def iteration_batches(dataset: Dataset, batch_size: int, process: Process, *, seed: int, start: int,
                      workers: int, collate_fn: Optional[Callable] = None):
    """Endless training batches of ``batch_size`` (the global batch) from the resumable shuffle
    of ``dataset``, continuing after ``start`` samples consumed (a resumed run passes its
    position, so it sees the batches the uninterrupted run would have seen). Under torchrun
    each process gets its ``batch_size / world_size`` part of every global batch."""
    local_batch = local_batch_size(batch_size, process)
    sampler = ResumableSampler(len(dataset), seed, start=start, rank=process.rank,
                               world_size=process.world_size, local_batch=local_batch)
    # The loader's seed only decides the workers' augmentation streams; it follows the
    # position so that they differ from one epoch (or resume) to the next.
    return iter(make_loader(dataset, local_batch, train=True, workers=workers, seed=seed * 1_000_003 + start,
                            sampler=sampler, drop_last=True, collate_fn=collate_fn))
