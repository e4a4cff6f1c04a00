"""What the benchmark times, per task: a model and batch built as its ``train.py`` builds them,
the training step of each mode, and the separate passes an A-FAN step needs.

A case is made for each mode (in that mode's own process, see ``bench.measure``), from the
task's Shapes config with a few overrides, so the benchmark measures exactly the code that
training runs. The A-FAN passes are what the method cannot avoid, run back to back and timed
together (each as often as the step runs it):

* ``clean``: the clean forward and backward pass (the whole ``base`` step);
* ``se_attack``: the tail forward from the SE feature and the backward to that feature only,
  ``steps`` times;
* ``se_strength``: the tail forward and backward on one strength, ``n`` times: parameter
  gradients only, as released (the strengths are made from the clean feature detached),
  and also the gradient towards the feature with ``afan.se_trains_head=true``;
* ``sd_attack`` / ``sd_strength``: the same for the SD feature (detection: the RoI head's
  output; segmentation: the ASPP output or the decoder's concatenation), ``sd_steps`` times
  and once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from afan_harness.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("classification", "detection", "segmentation")
MODES = ("base", "afan", "advprop")


@dataclass
class Case:
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]  # one training step's loss, backward done
    passes: dict[str, tuple[Callable[[], object], int]]  # afan only: name -> (pass, count per step)
    description: str  # model, batch and settings, for the table


def _grad_to(loss_fn, feature):
    """The backward of an attack step: the gradient towards the feature only."""
    feature = feature.detach().requires_grad_(True)
    return torch.autograd.grad(loss_fn(feature), feature)[0]


def _strength_input(feature, afan_cfg):
    """The clean feature as the strengths see it: detached (the release), or asking for its
    gradient, as the head's output does, with ``se_trains_head``."""
    return feature.detach().requires_grad_(afan_cfg.se_trains_head)


def _backward(loss):
    loss.backward()
    return loss


def _config(module, path, overrides):
    return load_config(module.TrainConfig, path, overrides=overrides)


def classification(mode: str, device, overrides=()) -> Case:
    from Classification import train as task
    from Classification.data import build_datasets, make_loader

    cfg = _config(task, None, ["data.name=shapes", "data.train_size=256", "data.val_size=1", "data.test_size=1",
                               "data.workers=0", "model=resnet56", "batch_size=128", "afan.layer=layer1",
                               "afan.steps=5", "advprop.steps=5", f"mode={mode}", *overrides])
    splits = build_datasets(cfg.data, seed=0)
    model = task.build_model(cfg, splits.num_classes, device).train()
    x, y = next(iter(make_loader(splits.train, cfg.batch_size, train=True, workers=0, seed=0, drop_last=True)))
    x, y = x.to(device, memory_format=task.memory_format(cfg)), y.to(device)

    def step():
        return _backward(task.training_step(model, x, y, cfg).loss)

    passes = {}
    if mode == "afan":
        at = cfg.afan.layer
        h = model.head(x, at).detach()

        def loss(feature):
            return F.cross_entropy(model.tail(feature, at), y)

        passes = {"clean": (lambda: _backward(F.cross_entropy(model(x), y)), 1),
                  "se_attack": (lambda: _grad_to(loss, h), cfg.afan.steps),
                  "se_strength": (lambda: _backward(loss(_strength_input(h, cfg.afan))), cfg.afan.n)}
    return Case(model, step, passes, f"{cfg.model}, batch {cfg.batch_size} of {x.shape[-1]} px, "
                              f"SE after {cfg.afan.layer}, {cfg.afan.steps} PGD steps")


