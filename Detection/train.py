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

import torch

import afan
from afan_harness import distributed
from afan_harness.cli import train_entry, warn_random_backbone
from afan_harness.loop import Job, mode_step, run_loop
from afan_harness.rundir import perturbation_sizes
from afan_harness.runtime import compile_parts, seed_everything
from Detection.config import OptimConfig, TrainConfig
from Detection.data import build_datasets, collate, to_device
from Detection.evaluation import run_evaluation
from Detection.models import checkpoint_payload, create_model
from Detection.steps import advprop_step, afan_step, base_step


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


STEPS = {"base": base_step, "afan": afan_step, "advprop": advprop_step}


def training_step(model, images, targets, cfg: TrainConfig):
    return mode_step(STEPS, cfg, model, images, targets)


def step_values(result, batch) -> dict:
    """A step's logged numbers: its loss and loss terms, and the sizes of both perturbations."""
    return {"loss": result.loss.item(), **{k: v.item() for k, v in result.losses.items()},
            **perturbation_sizes("se", result.se_perturbation), **perturbation_sizes("sd", result.sd_perturbation)}


def _train(cfg: TrainConfig, process: distributed.Process, device, *, resume: bool, overwrite: bool) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    with distributed.main_first(process):  # Shapes data is written to disk once
        splits = build_datasets(cfg.data, seed=cfg.seed)
    if process.is_main:
        warn_random_backbone(cfg)
    model = build_model(cfg, splits.num_classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg.optim))

    def evaluate(model, last):
        # The last evaluation is the final one (same weights): it writes the evaluation files.
        return run_evaluation(model, splits, device, cfg.out, draw=cfg.draw_images if last else 0, write=last,
                              process=process)

    # The best model is chosen by COCO AP where the data has it, else by VOC mAP.
    best_key = "AP" if splits.eval_info.kind == "coco" else "mAP"
    finished = run_loop(Job(cfg, model, optimizer, scheduler, splits.train,
                            step=lambda m, images, targets: training_step(m, images, targets, cfg),
                            to_device=lambda batch: to_device(*batch, device), step_values=step_values, evaluate=evaluate, best_key=best_key,
                            payload=checkpoint_payload, iterations=cfg.iterations, log_every=cfg.log_every,
                            checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, collate_fn=collate),
                        process, device, resume=resume, overwrite=overwrite)
    final = afan.strip_aux_bn(model)
    metrics = finished.final_scores
    if metrics is None:  # no evaluation at the last iteration (or resumed after it)
        metrics = run_evaluation(final, splits, device, cfg.out, draw=cfg.draw_images, process=process)
    return finished.final_summary(cfg.model.name, checkpoint_payload(final), metrics, best_key)


run, main = train_entry(_train, TrainConfig, "Detection.train", __file__,
                        description="Train a Faster R-CNN (base, A-FAN or AdvProp).")


if __name__ == "__main__":
    sys.exit(main())
