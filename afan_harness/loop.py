"""The one training loop of every task, iteration by iteration, in detectron2's plain style.

A task builds its model, optimizer and schedule and hands them over in a :class:`Job` with a
few plain callables: ``step`` (one training step's result), ``step_values`` (what of it is
logged), ``evaluate`` (validation scores). :func:`run_loop` then does, in this order and in
this one place, what every run needs: the run folder (process 0), ``--resume`` from
``last.pth``, the resumable batch stream, DDP, the guarded update (signals, non-finite
losses), the metrics log every ``log_every`` iterations, evaluation and ``best.pth`` every
``eval_every``, ``last.pth`` every ``checkpoint_every`` and at a polite stop. The task then
writes its summary from the :class:`Finished` it gets back.

Classification counts in epochs: its job sets ``epoch_steps``, and logs, evaluates and saves
every epoch; each epoch's batches then start at that epoch's own shuffle (the last partial
batch of an epoch is dropped) and messages name epochs and steps instead of iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import afan
from afan_harness import distributed
from afan_harness.checkpoint import CheckpointError, save_checkpoint
from afan_harness.guard import TrainingGuard, guarded_step
from afan_harness.loading import iteration_batches
from afan_harness.rundir import (LogWindow, RunDir, continue_run, epoch_line, log_line, progress, save_training_state,
                         write_summary)
from afan_harness.runtime import grad_scaler, resolve_precision


@dataclass
class Job:
    """What a task gives :func:`run_loop`."""

    cfg: object  # the task's TrainConfig (out, seed, batch_size, data.workers and the RunSettings)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: torch.utils.data.Dataset
    step: Callable  # step(model, *batch) -> a step result with ``loss``
    to_device: Callable[[tuple], tuple]  # a loaded batch on the run's device
    step_values: Callable[[object, tuple], dict]  # step_values(result, batch): the step's logged numbers
    # evaluate(model, last) -> scores, called on every process; ``last``: the final
    # iteration's evaluation (the task writes its evaluation files then).
    evaluate: Callable[[nn.Module, bool], dict]
    best_key: str  # the score that picks best.pth
    payload: Callable[[nn.Module], dict]  # the task's checkpoint format of a model
    iterations: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0  # 0: no evaluation during training
    epoch_steps: int = 0  # classification: iterations per epoch (see the module's docstring)
    collate_fn: Optional[Callable] = None
    lr_group: int = 0  # the parameter group whose rate is logged

    def where(self, done: int) -> str:
        """Iteration ``done`` (1-based) in messages: ``iteration 7``, or ``epoch 1, step 2 of 3``."""
        if not self.epoch_steps:
            return f"iteration {done}"
        epoch, step = divmod(done - 1, self.epoch_steps)
        return f"epoch {epoch}, step {step + 1} of {self.epoch_steps}"

    def stopped_after(self, done: int) -> str:
        """Where a polite stop left the run: ``iteration 7``, ``epoch 1`` or ``step 2 of 3 in epoch 1``."""
        if not self.epoch_steps:
            return f"iteration {done}"
        epoch, step = divmod(done, self.epoch_steps)
        return f"epoch {epoch - 1}" if step == 0 else f"step {step} of {self.epoch_steps} in epoch {epoch}"


@dataclass
class Finished:
    """What the loop hands back to the task for its summary, on every process."""

    run_dir: Optional[RunDir]  # process 0's; None on the others
    best: float  # the best ``best_key`` score of the evaluations, -1 without any
    # The last iteration's evaluation when this run (not a run it resumed) made one; the same on every process.
    final_scores: Optional[dict]
    counts: dict  # the guard's skipped steps, for the summary
    cfg: object  # the run's settings, for the summary's mode and data

    def mean(self, column: str) -> float:
        """The mean of a logged column (e.g. ``sec_per_iter``) over the rows that have it."""
        values = [row[column] for row in self.run_dir.metrics.rows() if row.get(column) is not None]
        return sum(values) / max(len(values), 1)

    def summary(self, model: str, **fields) -> dict:
        """Write the run's summary (``summary.json`` and the ``SUMMARY`` line): mode, model,
        data, the task's ``fields``, skipped steps and the run folder. Returns it."""
        summary = {"mode": self.cfg.mode, "model": model, "data": self.cfg.data.name, **fields, **self.counts,
                   "out": str(self.run_dir.path)}
        write_summary(self.run_dir, summary)
        return summary

    def final_summary(self, model: str, payload: dict, scores: dict, best_key: str) -> dict:
        """The end of an iteration run (detection, segmentation): ``final.pth`` holding
        ``payload`` and the summary of the final model's ``scores``, the best ``best_key`` of
        the run and the mean seconds per iteration. Empty on processes other than 0."""
        if self.run_dir is None:
            return {}
        save_checkpoint(payload, self.run_dir.file("final.pth"))
        return self.summary(model, iterations=self.cfg.iterations, **scores,
                            **{f"best_{best_key}": max(self.best, scores[best_key])},
                            sec_per_iter=self.mean("sec_per_iter"))


