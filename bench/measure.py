"""Time the modes of one case interleaved, each mode in a process of its own kept alive
between its visits.

One process per mode keeps the memory figures apart (CUDA's peak counter; on the CPU, the
resident memory an allocator keeps after a mode would count for the next) and lets no mode
inherit another's caches. The processes are built and warmed up one after the other, then
take turns as ``bench.rounds.schedule`` orders: only the process being timed runs, the others
wait on their pipe, so the modes of a round share the machine's conditions. The ``passes``
visit (the passes an A-FAN step needs, timed one after the other as one block, the way the
step runs them) runs in the ``afan`` process, on that process's model and batch.

Each visit times one step (CUDA synchronised before and after). Peak memory is what the steps
add on top of the model and batch: CUDA's ``max_memory_allocated`` over every step, or on the
CPU the growth of the resident set size, sampled every millisecond by a thread during the
warm-up steps (during the first timed step where there is no warm-up): the resident set grows
while the allocator first takes its memory, and a sampling thread in the timed steps would
slow them against the passes (Linux ``/proc``; elsewhere it is reported as missing). The CPU
figure includes the allocator's caches and the gradients, so it is coarser than CUDA's.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from multiprocessing import get_context
from typing import Callable, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from afan_harness.runtime import autocast, resolve_precision, select_device
from bench.rounds import PASSES, schedule, summarise

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PROFILE_TOP = 5  # operators listed where the step exceeds its passes
PROFILE_ROUNDS = 3  # profiled steps and passes, alternated: one of each is mostly noise


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return None


def _cpu_times(stat_text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks of all cores from the text of ``/proc/stat``: user, nice,
    system, idle, iowait, irq, softirq and steal (the guest columns are counted in user and
    nice already); idle and iowait count as not busy."""
    values = [int(v) for v in stat_text.splitlines()[0].split()[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def busy_cores(before: str, after: str, cores: int) -> float:
    """How many of ``cores`` were busy between two readings of ``/proc/stat``."""
    (busy0, total0), (busy1, total1) = _cpu_times(before), _cpu_times(after)
    return cores * (busy1 - busy0) / max(total1 - total0, 1)


def free_threads(default: int, seconds: float = 1.0) -> tuple[int, Optional[float]]:
    """Intra-op threads for the timed processes on the CPU: ``default``, but no more than the
    cores other work leaves free over the next ``seconds`` (Linux ``/proc/stat``), so that no
    thread of a step waits for a core another program holds (two threads that wait on each
    other make the ratios follow the other program's load); also the busy cores seen (None
    where they cannot be read)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/stat") as stat:
            before = stat.read()
        time.sleep(seconds)
        with open("/proc/stat") as stat:
            after = stat.read()
    except OSError:
        return default, None
    busy = busy_cores(before, after, os.cpu_count() or cores)
    return max(1, min(default, round(cores - busy))), busy


class _PeakRss:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.peak = _rss()
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


class _PeakMemory:
    """The most memory the watched steps added over what was allocated before the first one."""

    def __init__(self, device):
        self.device, self.added = device, None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.start = _rss()

    @contextlib.contextmanager
    def watch(self, rss: bool):
        """CUDA's counter always (it costs the step nothing); the resident set only if ``rss``."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.start is None or not rss:
            yield
            return
        else:
            with _PeakRss() as rss:
                yield
            peak = rss.peak
        self.added = max(self.added or 0, peak - self.start)


class Session:
    """One mode of a case (``builder(mode, device, overrides)``, see ``bench.cases``), built and
    warmed up in this process: times its training step, or the passes it needs, when asked."""

    def __init__(self, builder: Callable, mode: str, device_name: str, overrides: Sequence[str], warmup: int,
                 precision: str = "fp32"):
        torch.manual_seed(0)
        self.device = select_device(device_name)
        self.precision = resolve_precision(precision, self.device)
        self.case = builder(mode, self.device, list(overrides))
        # Memory is taken from before the first step: the allocator keeps what a step freed,
        # so after warm-up the resident set would no longer grow.
        self.memory = _PeakMemory(self.device)
        for _ in range(warmup):
            self._step(rss=True)
        if warmup and self.case.passes:
            self.passes()  # the first call of a new shape pays for its kernels and buffers

    @property
    def info(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "description": self.case.description,
                "passes": {name: count for name, (_, count) in self.case.passes.items()}}

    def _timed(self, fn) -> float:
        self.case.model.zero_grad(set_to_none=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        tic = time.perf_counter()
        with autocast(self.precision, self.device):
            fn()
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tic

    def _step(self, rss: bool) -> float:
        with self.memory.watch(rss):
            return self._timed(self.case.step)

    def step(self) -> float:
        """Seconds of one training step. On the CPU the resident set is sampled in the warm-up
        steps, when the allocator takes its memory, and not in timed steps, which the sampling
        thread would slow (the passes run unsampled), unless there was no warm-up."""
        return self._step(rss=self.memory.added is None)

    def _run_passes(self):
        for fn, count in self.case.passes.values():
            for _ in range(count):
                fn()

    def passes(self) -> float:
        """Seconds of the passes one step needs, run back to back as the step runs them."""
        return self._timed(self._run_passes)

    def peak(self) -> Optional[int]:
        """Bytes the steps so far added at most (None where it cannot be read)."""
        return self.memory.added

    def profile(self) -> list[tuple[str, float, int]]:
        """Where the step spends more than its passes: ``(operator, ms, calls)`` per step of the
        largest differences in profiled self time (device time on CUDA), step minus passes,
        over ``PROFILE_ROUNDS`` of each, alternated as the rounds are."""
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        totals = {self.case.step: {}, self._run_passes: {}}
        for _ in range(PROFILE_ROUNDS):
            for fn, total in totals.items():
                with profile(activities=activities) as prof:
                    self._timed(fn)
                for e in prof.key_averages():
                    us, calls = total.get(e.key, (0.0, 0))
                    total[e.key] = (us + (e.self_device_time_total if cuda else e.self_cpu_time_total), calls + e.count)
        step, passes = totals.values()
        excess = [(name, (us - passes.get(name, (0, 0))[0]) / 1000 / PROFILE_ROUNDS,
                   (calls - passes.get(name, (0, 0))[1]) // PROFILE_ROUNDS) for name, (us, calls) in step.items()]
        excess.sort(key=lambda e: e[1], reverse=True)
        return [e for e in excess[:PROFILE_TOP] if e[1] > 0]


def _serve(conn, threads: Optional[int], *args) -> None:
    """A worker process: a ``Session(*args)``, then its methods run by name as asked."""
    try:
        if threads:
            torch.set_num_threads(threads)
        session = Session(*args)
        conn.send(("ok", session.info))
        while (command := conn.recv()) != "stop":
            conn.send(("ok", getattr(session, command)()))
    except Exception:  # the parent raises it, with this traceback
        conn.send(("error", traceback.format_exc()))


class Worker:
    """A ``Session`` in a spawned process of its own, alive until ``close``."""

    def __init__(self, builder: Callable, mode: str, device_name: str, overrides: Sequence[str], warmup: int,
                 precision: str, threads: Optional[int] = None):
        context = get_context("spawn")
        self.mode = mode
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, daemon=True,
                                        args=(child, threads, builder, mode, device_name, list(overrides), warmup,
                                              precision))
        self._process.start()
        child.close()
        self.info = self._answer()

    def _answer(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"bench: the {self.mode} process died (exit code {self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"bench: the {self.mode} process failed:\n{value}")
        return value

    def ask(self, command: str):
        self._conn.send(command)
        return self._answer()

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()


def measure_rounds(builder: Callable, modes: Sequence[str], device_name: str, overrides: Sequence[str],
                   warmup: int, rounds: int, precision: str = "fp32", *, reference: str, versus: Optional[str] = None,
                   threads: Optional[int] = None, label: str = "") -> dict:
    """Time ``modes`` of one case in ``rounds`` interleaved rounds (see ``bench.rounds``).

    Returns the timings of every visit (``times[(mode, "step" or "passes")]``, seconds, in visit
    order), each mode's summary, peak added memory in bytes and worker info (device,
    precision, description, the passes with their counts), and for each mode whose step
    exceeds its passes (``Summary.overhead``) the profiler's account of where (``profiles``).
    """
    with contextlib.ExitStack() as stack:
        workers = {}
        for mode in modes:  # one at a time: no build or warm-up competes with another
            workers[mode] = Worker(builder, mode, device_name, overrides, warmup, precision, threads)
            stack.callback(workers[mode].close)
        with_passes = [mode for mode in modes if workers[mode].info["passes"]]
        visits = schedule(modes, with_passes)
        times = {visit: [] for visit in visits}
        for r in range(rounds):
            for mode, kind in visits:
                times[(mode, kind)].append(workers[mode].ask(kind))  # Session.step or Session.passes
            done = ", ".join(f"{mode} {'passes ' if kind == PASSES else ''}{500 * sum(t[-2:]):.0f}"
                             for (mode, kind), t in times.items())
            print(f"{label} round {r + 1}/{rounds} (ms): {done}", file=sys.stderr, flush=True)
        summaries = summarise(times, modes, reference, versus)
        profiles = {mode: workers[mode].ask("profile") for mode in with_passes if summaries[mode].overhead}
        return {"times": times, "summaries": summaries, "profiles": profiles,
                "peaks": {mode: workers[mode].ask("peak") for mode in modes},
                "info": {mode: workers[mode].info for mode in modes}}
