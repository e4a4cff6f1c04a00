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

import dataclasses
import sys

import torch

import afan
from afan_harness import distributed
from afan_harness.cli import train_entry, warn_random_backbone
from afan_harness.loop import Job, mode_step, run_loop
from afan_harness.rundir import perturbation_sizes
from afan_harness.runtime import compile_parts, seed_everything
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


STEPS = {"base": base_step, "afan": afan_step, "advprop": advprop_step}


def training_step(model, images, masks, cfg: TrainConfig):
    return mode_step(STEPS, cfg, model, images, masks)


def _pixel_accuracy(logits, masks) -> float:
    valid = masks != IGNORE_INDEX
    return ((logits.argmax(1) == masks) & valid).sum().item() / max(valid.sum().item(), 1)


def step_values(result, batch, mode: str) -> dict:
    """A step's logged numbers: loss and terms, training pixel accuracy, perturbation sizes."""
    return {"loss": result.loss.item(), **{k: v.item() for k, v in result.losses.items()},
            "train_pixel_acc": _pixel_accuracy(result.logits.detach(), batch[1]),
            **perturbation_sizes("se" if mode == "afan" else "pixel", result.perturbation),
            **perturbation_sizes("sd", result.sd_perturbation)}


def _train(cfg: TrainConfig, process: distributed.Process, device, *, resume: bool, overwrite: bool) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    if process.is_main:
        warn_random_backbone(cfg)
    model = build_model(cfg, splits.num_classes, device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.iterations, cfg.optim)
    quiet_eval = dataclasses.replace(cfg.eval, save_images=0)

    def to_device(batch):
        images, masks = batch
        return images.to(device, memory_format=memory_format(cfg)), masks.to(device)

    def evaluate(model, last):
        # The last evaluation is the final one (same weights): it saves the pictures.
        return run_evaluation(model, splits, device, cfg.out, cfg.eval if last else quiet_eval,
                              workers=cfg.data.workers, process=process)

    finished = run_loop(Job(cfg, model, optimizer, scheduler, splits.train,
                            step=lambda m, images, masks: training_step(m, images, masks, cfg), to_device=to_device,
                            step_values=lambda result, batch: step_values(result, batch, cfg.mode),
                            evaluate=evaluate, best_key="miou", payload=checkpoint_payload,
                            iterations=cfg.iterations, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            eval_every=cfg.eval_every, collate_fn=collate, lr_group=-1),
                        process, device, resume=resume, overwrite=overwrite)
    final = afan.strip_aux_bn(model)
    metrics = finished.final_scores
    if metrics is None:  # no evaluation at the last iteration (or resumed after it)
        metrics = run_evaluation(final, splits, device, cfg.out, cfg.eval, workers=cfg.data.workers, process=process)
    return finished.final_summary(cfg.model.name, checkpoint_payload(final), metrics, "miou")


run, main = train_entry(_train, TrainConfig, "Segmentation.train", __file__,
                        description="Train a DeepLabv3+ (base, A-FAN or AdvProp).")


if __name__ == "__main__":
    sys.exit(main())
