"""Train a DeepLabv3+ in one of three modes: ``base``, ``afan`` (SE + SD feature PGD) or
``advprop`` (pixel PGD with auxiliary BN), iteration by iteration with the poly schedule.

    python -m Segmentation.train --config Segmentation/configs/voc12_resnet50_afan.yaml
    python -m Segmentation.train --config Segmentation/configs/shapes_afan.yaml iterations=100
    python -m Segmentation.train --resume out=runs/shapes_seg_afan

Every ``log_every`` iterations the mean losses, training pixel accuracy, learning rate,
perturbation sizes and seconds per iteration go to ``metrics.csv`` (and ``curves.png``);
``last.pth`` (full state, what ``--resume`` continues from) is written every
``checkpoint_every`` iterations and at the end. With ``eval_every``, the model is also scored
on the validation set during training and the best one (mIoU) kept as ``best.pth``. At the
end the final model is evaluated (mIoU, pixel accuracy, ``per_class_iou.csv``, colourised
predictions) and one line ``SUMMARY {json}`` is printed (also ``summary.json``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import afan
from afan import distributed
from afan.checkpoint import save_checkpoint
from afan.cli import train_main, warn_random_backbone
from afan.guard import TrainingGuard, guarded_step
from afan.loading import iteration_batches
from afan.rundir import (LogWindow, RunDir, continue_run, log_line, perturbation_sizes, progress,
                         save_training_state, write_summary)
from afan.runtime import compile_parts, grad_scaler, resolve_precision, seed_everything
from Segmentation.config import OptimConfig, TrainConfig
from Segmentation.data import build_datasets, collate
from Segmentation.evaluation import run_evaluation
from Segmentation.models import checkpoint_payload, create_model
from Segmentation.models.loading import load_backbone_weights
from Segmentation.steps import IGNORE_INDEX, advprop_step, afan_step, base_step


def lr_factor(iteration: int, iterations: int, cfg: OptimConfig) -> float:
    """The poly schedule ``(1 - iteration / iterations) ** power``."""
    return (1 - iteration / iterations) ** cfg.power


def make_scheduler(optimizer: torch.optim.Optimizer, iterations: int, cfg: OptimConfig):
    """DeepLabV3Plus-Pytorch's PolyLR: every parameter group at
    ``max(base * lr_factor, cfg.min_lr)``, ``base`` its rate when the optimizer was made."""
    def floored(base):
        # LambdaLR multiplies the base rate by the factor; a group at rate 0 stays at 0.
        return lambda it: max(lr_factor(it, iterations, cfg), cfg.min_lr / base) if base else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [floored(g["lr"]) for g in optimizer.param_groups])


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def build_model(cfg: TrainConfig, num_classes: int, device) -> torch.nn.Module:
    model = create_model(cfg.model.name, num_classes, output_stride=cfg.model.output_stride)
    if cfg.model.backbone_weights:
        load_backbone_weights(model, cfg.model.backbone_weights)
    # Before any auxiliary BN is made: its branches copy the momentum of the layer they replace.
    model.set_backbone_bn_momentum(cfg.model.backbone_bn_momentum)
    if cfg.mode == "afan" and cfg.afan.aux_bn:
        model.convert_aux_bn(cfg.afan.se_layer)
    elif cfg.mode == "advprop":
        afan.convert_aux_bn(model)
    model = model.to(device, memory_format=memory_format(cfg))
    compile_parts(model.parts_to_compile(), cfg.compile, device)
    return model


def make_optimizer(model, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; the backbone's parameter group learns at ``backbone_lr_factor`` times the rate."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("backbone.")]
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor}, {"params": rest, "lr": cfg.lr}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def training_step(model, images, masks, cfg: TrainConfig):
    if cfg.mode == "afan":
        return afan_step(model, images, masks, cfg.afan)
    if cfg.mode == "advprop":
        return advprop_step(model, images, masks, cfg.advprop)
    return base_step(model, images, masks)


def _pixel_accuracy(logits, masks) -> float:
    valid = masks != IGNORE_INDEX
    return ((logits.argmax(1) == masks) & valid).sum().item() / max(valid.sum().item(), 1)


def run(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train (or continue) the run described by ``cfg``; returns the summary (under torchrun:
    on process 0; the others return an empty dict)."""
    return distributed.launch(_train, cfg, resume=resume, overwrite=overwrite)


