"""Train a classifier in one of three modes: ``base``, ``afan`` (feature PGD) or ``advprop``.

    python -m Classification.train --config Classification/configs/cifar10_resnet56_afan.yaml
    python -m Classification.train --config Classification/configs/shapes_afan.yaml epochs=3
    python -m Classification.train --resume out=runs/shapes_afan

Each epoch logs train loss and accuracy, validation accuracy, learning rate, mean L2 and
L-infinity size of the perturbation and time to ``metrics.csv`` (and ``curves.png``) in the
run folder; ``last.pth`` is the full training state, ``best.pth`` the best model on
validation. At the end the best model is scored on the test split and one line
``SUMMARY {json}`` is printed (also saved as ``summary.json``).
"""
from __future__ import annotations

import bisect
import difflib
import math
import sys
import time
from pathlib import Path

import torch
import afan
from afan import distributed
from afan.checkpoint import save_checkpoint
from afan.cli import train_main
from afan.config import ConfigError
from afan.guard import TrainingGuard, guarded_step
from afan.loading import iteration_batches
from afan.rundir import RunDir, continue_run, duration, progress, save_training_state, write_summary
from afan.runtime import compile_parts, grad_scaler, resolve_precision, seed_everything
from Classification.config import OptimConfig, TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate
from Classification.models import checkpoint_payload, create_model, load_model
from Classification.steps import advprop_step, afan_step, base_step


def lr_factor(iteration: int, iters_per_epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Learning-rate multiplier at an iteration: linear warm-up times step or cosine decay."""
    epoch = iteration / iters_per_epoch
    warmup_iters = cfg.warmup_epochs * iters_per_epoch
    warm = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    if cfg.schedule == "step":
        return warm * cfg.decay ** bisect.bisect_right(cfg.milestones, epoch)
    return warm * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def build_model(cfg: TrainConfig, num_classes: int, device) -> torch.nn.Module:
    try:
        model = create_model(cfg.model, num_classes, input_norm=cfg.input_norm)
    except ValueError as error:  # an unknown name or weights tag
        raise ConfigError(f"model={cfg.model!r}: {error}") from None
    if cfg.mode == "afan" and cfg.afan.layer not in model.split_points:
        points = model.split_points  # a library model's are all its module names: show the closest
        shown = points if len(points) <= 12 else difflib.get_close_matches(cfg.afan.layer, points, n=5, cutoff=0)
        raise ConfigError(f"afan.layer={cfg.afan.layer!r} is not a split point of {cfg.model}; "
                          f"{'valid' if shown is points else 'closest'}: {', '.join(shown)}")
    if cfg.mode == "afan" and cfg.afan.aux_bn:
        afan.convert_aux_norm(model, after=model.module_name(cfg.afan.layer))
    elif cfg.mode == "advprop":
        afan.convert_aux_norm(model)
    model = model.to(device, memory_format=memory_format(cfg))
    compile_parts(model.parts_to_compile(), cfg.compile, device)
    return model


def make_optimizer(model, cfg: TrainConfig, iters_per_epoch: int):
    """SGD and its per-iteration schedule (warm-up, then step or cosine decay)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, cfg.epochs, cfg.optim))
    return optimizer, scheduler


def training_step(model, x, y, cfg: TrainConfig):
    if cfg.mode == "afan":
        return afan_step(model, x, y, cfg.afan)
    if cfg.mode == "advprop":
        return advprop_step(model, x, y, cfg.advprop)
    return base_step(model, x, y)


EPOCH_TOTALS = ("seen", "loss", "correct", "l2", "linf")  # what an epoch's log row is made of


def train_one_epoch(model, run_step, batches, optimizer, scheduler, scaler, cfg: TrainConfig, device, epoch: int,
                    guard: TrainingGuard, totals: dict, first: int, steps: int) -> int:
    """Steps ``first`` to ``steps - 1`` of an epoch, adding this process's sums to ``totals``;
    returns the number of steps done by its end, fewer when a signal asked the run to stop."""
    precision = resolve_precision(cfg.precision, device)
    model.train()
    bar = progress(range(first, steps), initial=first, total=steps, desc=f"{cfg.mode} epoch {epoch}", leave=False)
    for step in bar:
        x, y = next(batches)
        x = x.to(device, memory_format=memory_format(cfg), non_blocking=True)
        y = y.to(device, non_blocking=True)
        result = guarded_step(run_step, (x, y), guard, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                              precision=precision, device=device, where=f"epoch {epoch}, step {step + 1} of {steps}")
        n = y.numel()
        bar.set_postfix(loss=f"{result.loss.item():.4g}", refresh=False)
        totals["seen"] += n
        totals["loss"] += result.loss.item() * n
        totals["correct"] += (result.logits.argmax(1) == y).sum().item()
        if result.perturbation is not None:
            delta = result.perturbation.flatten(1)
            totals["l2"] += delta.norm(dim=1).sum().item()
            totals["linf"] += delta.abs().amax(dim=1).sum().item()
        if guard.stop_requested:
            return step + 1
    return steps


def epoch_row(totals: dict, cfg: TrainConfig) -> dict:
    """The logged training means of an epoch from its sums (already added over processes)."""
    row = {"train_loss": totals["loss"] / totals["seen"], "train_acc": totals["correct"] / totals["seen"]}
    if cfg.mode != "base":
        row.update(pert_l2=totals["l2"] / totals["seen"], pert_linf=totals["linf"] / totals["seen"])
    return row


