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
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

import afan
from afan import distributed
from afan.checkpoint import save_checkpoint
from afan.cli import train_main
from afan.config import ConfigError
from afan.rundir import RunDir, continue_run, progress, training_state, write_summary
from afan.runtime import autocast, grad_scaler, optimizer_step, resolve_precision, seed_everything
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
    model = create_model(cfg.model, num_classes)
    if cfg.mode == "afan" and cfg.afan.layer not in model.split_points:
        raise ConfigError(f"afan.layer={cfg.afan.layer!r} is not a split point of {cfg.model}; "
                          f"valid: {', '.join(model.split_points)}")
    if cfg.mode == "afan" and cfg.afan.aux_bn:
        afan.convert_aux_bn(model, after=cfg.afan.layer)
    elif cfg.mode == "advprop":
        afan.convert_aux_bn(model)
    return model.to(device, memory_format=memory_format(cfg))


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


def train_one_epoch(model, run_step, loader, optimizer, scheduler, scaler, cfg: TrainConfig, device, epoch: int) -> dict:
    """One epoch of ``run_step(x, y)`` steps; the logged sums are taken over all processes."""
    precision = resolve_precision(cfg.precision, device)
    model.train()
    seen = correct = 0
    loss_sum = l2_sum = linf_sum = 0.0
    for x, y in progress(loader, desc=f"{cfg.mode} epoch {epoch}", leave=False):
        x = x.to(device, memory_format=memory_format(cfg), non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(precision, device):
            result = run_step(x, y)
        if not torch.isfinite(result.loss):
            raise FloatingPointError(f"non-finite loss {result.loss.item()} at epoch {epoch}, "
                                     f"iteration {scheduler.last_epoch}; lower optim.lr")
        optimizer_step(result.loss, optimizer, scaler)
        scheduler.step()
        n = y.numel()
        seen += n
        loss_sum += result.loss.item() * n
        correct += (result.logits.argmax(1) == y).sum().item()
        if result.perturbation is not None:
            delta = result.perturbation.flatten(1)
            l2_sum += delta.norm(dim=1).sum().item()
            linf_sum += delta.abs().amax(dim=1).sum().item()
    seen, loss_sum, correct, l2_sum, linf_sum = distributed.sum_over_processes(
        [seen, loss_sum, correct, l2_sum, linf_sum], device)
    row = {"train_loss": loss_sum / seen, "train_acc": correct / seen}
    if cfg.mode != "base":
        row.update(pert_l2=l2_sum / seen, pert_linf=linf_sum / seen)
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
    model = build_model(cfg, splits.num_classes, device)
    run_step = distributed.step_runner(model, lambda m, x, y: training_step(m, x, y, cfg), process, device,
                                       sync_bn=cfg.sync_bn)
    # Only process 0 writes; the others read the checkpoint they resume from.
    run_dir = RunDir(cfg.out, resume=resume, overwrite=overwrite) if process.is_main else None
    loader_args = dict(workers=cfg.data.workers, seed=cfg.seed)
    sampler = (DistributedSampler(splits.train, process.world_size, process.rank, shuffle=True, seed=cfg.seed,
                                  drop_last=True) if process.distributed else None)
    train_loader = make_loader(splits.train, distributed.local_batch_size(cfg.batch_size, process), train=True,
                               sampler=sampler, drop_last=True if sampler else None, **loader_args)
    val_loader = make_loader(splits.val, cfg.batch_size, train=False, **loader_args)

    optimizer, scheduler = make_optimizer(model, cfg, len(train_loader))
    scaler = grad_scaler(resolve_precision(cfg.precision, device), device)

    start_epoch, best_acc = 0, -1.0
    if resume:
        state = continue_run(cfg.out, run_dir, model, optimizer, scheduler, position="epoch",
                             scaler=scaler)
        start_epoch, best_acc = state["epoch"] + 1, state["best_val_acc"]
    if run_dir:
        run_dir.save_config(cfg)

    for epoch in range(start_epoch, cfg.epochs):
        tic = time.perf_counter()
        # The data order of an epoch depends only on (seed, epoch), so a resumed run sees
        # the same batches as an uninterrupted one.
        if sampler:
            sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(model, run_step, train_loader, optimizer, scheduler, scaler, cfg, device, epoch))
        if not run_dir:
            continue  # the next step's gradient averaging waits for process 0 to finish below
        row["val_acc"] = evaluate(model, val_loader, device, memory_format(cfg), desc="val")["top1"]
        row["time"] = time.perf_counter() - tic
        run_dir.metrics.log(**row)
        if row["val_acc"] > best_acc:
            best_acc = row["val_acc"]
            best = checkpoint_payload(afan.strip_aux_bn(model))
            save_checkpoint({**best, "epoch": epoch, "val_acc": best_acc}, run_dir.best_checkpoint)
        save_checkpoint(training_state(checkpoint_payload(model), optimizer, scheduler, cfg, scaler=scaler,
                                       epoch=epoch, best_val_acc=best_acc), run_dir.last_checkpoint)
        print(f"epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
              flush=True)
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
        "sec_per_epoch": sum(r["time"] for r in rows) / len(rows), "out": str(run_dir.path),
    }
    write_summary(run_dir, summary)
    return summary


def main(argv=None) -> int:
    return train_main(argv, config_cls=TrainConfig, run=run, description="Train a classifier (base, A-FAN or AdvProp).",
                      module="Classification.train", configs=Path(__file__).resolve().parent / "configs")


if __name__ == "__main__":
    sys.exit(main())
