"""Train a Faster R-CNN in one of three modes: ``base``, ``afan`` (SE + SD feature PGD) or
``advprop`` (pixel PGD with auxiliary BN), iteration by iteration as released.

    python -m Detection.train --config Detection/configs/voc07_resnet50_afan.yaml
    python -m Detection.train --config Detection/configs/shapes_afan.yaml iterations=100
    python -m Detection.train --resume out=runs/shapes_det_afan

Every ``log_every`` iterations the mean losses, learning rate, perturbation sizes and
seconds per iteration go to ``metrics.csv`` (and ``curves.png``); ``last.pth`` (full state,
what ``--resume`` continues from) is written every ``checkpoint_every`` iterations and at the
end. With ``eval_every``, the model is also scored on the test split during training (the
mAP curve in ``curves.png``) and the best one kept as ``best.pth`` (by COCO AP for
COCO-format data, VOC mAP otherwise). Then the model is evaluated on the test split (VOC mAP, and COCO AP for COCO-format
data), with per-class AP in ``per_class_ap.csv``, the detections as COCO results in
``detections.json`` and a few drawn predictions with their ground truth, and one line
``SUMMARY {json}`` is printed (also ``summary.json``).
"""
from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
from afan.settings import AdvPropConfig, RunSettings, check_nonnegative, check_positive
from Detection.config import AfanConfig, ModelConfig
from Detection.data import DataConfig, build_datasets, collate
from Detection.evaluation import run_evaluation
from Detection.models import checkpoint_payload, create_model
from Detection.steps import advprop_step, afan_step, base_step


@dataclass
class OptimConfig:
    """SGD with linear warm-up and step decay at given iterations (VOC2007 release)."""

    lr: float = 0.008
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the VOC2007 release (its train_config.py); COCO: 1e-4
    steps: list[int] = field(default_factory=lambda: [6250, 8750])
    decay: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1 / 3  # lr factor at iteration 0, rising linearly to 1

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_iters < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_iters >= 0")
        if sorted(self.steps) != list(self.steps):
            raise ValueError(f"optim.steps must be increasing, got {self.steps}")


@dataclass
class TrainConfig(RunSettings):
    mode: Literal["base", "afan", "advprop"] = "base"
    iterations: int = 11250
    batch_size: int = 8
    checkpoint_every: int = 1000
    log_every: int = 20
    eval_every: int = 0  # also evaluate (and keep best.pth) every N iterations; 0: only at the end
    draw_images: int = 4  # test images drawn with their predictions at the end
    out: str = "runs/detection"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    afan: AfanConfig = field(default_factory=AfanConfig)
    advprop: AdvPropConfig = field(default_factory=AdvPropConfig)

    def __post_init__(self):
        check_positive(self, ("iterations", "batch_size", "checkpoint_every", "log_every"))
        check_nonnegative(self, "", ("eval_every",))
        needs_bn = self.mode == "advprop" or (self.mode == "afan" and self.afan.aux_bn)
        if needs_bn and self.model.norm != "bn":
            raise ValueError("auxiliary BN (mode=advprop or afan.aux_bn=true) needs trainable "
                             "BatchNorm: add model.norm=bn")


def lr_factor(iteration: int, cfg: OptimConfig) -> float:
    warm = 1.0
    if iteration < cfg.warmup_iters:
        warm = cfg.warmup_factor + (1 - cfg.warmup_factor) * iteration / cfg.warmup_iters
    return warm * cfg.decay ** bisect.bisect_right(cfg.steps, iteration)


def build_model(cfg: TrainConfig, num_classes: int, device) -> torch.nn.Module:
    model = create_model(cfg.model.name, num_classes, backbone_weights=cfg.model.backbone_weights or None,
                         **cfg.model.settings())
    if cfg.mode == "afan" and cfg.afan.aux_bn:
        afan.convert_aux_bn(model, after=f"backbone.body.{cfg.afan.se_layer}")
    elif cfg.mode == "advprop":
        afan.convert_aux_bn(model)
    # Convolutions give channels_last outputs for channels_last weights, so the whole backbone
    # and FPN run in that layout without converting the images.
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    compile_parts(model.parts_to_compile(), cfg.compile, device)
    return model


def training_step(model, images, targets, cfg: TrainConfig):
    if cfg.mode == "afan":
        return afan_step(model, images, targets, cfg.afan)
    if cfg.mode == "advprop":
        return advprop_step(model, images, targets, cfg.advprop)
    return base_step(model, images, targets)