def run(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train (or continue) the run described by ``cfg``; returns the summary (under torchrun:
    on process 0; the others return an empty dict)."""
    return distributed.launch(_train, cfg, resume=resume, overwrite=overwrite)


def _train(cfg: TrainConfig, process: distributed.Process, device, *, resume: bool, overwrite: bool) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    # Data and model are checked before the run folder is made, so a bad setting leaves
    # nothing behind to --overwrite.
    splits = build_datasets(cfg.data, seed=cfg.seed)
    steps_per_epoch = len(splits.train) // cfg.batch_size  # the last partial batch is dropped
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training split ({len(splits.train)} "
                          "images); lower batch_size")
    model = build_model(cfg, splits.num_classes, device)
    run_step = distributed.step_runner(model, lambda m, x, y: training_step(m, x, y, cfg), process, device,
                                       sync_bn=cfg.sync_bn)
    # Only process 0 writes; the others read the checkpoint they resume from.
    run_dir = RunDir(cfg.out, resume=resume, overwrite=overwrite) if process.is_main else None
    loader_args = dict(workers=cfg.data.workers, seed=cfg.seed)
    val_loader = make_loader(splits.val, cfg.batch_size, train=False, **loader_args)

    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    scaler = grad_scaler(resolve_precision(cfg.precision, device), device)

    start_epoch, best_acc, partial, skipped = 0, -1.0, None, 0
    if resume:
        state = continue_run(cfg.out, run_dir, model, optimizer, scheduler, position="epoch", process=process,
                             scaler=scaler)
        start_epoch, best_acc, skipped = state["epoch"] + 1, state["best_val_acc"], state.get("skipped_steps", 0)
        partial = state.get("partial_epoch")
    if run_dir:
        run_dir.save_config(cfg)

    guard = TrainingGuard(process, device, on_nonfinite=cfg.on_nonfinite, last_checkpoint=Path(cfg.out) / RunDir.LAST,
                          skipped=skipped)

    def save_last(**position):
        """Write last.pth at ``position`` (call on every process: they exchange RNG states)."""
        save_training_state(run_dir, process, checkpoint_payload(model), optimizer, scheduler, cfg, scaler=scaler,
                            best_val_acc=best_acc, **guard.counts(always=True), **position)

    with guard:
        for epoch in range(start_epoch, cfg.epochs):
            tic = time.perf_counter()
            # An epoch's batches are the next part of one resumable shuffle, so a run resumed
            # at any step sees the batches the uninterrupted run would have seen.
            first, totals = 0, dict.fromkeys(EPOCH_TOTALS, 0.0)
            if partial:  # a run stopped by a signal inside this epoch; process 0 holds the sums so far
                first = partial["batch"]
                if run_dir:
                    totals = dict(partial["totals"])
                partial = None
            batches = iteration_batches(splits.train, cfg.batch_size, process, seed=cfg.seed,
                                        start=epoch * len(splits.train) + first * cfg.batch_size,
                                        workers=cfg.data.workers)
            done = train_one_epoch(model, run_step, batches, optimizer, scheduler, scaler, cfg, device, epoch, guard,
                                   totals, first, steps_per_epoch)
            totals = dict(zip(EPOCH_TOTALS, distributed.sum_over_processes(list(totals.values()), device)))
            if done < steps_per_epoch:  # stopped by a signal: save the position inside the epoch
                save_last(epoch=epoch - 1, partial_epoch={"batch": done, "totals": totals})
                guard.stop(f"step {done} of {steps_per_epoch} in epoch {epoch}")
            # The other processes' next step (its gradient averaging) waits for process 0 here.
            if run_dir:
                # The rate the epoch started with (a resumed epoch did not start here).
                lr = cfg.optim.lr * lr_factor(epoch * steps_per_epoch, steps_per_epoch, cfg.epochs, cfg.optim)
                row = {"epoch": epoch, "lr": lr, **epoch_row(totals, cfg), **guard.counts()}
                row["val_acc"] = evaluate(model, val_loader, device, memory_format(cfg), desc="val")["top1"]
                row["time"] = time.perf_counter() - tic
                run_dir.metrics.log(**row)
                if row["val_acc"] > best_acc:
                    best_acc = row["val_acc"]
                    best = checkpoint_payload(afan.strip_aux_bn(model))
                    save_checkpoint({**best, "epoch": epoch, "val_acc": best_acc}, run_dir.best_checkpoint)
                left = (cfg.epochs - epoch - 1) * row["time"]
                print(f"epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                      + f" ETA {duration(left)}", flush=True)
            save_last(epoch=epoch)
            if guard.stop_requested:
                guard.stop(f"epoch {epoch}")
    if not run_dir:
        return {}
    run_dir.metrics.plot(run_dir.file("curves.png"), x="epoch")

    best_model = load_model(run_dir.best_checkpoint).to(device, memory_format=memory_format(cfg))
    test_loader = make_loader(splits.test, cfg.batch_size, train=False, **loader_args)
    test = evaluate(best_model, test_loader, device, memory_format(cfg), desc="test")
    rows = run_dir.metrics.rows()
    summary = {
        "mode": cfg.mode, "model": cfg.model, "data": cfg.data.name, "epochs": cfg.epochs,
        "best_val_acc": best_acc, "test_acc": test["top1"], "test_top5": test["top5"],
        "sec_per_epoch": sum(r["time"] for r in rows) / len(rows), **guard.counts(), "out": str(run_dir.path),
    }
    write_summary(run_dir, summary)
    return summary


def main(argv=None) -> int:
    return train_main(argv, config_cls=TrainConfig, run=run, description="Train a classifier (base, A-FAN or AdvProp).",
                      module="Classification.train", configs=Path(__file__).resolve().parent / "configs")


if __name__ == "__main__":
    sys.exit(main())