def _train(cfg: TrainConfig, process: distributed.Process, device, *, resume: bool, overwrite: bool) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    if process.is_main:
        warn_random_backbone(cfg)
    model = build_model(cfg, splits.num_classes, device)
    run_step = distributed.step_runner(model, lambda m, images, masks: training_step(m, images, masks, cfg),
                                       process, device, sync_bn=cfg.sync_bn)
    # Only process 0 writes; the others read the checkpoint they resume from.
    run_dir = RunDir(cfg.out, resume=resume, overwrite=overwrite) if process.is_main else None
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.optim)

    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(precision, device)

    start, best, skipped, final_metrics = 0, -1.0, 0, None
    if resume:
        state = continue_run(cfg.out, run_dir, model, optimizer, scheduler, position="iteration", process=process,
                             scaler=scaler)
        start, best, skipped = state["iteration"], state["best_miou"], state.get("skipped_steps", 0)
    if run_dir:
        run_dir.save_config(cfg)

    # The same endless shuffle continues after a resume; each process takes its part of every
    # global batch.
    batches = iteration_batches(splits.train, cfg.batch_size, process, seed=cfg.seed, start=start * cfg.batch_size,
                                workers=cfg.data.workers, collate_fn=collate)
    quiet_eval = type(cfg.eval)(**{**vars(cfg.eval), "save_images": 0})
    model.train()
    window = LogWindow()
    guard = TrainingGuard(process, device, on_nonfinite=cfg.on_nonfinite, last_checkpoint=Path(cfg.out) / RunDir.LAST,
                          skipped=skipped)
    with guard:
        bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=cfg.mode,
                       disable=None if process.is_main else True)
        for iteration in bar:
            images, masks = next(batches)
            images, masks = images.to(device, memory_format=memory_format(cfg)), masks.to(device)
            done = iteration + 1
            result = guarded_step(run_step, (images, masks), guard, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                  precision=precision, device=device, where=f"iteration {done}")
            window.add({"loss": result.loss.item(), **{k: v.item() for k, v in result.losses.items()},
                        "train_pixel_acc": _pixel_accuracy(result.logits.detach(), masks),
                        **perturbation_sizes("se" if cfg.mode == "afan" else "pixel", result.perturbation),
                        **perturbation_sizes("sd", result.sd_perturbation)})
            bar.set_postfix(loss=f"{result.loss.item():.4g}", refresh=False)
            log_now = done % cfg.log_every == 0 or done == cfg.iterations
            eval_now = bool(cfg.eval_every) and (done % cfg.eval_every == 0 or done == cfg.iterations)
            if log_now or eval_now:
                means = window.close(process, device)  # every process comes here at the same iterations
            if run_dir:
                scores = {}
                if eval_now:
                    # The last evaluation is the final one (same weights): it saves the
                    # pictures, and the end of the run reuses its scores.
                    last = done == cfg.iterations
                    scores = run_evaluation(model, splits, device, run_dir.path, cfg.eval if last else quiet_eval,
                                            workers=cfg.data.workers)
                    if last:
                        final_metrics = dict(scores)
                    window.restart_clock()  # seconds per iteration count training only
                    if scores["miou"] > best:
                        best = scores["miou"]
                        save_checkpoint({**checkpoint_payload(afan.strip_aux_bn(model)), "iteration": done, **scores},
                                        run_dir.best_checkpoint)
                if log_now or eval_now:
                    lr = optimizer.param_groups[-1]["lr"]
                    scores = {f"val_{k}": v for k, v in scores.items()}
                    run_dir.metrics.log(iteration=done, lr=lr, **means, **scores, **guard.counts())
                    log_line(done, cfg.iterations, lr, {**means, **scores})
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations or guard.stop_requested:
                save_training_state(run_dir, process, checkpoint_payload(model), optimizer, scheduler, cfg,
                                    scaler=scaler, iteration=done, best_miou=best, **guard.counts(always=True))
            # The other processes' next step (its gradient averaging) waits for process 0 here.
            if guard.stop_requested:
                guard.stop(f"iteration {done}")
    if not run_dir:
        return {}
    if run_dir.metrics.rows():
        run_dir.metrics.plot(run_dir.file("curves.png"), x="iteration")

    final = afan.strip_aux_bn(model)
    save_checkpoint(checkpoint_payload(final), run_dir.file("final.pth"))
    if final_metrics is None:  # no evaluation at the last iteration (or resumed after it)
        final_metrics = run_evaluation(final, splits, device, run_dir.path, cfg.eval, workers=cfg.data.workers)
    metrics = final_metrics
    rows = run_dir.metrics.rows()
    times = [r["sec_per_iter"] for r in rows if r.get("sec_per_iter") is not None]
    summary = {"mode": cfg.mode, "model": cfg.model.name, "data": cfg.data.name, "iterations": cfg.iterations,
               **metrics, "best_miou": max(best, metrics["miou"]),
               "sec_per_iter": sum(times) / max(len(times), 1), **guard.counts(), "out": str(run_dir.path)}
    write_summary(run_dir, summary)
    return summary


def main(argv=None) -> int:
    return train_main(argv, config_cls=TrainConfig, run=run, description="Train a DeepLabv3+ (base, A-FAN or AdvProp).",
                      module="Segmentation.train", configs=Path(__file__).resolve().parent / "configs")


if __name__ == "__main__":
    sys.exit(main())
