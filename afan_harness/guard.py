"""What every training loop checks between steps: a polite stop asked by a signal, and a
non-finite loss.

SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm pre-emption, torchrun passing on its own stop)
do not kill a run inside :class:`TrainingGuard`: they ask it to stop after the current step,
so the loop can write a checkpoint and raise :class:`StopRequested`, which ``afan_harness.cli``
turns into a message that says how to resume. A second Ctrl-C stops at once. A non-finite
loss either stops the run (:class:`NonFiniteLoss`, the last checkpoint kept) or, with
``on_nonfinite=skip``, skips that step's update and counts it.

Under torchrun every process must take the same decision at the same step, or the others
would wait for it forever in the next collective call, so both are agreed over all processes.
"""
from __future__ import annotations

import signal
import threading
from typing import Mapping, Optional

import torch

from afan_harness import distributed
from afan.passes import loss_scale
from afan_harness.runtime import autocast, optimizer_step

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """A signal stopped the run after a step whose state was saved; ``signum`` is the signal."""

    def __init__(self, signum: int, position: str, checkpoint):
        self.signum, self.position, self.checkpoint = signum, position, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after {position}; "
                         f"the training state is saved in {checkpoint}")


class NonFiniteLoss(FloatingPointError):
    """A step's loss is NaN or infinite and the run is set to stop on it."""


class TrainingGuard:
    """``with TrainingGuard(process, device, on_nonfinite, last_checkpoint) as guard:`` around
    the training loop; each step calls :meth:`accept` between the forward and the update, and
    the loop saves and calls :meth:`stop` when :attr:`stop_requested` is set."""

    def __init__(self, process: distributed.Process, device: torch.device, *, on_nonfinite: str = "stop",
                 last_checkpoint=None, skipped: int = 0):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.process, self.device = process, device
        self.on_nonfinite, self.last_checkpoint = on_nonfinite, last_checkpoint
        self.skipped = skipped  # steps whose update was skipped for a non-finite loss (a resumed run's so far)
        self.signum: Optional[int] = None  # the signal that asked this process to stop
        self.stop_requested = False  # agreed by all processes at the last accept()
        self._previous = {}

    def __enter__(self):
        # Python lets only the main thread install handlers; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.signum = signum
        if self.process.is_main:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving "
                  "the training state (Ctrl-C again to quit at once, without saving)", flush=True)

    def accept(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], where: str) -> bool:
        """True: apply this step's update. False: skip it (non-finite loss, ``on_nonfinite=skip``).
        Raises :class:`NonFiniteLoss` naming ``where`` and the loss ``terms`` otherwise."""
        flags = [0.0 if torch.isfinite(loss).item() else 1.0, 0.0 if self.signum is None else 1.0]
        if self.process.distributed:
            flags = distributed.sum_over_processes(flags, self.device)
        self.stop_requested = flags[1] > 0
        if flags[0] == 0:
            return True
        if self.on_nonfinite == "skip":
            self.skipped += 1
            return False
        values = "; ".join([f"loss {loss.item():.4g}"] + [", ".join(f"{name} {value.item():.4g}"
                                                                     for name, value in terms.items() if name != "loss")])
        kept = f"the last good state is {self.last_checkpoint}; " if self.last_checkpoint else ""
        raise NonFiniteLoss(f"non-finite loss at {where} ({values.rstrip('; ')}); {kept}lower optim.lr, or set "
                            "on_nonfinite=skip to skip such steps and count them")

    def counts(self, always: bool = False) -> dict:
        """``{"skipped_steps": n}`` for logs and summaries when steps may be skipped (``always``:
        for checkpoints, which carry the count over a resume)."""
        return {"skipped_steps": self.skipped} if always or self.on_nonfinite == "skip" else {}

    def stop(self, position: str) -> None:
        """Raise :class:`StopRequested` (call after saving the state at ``position``)."""
        raise StopRequested(self.signum or signal.SIGTERM, position, self.last_checkpoint)


def guarded_step(run_step, batch, guard: TrainingGuard, *, optimizer, scheduler, scaler, precision: str,
                 device: torch.device, where: str):
    """One training step: ``run_step(*batch)`` in the run's precision, the guard's check of its
    loss, the update (unless the step is skipped) and the schedule's step. Returns its result,
    whose ``losses`` (where it has them) name the terms in a non-finite-loss message."""
    # The fp16 loss scale (1.0 without fp16) reaches the passes that take their gradients early
    # (afan.passes).
    with autocast(precision, device), loss_scale(scaler.get_scale()):
        result = run_step(*batch)
    if guard.accept(result.loss, getattr(result, "losses", {}), where):
        optimizer_step(result.loss, optimizer, scaler)
    scheduler.step()
    return result