def segmentation(mode: str, device, overrides=()) -> Case:
    from Segmentation import train as task
    from Segmentation.data import build_datasets, make_loader
    from Segmentation.steps import segmentation_loss
    cfg = _config(task, ROOT / "Segmentation" / "configs" / "shapes_base.yaml", [f"mode={mode}", *overrides])
    splits = build_datasets(cfg.data, seed=0)
    model = task.build_model(cfg, splits.num_classes, device).train()
    images, masks = next(iter(make_loader(splits.train, cfg.batch_size, train=True, workers=0, seed=0, drop_last=True)))
    images, masks = images.to(device, memory_format=task.memory_format(cfg)), masks.to(device)

    def step():
        return _backward(task.training_step(model, images, masks, cfg).loss)

    passes = {}
    if mode == "afan":
        at, size = cfg.afan.se_layer, images.shape[-2:]
        h, low = (t.detach() for t in model.head(images, at))
        aspp = model.encode(h, at).detach()

        def se_loss(feature):
            return segmentation_loss(model.tail(feature, at, low, size), masks)

        def sd_loss(feature):
            return segmentation_loss(model.decode(feature, low, size), masks)

        passes = {"clean": (lambda: _backward(segmentation_loss(model(images), masks)), 1),
                  "se_attack": (lambda: _grad_to(se_loss, h), cfg.afan.se_steps),
                  "se_strength": (lambda: _backward(se_loss(_strength_input(h, cfg.afan))), cfg.afan.n)}
        if cfg.afan.sd:
            passes.update(sd_attack=(lambda: _grad_to(sd_loss, aspp), cfg.afan.sd_steps),
                          sd_strength=(lambda: _backward(sd_loss(aspp)), 1))
    return Case(model, step, passes, f"{cfg.model.name} OS{cfg.model.output_stride}, batch {cfg.batch_size} of "
                              f"{images.shape[-1]} px, SE after {cfg.afan.se_layer}, n {cfg.afan.n}, SD")


def detection(mode: str, device, overrides=()) -> Case:
    from Detection import train as task
    from Detection.data import build_datasets, make_loader
    from Detection.models.parts import head, predictor_losses, prepare, tail
    cfg = _config(task, ROOT / "Detection" / "configs" / "shapes_base.yaml", [f"mode={mode}", *overrides])
    splits = build_datasets(cfg.data, seed=0)
    model = task.build_model(cfg, splits.num_classes, device).train()
    images, targets = next(iter(make_loader(splits.train, cfg.batch_size, train=True, workers=0, seed=0,
                                            drop_last=True)))
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]

    def step():
        return _backward(task.training_step(model, images, targets, cfg).loss)

    passes = {}
    if mode == "afan":
        at = cfg.afan.se_layer
        image_list, prepared = prepare(model, images, targets)
        feats = {k: v.detach() for k, v in head(model, image_list.tensors, at).items()}
        with torch.no_grad():
            roi = tail(model, feats, at, image_list, prepared, return_roi=True)[1]

        def se_loss(feature):
            return sum(tail(model, {**feats, at: feature}, at, image_list, prepared).values())

        def sd_loss(box_features):
            return sum(predictor_losses(model.roi_heads, box_features, roi.labels, roi.regression_targets).values())

        passes = {"clean": (lambda: _backward(sum(model(images, targets).values())), 1),
                  "se_attack": (lambda: _grad_to(se_loss, feats[at]), cfg.afan.se_steps),
                  "se_strength": (lambda: _backward(se_loss(_strength_input(feats[at], cfg.afan))), cfg.afan.n)}
        if cfg.afan.sd:
            passes.update(sd_attack=(lambda: _grad_to(sd_loss, roi.box_features), cfg.afan.sd_steps),
                          sd_strength=(lambda: _backward(sd_loss(roi.box_features.detach())), 1))
    return Case(model, step, passes, f"{cfg.model.name}, batch {cfg.batch_size} of {cfg.model.min_size} px, "
                              f"SE after {cfg.afan.se_layer}, n {cfg.afan.n}, SD")


BUILDERS = {"classification": classification, "detection": detection, "segmentation": segmentation}

# Small settings for a quick run (and the test suite): the same code on tiny models and batches.
TINY = {
    "classification": ["model=resnet20", "batch_size=8", "data.train_size=16"],
    "detection": ["model.min_size=64", "model.max_size=64", "batch_size=1", "data.train_size=4", "data.val_size=1",
                  "model.roi_batch_size=8"],
    "segmentation": ["data.image_size=32", "data.train_size=4", "data.val_size=1", "batch_size=2"],
}
