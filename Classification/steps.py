"""The loss of one training step in each mode: ``base``, ``afan`` and ``advprop``.

Each function runs the forward passes (and the attack, if any) and returns the loss to
back-propagate; the training loop owns the optimizer. Models expose ``head(x, at)`` and
``tail(h, at)`` at their named split points (see ``Classification.models``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import afan
from Classification.config import AdvPropConfig, AfanConfig

MIX_DIMS = {"channel": 1, "batch": (0, 2, 3)}


@dataclass
class StepResult:
    loss: torch.Tensor
    logits: torch.Tensor  # clean logits, for the training accuracy
    perturbation: Optional[torch.Tensor] = None  # adversarial minus clean (feature or image)


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
    result = objective.step(x, y, F.cross_entropy)
    return StepResult(result.loss, result.output, result.perturbation)


def pixel_pgd(model, x, y, cfg: AdvPropConfig) -> torch.Tensor:
    """An L-infinity PGD image in [0, 1] around ``x`` (radius and step in units of 1/255)."""
    return afan.pixel_pgd(x, lambda images: F.cross_entropy(model(images), y), **cfg.attack())


def advprop_step(model, x, y, cfg: AdvPropConfig) -> StepResult:
    """``(L_clean + L_adv) / 2`` with pixel PGD (:class:`afan.AdvProp`); adversarial passes
    use the auxiliary BN."""
    result = afan.AdvProp(model, **cfg.attack()).step(x, y, F.cross_entropy)
    return StepResult(result.loss, result.output, result.perturbation)
