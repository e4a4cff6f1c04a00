"""Train a classifier in one of four modes: ``base``, ``afan`` (feature PGD), ``advprop`` or
``learnable`` (the release's learnable multi-layer A-FAN).

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
from pathlib import Path

import torch
import afan
from afan_harness import distributed
from afan_harness.cli import train_entry
from afan_harness.config import ConfigError
from afan_harness.loop import Job, mode_step, run_loop
from afan_harness.runtime import compile_parts, seed_everything
from Classification.config import OptimConfig, TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate
from Classification.models import checkpoint_payload, create_model, load_model
from Classification.steps import LAYER_WEIGHTS, add_layer_weights, advprop_step, afan_step, base_step, learnable_step


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
    elif cfg.mode == "learnable":
        try:
            add_layer_weights(model, cfg.learnable.layers)
        except ValueError as error:
            raise ConfigError(f"learnable.layers: {error}") from None
    model = model.to(device, memory_format=memory_format(cfg))
    compile_parts(model.parts_to_compile(), cfg.compile, device)
    return model


def make_optimizer(model, cfg: TrainConfig, iters_per_epoch: int):
    """SGD and its per-iteration schedule (warm-up, then step or cosine decay). In learnable
    mode the layer weights are a second group, as the release's own ``optimizer_w``: rate
    ``learnable.w_lr`` throughout (no warm-up, no decay), the run's momentum, no weight
    decay, and projected back to sum 1 after every step."""
    prefix = LAYER_WEIGHTS + "."
    groups = [{"params": [p for name, p in model.named_parameters() if not name.startswith(prefix)]}]
    factors = [lambda it: lr_factor(it, iters_per_epoch, cfg.epochs, cfg.optim)]
    if cfg.mode == "learnable":
        weights = model.get_submodule(LAYER_WEIGHTS)
        groups.append({"params": [weights.w], "lr": cfg.learnable.w_lr, "weight_decay": 0.0})
        factors.append(lambda it: 1.0)
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    if cfg.mode == "learnable":
        # After the update of both groups, as the release projects after both its optimizers' steps;
        # a skipped step (non-finite loss or fp16 overflow) calls no hook.
        optimizer.register_step_post_hook(lambda *_: weights.project_())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


STEPS = {"base": base_step, "afan": afan_step, "advprop": advprop_step, "learnable": learnable_step}


def training_step(model, x, y, cfg: TrainConfig):
    return mode_step(STEPS, cfg, model, x, y)


def step_values(result, batch) -> dict:
    """A step's logged numbers: loss, accuracy, the mean L2 and L-infinity size of its
    perturbation and, in learnable mode, the layer weights ``w_1`` ... ``w_K``."""
    y = batch[1]
    values = {"train_loss": result.loss.item(), "train_acc": (result.logits.argmax(1) == y).float().mean().item()}
    if result.perturbation is not None:
        delta = result.perturbation.flatten(1)
        values.update(pert_l2=delta.norm(dim=1).mean().item(), pert_linf=delta.abs().amax(dim=1).mean().item())
    if result.weights is not None:
        values.update({f"w_{k}": w for k, w in enumerate(result.weights.tolist(), start=1)})
    return values


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
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    layout = memory_format(cfg)
    loader_args = dict(workers=cfg.data.workers, seed=cfg.seed)
    val_loader = make_loader(distributed.shard(splits.val, process), cfg.batch_size, train=False, **loader_args)

    def to_device(batch):
        x, y = batch
        return x.to(device, memory_format=layout, non_blocking=True), y.to(device, non_blocking=True)

    def validate(model, last):
        return {"acc": evaluate(model, val_loader, device, layout, desc="val", process=process)["top1"]}

    finished = run_loop(Job(cfg, model, optimizer, scheduler, splits.train, step=lambda m, x, y: training_step(m, x, y, cfg),
                            to_device=to_device, step_values=step_values, evaluate=validate, best_key="acc",
                            payload=checkpoint_payload, iterations=cfg.epochs * steps_per_epoch,
                            log_every=steps_per_epoch, checkpoint_every=steps_per_epoch, eval_every=steps_per_epoch,
                            epoch_steps=steps_per_epoch),
                        process, device, resume=resume, overwrite=overwrite)
    # The best model is scored on the test split, each process its share.
    best_model = load_model(Path(cfg.out) / "best.pth").to(device, memory_format=layout)
    test_loader = make_loader(distributed.shard(splits.test, process), cfg.batch_size, train=False, **loader_args)
    test = evaluate(best_model, test_loader, device, layout, desc="test", process=process)
    if finished.run_dir is None:
        return {}
    return finished.summary(cfg.model, epochs=cfg.epochs, best_val_acc=finished.best, test_acc=test["top1"],
                            test_top5=test["top5"], sec_per_epoch=finished.mean("time"))


run, main = train_entry(_train, TrainConfig, "Classification.train", __file__,
                        description="Train a classifier (base, A-FAN, AdvProp or learnable A-FAN).")


if __name__ == "__main__":
    sys.exit(main())
