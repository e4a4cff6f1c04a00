"""The loss of one training step in each mode: ``base``, ``afan``, ``advprop`` and
``learnable``.

Each function runs the forward passes (and the attack, if any) and returns the loss to
back-propagate; the training loop owns the optimizer. Models expose ``head(x, at)`` and
``tail(h, at)`` at their named split points (see ``Classification.models``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import afan
from Classification.config import AdvPropConfig, AfanConfig, LearnableConfig

MIX_DIMS = {"channel": 1, "batch": (0, 2, 3)}
LAYER_WEIGHTS = "layer_weights"  # the learnable mode's module on the model (its state-dict prefix)


@dataclass
class StepResult:
    loss: torch.Tensor
    logits: torch.Tensor  # clean logits (the PGD images' with afan.input_pgd), for the training accuracy
    perturbation: Optional[torch.Tensor] = None  # adversarial minus clean (feature or image)
    weights: Optional[torch.Tensor] = None  # learnable mode: the layer weights w the step used


def base_step(model, x, y) -> StepResult:
    logits = model(x)
    return StepResult(F.cross_entropy(logits, y), logits)


def afan_step(model, x, y, cfg: AfanConfig) -> StepResult:
    """``(L_clean + mean_i L(tail(h_i))) / 2`` with ``h_i`` the strengths of a feature PGD
    (:class:`afan.AFAN` on the model's hand-written split).

    By default this is the release's step (``main_perturb.py``): the attack's passes update
    BN running statistics, the strengths start from the clean feature detached, and the
    tail runs the attack, then the adversarial pass, then the clean pass. One difference
    is kept: the release runs the head twice on the same images (feature, then the clean
    full pass), so its head BN layers take two identical running-statistics updates per
    step; here the clean pass reuses the feature, one head pass and one update.
    """
    at = cfg.layer
    objective = afan.AFAN(model, head=lambda images: model.head(images, at), tail=lambda h: model.tail(h, at),
                          steps=cfg.steps, step_size=cfg.gamma / 255, eps=cfg.eps / 255, norm=cfg.norm,
                          random_start=cfg.random_start, project=cfg.project, n=cfg.n, mask=cfg.mask,
                          mix_dim=MIX_DIMS[cfg.mix_dim], attack_norm_stats=cfg.attack_bn_stats,
                          strengths_train_head=cfg.se_trains_head)
    if not cfg.input_pgd.enabled:
        result = objective.step(x, y, F.cross_entropy)
        return StepResult(result.loss, result.output, result.perturbation)
    return _on_input_pgd(model, x, y, cfg, objective)


def _on_input_pgd(model, x, y, cfg: AfanConfig, objective: afan.AFAN) -> StepResult:
    """A-FAN on top of input adversarial training (docs/method.md, "The variants"): the loss of pixel
    PGD images ``x_adv`` replaces the clean term, ``(L(x_adv) + mean_i L_i) / 2`` with the
    strengths from the clean images' feature (the release's ``*_advt`` scripts), or is added to
    the clean A-FAN loss; then ``(1 - weight) * that + weight * L(x_adv)``. The attack's
    passes are A-FAN's (``attack_bn_stats``)."""
    p = cfg.input_pgd
    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn):
        x_adv = afan.pixel_pgd(x, lambda images: F.cross_entropy(model(images), y), **p.attack())
    pgd_logits = model(x_adv)
    pgd_loss = F.cross_entropy(pgd_logits, y)
    if p.replaces_clean:
        h, h_adv, adversarial, _ = objective.adversarial(x, y, F.cross_entropy)
        return StepResult(p.total((pgd_loss + adversarial / cfg.n) / 2, pgd_loss), pgd_logits, h_adv - h.detach())
    result = objective.step(x, y, F.cross_entropy)
    return StepResult(p.total(result.loss, pgd_loss), result.output, result.perturbation)


class LayerWeights(nn.Module):
    """The weights ``w_k`` of the learnable mode, one per perturbed layer, from ``1/K``.

    They are a parameter of the model (``model.layer_weights``): DDP averages their gradient,
    the optimizer steps them in a group of their own (``Classification.train.make_optimizer``)
    and ``last.pth`` / ``best.pth`` carry them (``load_model`` leaves them out of the plain
    classifier). The model's forward never reads them."""

    def __init__(self, layers):
        super().__init__()
        self.layers = tuple(layers)
        self.w = nn.Parameter(torch.full((len(self.layers),), 1 / len(self.layers)))

    @torch.no_grad()
    def project_(self) -> None:
        """Back onto ``sum(w) = 1`` along the all-ones direction, the release's ``sum_project``:
        ``w <- w - (sum(w) - 1) / K`` (no sign constraint)."""
        self.w.sub_((self.w.sum() - 1) / len(self.w))


