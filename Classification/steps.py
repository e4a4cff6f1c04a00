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
    """``(L_clean + mean_i L(tail(h_i))) / 2`` with ``h_i`` the strengths of a feature PGD.

    By default this is the release's step (``main_perturb.py``): the attack's passes update
    BN running statistics, the strengths start from the clean feature detached, and the
    tail runs the attack, then the adversarial pass, then the clean pass. One difference
    is kept: the release runs the head twice on the same images (feature, then the clean
    full pass), so its head BN layers take two identical running-statistics updates per
    step; here the clean pass reuses the feature, one head pass and one update.
    """
    at = cfg.layer
    h = model.head(x, at)

    def adversarial_loss(feature):
        return F.cross_entropy(model.tail(feature, at), y)

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        h_adv = afan.feature_pgd(h, adversarial_loss, steps=cfg.steps, step_size=cfg.gamma / 255,
                                 eps=cfg.eps / 255, norm=cfg.norm, random_start=cfg.random_start,
                                 project=cfg.project)

    def strength_loss(i):
        return lambda clean: adversarial_loss(afan.mixed_strength(clean, h_adv, i, cfg.mask, dim=MIX_DIMS[cfg.mix_dim]))

    # One tail pass per strength, each back-propagated at once (its graph freed).
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        # As released, the strengths start from the clean feature detached (see se_trains_head).
        clean = h if cfg.se_trains_head else h.detach()
        adversarial_sum, _ = afan.backward_each([clean], [strength_loss(i) for i in range(1, cfg.n + 1)],
                                                model.parameters())
    # The clean tail pass comes last, as released, so that the tail's BN running statistics
    # take the release's updates in the release's order.
    logits = model.tail(h, at)
    loss = (F.cross_entropy(logits, y) + adversarial_sum / cfg.n) / 2
    return StepResult(loss, logits, h_adv - h.detach())


def pixel_pgd(model, x, y, cfg: AdvPropConfig) -> torch.Tensor:
    """An L-infinity PGD image in [0, 1] around ``x`` (radius and step in units of 1/255)."""
    return afan.feature_pgd(x, lambda images: F.cross_entropy(model(images), y), steps=cfg.steps,
                            step_size=cfg.step_size / 255, eps=cfg.eps / 255,
                            random_start=cfg.random_start, project=True, bounds=(0.0, 1.0))


def advprop_step(model, x, y, cfg: AdvPropConfig) -> StepResult:
    """``(L_clean + L_adv) / 2`` with pixel PGD; adversarial passes use the auxiliary BN."""
    with afan.frozen_bn_stats(model), afan.use_aux_bn(model):
        x_adv = pixel_pgd(model, x, y, cfg)
    logits = model(x)
    with afan.use_aux_bn(model):
        loss_adv = F.cross_entropy(model(x_adv), y)
    return StepResult((F.cross_entropy(logits, y) + loss_adv) / 2, logits, x_adv - x)