def run(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train (or continue) the run described by ``cfg``; returns the summary (under torchrun:
    on process 0; the others return an empty dict)."""
    return distributed.launch(_train, cfg, resume=resume, overwrite=overwrite)


def _train(cfg: TrainConfig, process: distributed.Process, device, *, resume: bool, overwrite: bool) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    with distributed.main_first(process):  # Shapes data is written to disk once
        splits = build_datasets(cfg.data, seed=cfg.seed)
    if process.is_main:
        warn_random_backbone(cfg)
    model = build_model(cfg, splits.num_classes, device)
    run_step = distributed.step_runner(model, lambda m, images, targets: training_step(m, images, targets, cfg),
                                       process, device, sync_bn=cfg.sync_bn)
    # Only process 0 writes; the others read the checkpoint they resume from.
    run_dir = RunDir(cfg.out, resume=resume, overwrite=overwrite) if process.is_main else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg.optim))

    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(precision, device)

    # The best model is chosen by COCO AP where the data has it, else by VOC mAP.
    best_key = "AP" if splits.eval_info.kind == "coco" else "mAP"
    start, best, skipped, final_metrics = 0, -1.0, 0, None
    if resume:
        state = continue_run(cfg.out, run_dir, model, optimizer, scheduler, position="iteration", process=process,
                             scaler=scaler)
        start, best, skipped = state["iteration"], state.get("best_score", -1.0), state.get("skipped_steps", 0)
    if run_dir:
        run_dir.save_config(cfg)

    # The same endless shuffle continues after a resume; each process takes its part of every
    # global batch.
    batches = iteration_batches(splits.train, cfg.batch_size, process, seed=cfg.seed, start=start * cfg.batch_size,
                                workers=cfg.data.workers, collate_fn=collate)
    model.train()
    window = LogWindow()
    guard = TrainingGuard(process, device, on_nonfinite=cfg.on_nonfinite, last_checkpoint=Path(cfg.out) / RunDir.LAST,
                          skipped=skipped)
    with guard:
        bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"{cfg.mode}",
                       disable=None if process.is_main else True)
        for iteration in bar:
            images, targets = next(batches)
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            done = iteration + 1
            result = guarded_step(run_step, (images, targets), guard, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                  precision=precision, device=device, where=f"iteration {done}")
            window.add({"loss": result.loss.item(), **{k: v.item() for k, v in result.losses.items()},
                        **perturbation_sizes("se", result.se_perturbation),
                        **perturbation_sizes("sd", result.sd_perturbation)})
            bar.set_postfix(loss=f"{result.loss.item():.4g}", refresh=False)
            log_now = done % cfg.log_every == 0 or done == cfg.iterations
            eval_now = bool(cfg.eval_every) and (done % cfg.eval_every == 0 or done == cfg.iterations)
            if log_now or eval_now:
                means = window.close(process, device)  # every process comes here at the same iterations
            if run_dir:
                scores = {}
                if eval_now:
                    # The last evaluation is the final one (same weights): it writes the
                    # evaluation files, and the end of the run reuses its scores.
                    last = done == cfg.iterations
                    scores = run_evaluation(model, splits, device, run_dir.path, draw=cfg.draw_images if last else 0,
                                            write=last)
                    if last:
                        final_metrics = dict(scores)
                    window.restart_clock()  # seconds per iteration count training only
                    if scores[best_key] > best:
                        best = scores[best_key]
                        save_checkpoint({**checkpoint_payload(afan.strip_aux_bn(model)), "iteration": done, **scores},
                                        run_dir.best_checkpoint)
                if log_now or eval_now:
                    lr = optimizer.param_groups[0]["lr"]
                    scores = {f"val_{k}": v for k, v in scores.items()}
                    run_dir.metrics.log(iteration=done, lr=lr, **means, **scores, **guard.counts())
                    log_line(done, cfg.iterations, lr, {**means, **scores})
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations or guard.stop_requested:
                save_training_state(run_dir, process, checkpoint_payload(model), optimizer, scheduler, cfg,
                                    scaler=scaler, iteration=done, best_score=best, **guard.counts(always=True))
            if guard.stop_requested:
                guard.stop(f"iteration {done}")
    if not run_dir:
        return {}
    if run_dir.metrics.rows():
        run_dir.metrics.plot(run_dir.file("curves.png"), x="iteration")

    final = afan.strip_aux_bn(model)
    save_checkpoint(checkpoint_payload(final), run_dir.file("final.pth"))
    if final_metrics is None:  # no evaluation at the last iteration (or resumed after it)
        final_metrics = run_evaluation(final, splits, device, run_dir.path, draw=cfg.draw_images)
    metrics = final_metrics
    rows = run_dir.metrics.rows()
    summary = {"mode": cfg.mode, "model": cfg.model.name, "data": cfg.data.name,
               "iterations": cfg.iterations, **metrics, f"best_{best_key}": max(best, metrics[best_key]),
               "sec_per_iter": sum(r["sec_per_iter"] for r in rows) / max(len(rows), 1),
               **guard.counts(), "out": str(run_dir.path)}
    write_summary(run_dir, summary)
    return summary


def main(argv=None) -> int:
    return train_main(argv, config_cls=TrainConfig, run=run, description="Train a Faster R-CNN (base, A-FAN or AdvProp).",
                      module="Detection.train", configs=Path(__file__).resolve().parent / "configs")


if __name__ == "__main__":
    sys.exit(main())
