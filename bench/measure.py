"""Time one (task, mode) case and take its peak memory, in a process of its own.

A fresh process per case keeps the measurements apart: CUDA's peak counter and, on the
CPU, the resident memory the allocator keeps after a case would otherwise carry over.
Step time is the median of ``repeats`` steps after ``warmup`` steps (CUDA synchronised
around each). Peak memory is what the steps (warm-up included) add on top of the model and
batch: CUDA's ``max_memory_allocated``, or on the CPU the growth of the resident set size,
sampled every millisecond (Linux ``/proc``; elsewhere it is reported as missing). The CPU
figure includes the allocator's caches and the gradients, so it is coarser than CUDA's.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from afan.runtime import autocast, resolve_precision, select_device
from bench.cases import BUILDERS

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return None


class _PeakRss:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def added(self) -> int | None:
        return None if self.start is None else self.peak - self.start


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tic


def measure(task: str, mode: str, device_name: str, overrides: list[str], warmup: int, repeats: int,
            precision: str = "fp32") -> dict:
    """Median step time (s) and peak added memory (bytes) of one case, and for ``afan`` the
    median time of each needed pass with its count per step; forward passes in ``precision``
    (``auto``: as the trainers choose)."""
    torch.manual_seed(0)
    device = select_device(device_name)
    precision = resolve_precision(precision, device)
    case = BUILDERS[task](mode, device, overrides)
    model = case.model

    def in_precision(fn):
        def run():
            with autocast(precision, device):
                return fn()
        return run

    def step():
        model.zero_grad(set_to_none=True)
        in_precision(case.step)()

    # Memory is taken from before the first step: the allocator keeps what a step freed, so
    # after warm-up the resident set would no longer grow.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        times = [_timed(step, device) for _ in range(warmup + repeats)][warmup:]
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with _PeakRss() as rss:
            times = [_timed(step, device) for _ in range(warmup + repeats)][warmup:]
        peak = rss.added
    passes = {}
    for name, (fn, count) in case.passes.items():
        fn = in_precision(fn)
        fn()  # warm-up: the first call of a new shape pays for its kernels and buffers
        model.zero_grad(set_to_none=True)
        passes[name] = {"seconds": statistics.median(_timed(fn, device) for _ in range(repeats)), "count": count}
        model.zero_grad(set_to_none=True)
    return {"task": task, "mode": mode, "device": str(device), "precision": precision, "description": case.description,
            "step_s": statistics.median(times), "peak_bytes": peak, "passes": passes}


def measure_apart(*args) -> dict:
    """``measure`` in a fresh spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()