def layer_cuts(model) -> tuple[list[Callable], dict[str, int]]:
    """The model's stages run one by one, with each ``nn.Sequential`` split-point stage (a
    ResNet stage, a small CNN's block) run child by child, and where each layer name cuts
    them: ``{name: how many of the stages the head runs}`` for every split point ``at`` and
    ``at.<i>``, after child ``i`` of its stage."""
    if not hasattr(model, "stages"):
        raise ValueError(f"{model.arch} has no list of stages to cut between (tv:/timm: models); the learnable mode "
                         "runs the project's own models (resnet20..110, resnet18/50, tf_efficientnet_*, smallcnn)")
    runs, cuts = [], {}
    for name, stage in model.stages():
        if isinstance(stage, nn.Sequential) and name in model.split_points:
            for i, child in enumerate(stage):
                runs.append(child)
                cuts[f"{name}.{i}"] = len(runs)
        else:
            runs.append(stage)
        if name in model.split_points:
            cuts[name] = len(runs)
    return runs, cuts


def add_layer_weights(model, layers) -> LayerWeights:
    """Check ``layers`` against the model's cuts and give it their ``LayerWeights``."""
    runs, cuts = layer_cuts(model)
    for name in layers:
        if name not in cuts:
            raise ValueError(f"{name!r} is not a layer of {model.arch}; valid: {', '.join(cuts)}")
        after = runs[cuts[name]] if cuts[name] < len(runs) else None
        if getattr(after, "inplace", False):
            # Its input would be the feature kept for the attack, overwritten in place.
            raise ValueError(f"{name!r} is followed by an in-place {type(after).__name__} in {model.arch}; choose "
                             "the layer after it")
    weights = LayerWeights(layers)
    model.add_module(LAYER_WEIGHTS, weights)
    return weights


def learnable_step(model, x, y, cfg: LearnableConfig) -> StepResult:
    """The release's learnable multi-layer step (``main_learnable.py``; docs/method.md, "The variants"):

    ``(L_clean + (1/K) sum_k L(tail_k(h_k + w_k delta_k))) / 2 + l1 * sum_k |w_k|``

    ``h_k`` the clean feature at layer ``k`` (detached, as released, unless
    ``se_trains_head``), ``delta_k`` its own feature PGD (``steps`` steps of ``gamma / 255``
    through ``tail_k``, every layer attacked on its own), ``w`` the model's ``LayerWeights``.
    One clean pass gives every ``h_k`` (the release runs a head pass per layer: the same values
    and gradients, fewer BN running-statistics updates before the layers); the attacks, then
    the adversarial passes, then the rest of the clean pass, as released.
    """
    weights = model.get_submodule(LAYER_WEIGHTS)
    runs, cuts = layer_cuts(model)
    layers = weights.layers

    def run(h, start, stop=None):
        for stage in runs[start:stop]:
            h = stage(h)
        return h

    feats, h, done = {}, x, 0
    for name in sorted(layers, key=cuts.get):
        h = feats[name] = run(h, done, cuts[name])
        done = cuts[name]
    clean = [feats[name] if cfg.se_trains_head else feats[name].detach() for name in layers]

    def loss_at(name):
        return lambda feature: F.cross_entropy(run(feature, cuts[name]), y)

    deltas = []
    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn):
        for name, h_k in zip(layers, clean):
            adv = afan.feature_pgd(h_k, loss_at(name), steps=cfg.steps, step_size=cfg.gamma / 255, eps=cfg.eps / 255,
                                   random_start=cfg.random_start, project=cfg.project)
            deltas.append(adv - h_k.detach())

    def adversarial_loss(k):
        return lambda *features: loss_at(layers[k])(features[k] + weights.w[k] * deltas[k])

    adversarial, _ = afan.backward_each(clean, [adversarial_loss(k) for k in range(len(layers))], model.parameters())
    logits = run(h, done)
    loss = (F.cross_entropy(logits, y) + adversarial / len(layers)) / 2 + cfg.l1 * weights.w.abs().sum()
    return StepResult(loss, logits, torch.cat([d.flatten(1) for d in deltas], 1), weights.w.detach().clone())


def pixel_pgd(model, x, y, cfg: AdvPropConfig) -> torch.Tensor:
    """An L-infinity PGD image in [0, 1] around ``x`` (radius and step in units of 1/255)."""
    return afan.pixel_pgd(x, lambda images: F.cross_entropy(model(images), y), **cfg.attack())


def advprop_step(model, x, y, cfg: AdvPropConfig) -> StepResult:
    """``(L_clean + L_adv) / 2`` with pixel PGD (:class:`afan.AdvProp`); adversarial passes
    use the auxiliary BN."""
    result = afan.AdvProp(model, **cfg.attack()).step(x, y, F.cross_entropy)
    return StepResult(result.loss, result.output, result.perturbation)