def mode_step(steps: dict[str, Callable], cfg, model, *batch):
    """One training step of ``cfg.mode``: ``steps["base"](model, *batch)``, or
    ``steps[mode](model, *batch, section)`` with the settings section named after the mode
    (``cfg.afan``, ``cfg.advprop``, ...)."""
    if cfg.mode == "base":
        return steps["base"](model, *batch)
    return steps[cfg.mode](model, *batch, getattr(cfg, cfg.mode))


def launcher(train: Callable) -> Callable:
    """A task's ``run(cfg, *, resume=False, overwrite=False)``: ``train(cfg, process, device,
    resume=, overwrite=)`` in this process's place of the run (torchrun or one process)."""
    def run(cfg, *, resume: bool = False, overwrite: bool = False) -> dict:
        """Train (or continue) the run described by ``cfg``; returns the summary (under
        torchrun: on process 0; the others return an empty dict)."""
        return distributed.launch(train, cfg, resume=resume, overwrite=overwrite)
    return run


def batch_stream(job: Job, process: distributed.Process, start: int):
    """The training batches from iteration ``start`` on: one endless resumable shuffle, or
    for epoch jobs each epoch's own, begun at its first sample."""
    cfg = job.cfg

    def from_sample(sample: int):
        return iteration_batches(job.train_set, cfg.batch_size, process, seed=cfg.seed, start=sample,
                                 workers=cfg.data.workers, collate_fn=job.collate_fn)
    if not job.epoch_steps:
        yield from from_sample(start * cfg.batch_size)
        return
    iteration = start
    while True:
        epoch, step = divmod(iteration, job.epoch_steps)
        batches = from_sample(epoch * len(job.train_set) + step * cfg.batch_size)
        for _ in range(job.epoch_steps - step):
            yield next(batches)
        iteration = (epoch + 1) * job.epoch_steps


def _resume_position(state: dict, path) -> None:
    """Check that ``last.pth`` has this loop's position, and read the older names of its marks."""
    if "iteration" not in state:  # classification's epoch-based last.pth, before this loop
        raise CheckpointError(f"{path} counts epochs (written by an earlier afan, before the shared training loop); "
                              "this version resumes from iterations: finish that run with the version that started "
                              "it, or start it again with --overwrite")
    state.setdefault("best_score", state.get("best_miou", -1.0))  # segmentation's earlier name
    state.setdefault("skipped_steps", 0)


def run_loop(job: Job, process: distributed.Process, device: torch.device, *, resume: bool,
             overwrite: bool) -> Finished:
    """Train ``job`` to its last iteration (or continue it with ``resume``)."""
    cfg = job.cfg
    run_step = distributed.step_runner(job.model, job.step, process, device, sync_bn=cfg.sync_bn)
    # Only process 0 writes; the others read the checkpoint they resume from.
    run_dir = RunDir(cfg.out, resume=resume, overwrite=overwrite) if process.is_main else None
    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(precision, device)

    start, best, skipped, window = 0, -1.0, 0, LogWindow()
    if resume:
        state = continue_run(cfg.out, run_dir, job.model, job.optimizer, job.scheduler, position="iteration",
                             process=process, scaler=scaler, check=_resume_position)
        start, best, skipped = state["iteration"], state["best_score"], state["skipped_steps"]
        window.restore(state.get("log_window"), process)
    if run_dir:
        run_dir.save_config(cfg)

    batches = batch_stream(job, process, start)
    job.model.train()
    guard = TrainingGuard(process, device, on_nonfinite=cfg.on_nonfinite, last_checkpoint=Path(cfg.out) / RunDir.LAST,
                          skipped=skipped)
    final_scores = None
    with guard:
        bar = progress(range(start, job.iterations), initial=start, total=job.iterations, desc=cfg.mode,
                       disable=None if process.is_main else True, leave=False)
        for iteration in bar:
            batch = job.to_device(next(batches))
            done = iteration + 1
            lr = job.optimizer.param_groups[job.lr_group]["lr"]  # the rate this step uses
            result = guarded_step(run_step, batch, guard, optimizer=job.optimizer, scheduler=job.scheduler,
                                  scaler=scaler, precision=precision, device=device, where=job.where(done))
            window.add(job.step_values(result, batch))
            bar.set_postfix(loss=f"{result.loss.item():.4g}", refresh=False)
            last = done == job.iterations
            log_now = done % job.log_every == 0 or last
            eval_now = bool(job.eval_every) and (done % job.eval_every == 0 or last)
            if log_now or eval_now:
                means = window.close(process, device)  # every process comes here at the same iterations
                scores = {}
                if eval_now:
                    scores = job.evaluate(job.model, last)  # every process evaluates its share
                    job.model.train()  # evaluation put it in eval mode
                    window.restart_clock()  # seconds per iteration count training only
                    final_scores = scores if last else None
                    if scores[job.best_key] > best:
                        best = scores[job.best_key]
                        if run_dir:
                            save_checkpoint({**job.payload(afan.strip_aux_bn(job.model)), "iteration": done, **scores},
                                            run_dir.best_checkpoint)
                if run_dir:
                    validation = {f"val_{key}": value for key, value in scores.items()}
                    _log(job, run_dir, done, lr, means, validation, guard.counts())
            if done % job.checkpoint_every == 0 or last or guard.stop_requested:
                # A window cut by a stop is carried in last.pth, so the resumed run logs the same rows.
                save_training_state(run_dir, process, job.payload(job.model), job.optimizer, job.scheduler, cfg,
                                    scaler=scaler, iteration=done, best_score=best,
                                    log_window=window.state(process, device), **guard.counts(always=True))
            # The other processes' next step (its gradient averaging) waits for process 0 here.
            if guard.stop_requested:
                guard.stop(job.stopped_after(done))
    if run_dir and run_dir.metrics.rows():
        run_dir.metrics.plot(run_dir.file("curves.png"), x="epoch" if job.epoch_steps else "iteration")
    return Finished(run_dir, best, final_scores, guard.counts(), cfg)


def _log(job: Job, run_dir: RunDir, done: int, lr: float, means: dict, scores: dict, counts: dict) -> None:
    """One row of ``metrics.csv`` and its progress line."""
    if job.epoch_steps:
        epoch = done // job.epoch_steps - 1
        seconds = means.pop("sec_per_iter") * job.epoch_steps
        row = {"epoch": epoch, "iteration": done, "lr": lr, **means, **counts, **scores, "time": seconds}
        run_dir.metrics.log(**row)
        epoch_line(row, left=(job.iterations - done) / job.epoch_steps * seconds)
    else:
        run_dir.metrics.log(iteration=done, lr=lr, **means, **scores, **counts)
        log_line(done, job.iterations, lr, {**means, **scores})
