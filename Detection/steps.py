"""The loss of one detection training step in each mode: ``base``, ``afan`` and ``advprop``.

Each function runs the forward passes (and the attacks, if any) and returns a
``StepResult``; the training loop owns the optimizer. Images are lists of [0, 1] tensors,
targets dicts with ``boxes`` (xyxy, pixels) and ``labels`` (>= 1), as for torchvision.
The passes are ``Detection.models.parts``: ``prepare`` → ``head`` (clean features, once per
step) → ``tail`` (from a clean or perturbed feature).

The release ran a separate forward pass for each thing it needed (the SE feature, the SD
feature with its RPN losses, the clean losses); with frozen or batch-statistics BN these are
the same computations, so here one clean pass serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import afan
from afan.settings import AdvPropConfig
from Detection.config import AfanConfig
from Detection.models.parts import RoiSample, Targets, forward_losses, head, predictor_losses, prepare, tail


@dataclass
class StepResult:
    loss: Tensor  # what to back-propagate
    losses: dict[str, Tensor]  # detached scalars for logging (see each step for the keys)
    se_perturbation: Optional[Tensor] = None  # SE: adversarial minus clean backbone feature
    sd_perturbation: Optional[Tensor] = None  # SD: adversarial minus clean pooled RoI features


def _total(losses: dict[str, Tensor]) -> Tensor:
    return sum(losses.values())


def _detached(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in losses.items()}


def base_step(model, images: list[Tensor], targets: Targets) -> StepResult:
    """Plain Faster R-CNN: the sum of torchvision's four losses (``losses`` holds them)."""
    losses = forward_losses(model, images, targets)
    return StepResult(_total(losses), _detached(losses))


def se_attack(model, feats, at: str, image_list, targets: Targets, cfg: AfanConfig) -> Tensor:
    """Feature PGD on ``feats[at]`` against the total detection loss of the tail (SE).

    Each step re-runs RPN and RoI sampling, as the release's full forward passes did.
    Leaves parameter ``.grad`` untouched; with ``attack_bn_stats="frozen"`` also the BN
    running statistics; auxiliary BN when ``cfg.aux_bn``.
    """
    # The attack differentiates only towards feats[at]: detach the other stages (layer1,
    # which the FPN reads too) so no graph back into the head is built.
    fixed = {name: f.detach() for name, f in feats.items()}

    def loss_fn(feature):
        return _total(tail(model, {**fixed, at: feature}, at, image_list, targets))

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return afan.feature_pgd(feats[at], loss_fn, steps=cfg.se_steps, step_size=cfg.gamma_se / 255,
                                eps=cfg.eps_se / 255)


def sd_attack(model, sample: RoiSample, rpn_losses: Tensor, cfg: AfanConfig) -> Tensor:
    """Feature PGD (SD) on the clean pass's RoI-head output (the box features the class and
    box linears read), on the clean pass's sampled RoIs, as released. Its loss is the RoI
    losses, plus the clean ``rpn_losses`` unless ``only_roi``, as released; those do not
    depend on the box features, so both give the same perturbation."""
    constant = 0 if cfg.only_roi else rpn_losses.detach()

    def loss_fn(box_features):
        return _total(predictor_losses(model.roi_heads, box_features, sample.labels, sample.regression_targets)) + constant

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return afan.feature_pgd(sample.box_features, loss_fn, steps=cfg.sd_steps, step_size=cfg.gamma_sd / 255)


def afan_step(model, images: list[Tensor], targets: Targets, cfg: AfanConfig) -> StepResult:
    """A-FAN for Faster R-CNN, the release's step and loss:

    ``(L_0 + L_1 + ... + L_n) / 3 * (1 - w) + L_sd / 3 * w``

    ``L_0`` clean, ``L_i`` the tails on the ``n`` SE strengths (mixed by ``mask``) built from
    the clean feature detached (so they train the layers after the split point only, unless
    ``se_trains_head``), ``L_sd`` the RoI losses on the SD features (detached: they train the
    class and box linears) plus the clean RPN losses. The ``/ 3`` is the release's constant,
    kept as released (it is not ``/ (n + 1)``); without SD (``sd=False``) the loss is
    ``(L_0 + ... + L_n) / 3``. ``losses`` holds the clean pass's four losses and ``loss_0``
    ... ``loss_n``, ``loss_sd``.
    """
    image_list, targets = prepare(model, images, targets)
    at = cfg.se_layer
    feats = head(model, image_list.tensors, at)  # clean features, reused by every pass below
    clean, roi = tail(model, feats, at, image_list, targets, return_roi=True)
    terms = {"loss_0": _total(clean)}

    # SE: attack, strengths, adversarial feature normalization, one tail pass each, each
    # back-propagated at once (its graph freed) towards the shared clean features. As
    # released, the strengths start from the clean feature detached; the other stages the
    # tail reads (FPN levels below the split) stay attached.
    h = feats[at]
    h_adv = se_attack(model, feats, at, image_list, targets, cfg)
    shared = {**feats, at: h if cfg.se_trains_head else h.detach()}
    names = list(shared)

    def strength_loss(i):
        def loss(*inputs):
            inputs = dict(zip(names, inputs))
            feature = afan.mixed_strength(inputs[at], h_adv, i, cfg.mask)
            return _total(tail(model, {**inputs, at: feature}, at, image_list, targets))
        return loss

    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        strengths_loss, values = afan.backward_each([shared[k] for k in names],
                                                    [strength_loss(i) for i in range(1, cfg.n + 1)],
                                                    model.parameters())
    terms.update({f"loss_{i}": value for i, value in enumerate(values, start=1)})
    loss = (terms["loss_0"] + strengths_loss) / 3

    sd_perturbation = None
    if cfg.sd:
        clean_box = roi.box_features.detach()
        rpn_losses = clean["loss_objectness"] + clean["loss_rpn_box_reg"]
        box_adv = sd_attack(model, roi, rpn_losses, cfg)
        sd_perturbation = box_adv - clean_box
        # As released, the SD feature is detached: its RoI losses train the class and box
        # linears, and L_sd adds the clean pass's RPN losses.
        sd_feature = afan.mix_statistics(clean_box, box_adv) if cfg.sd_mix else box_adv
        if cfg.sd_noise:
            noise = torch.rand_like(sd_feature) * 2 - 1
            sd_feature = sd_feature + noise * (cfg.gamma_sd * cfg.sd_noise)
        with afan.use_aux_bn(model, enabled=cfg.aux_bn):
            loss_sd = _total(predictor_losses(model.roi_heads, sd_feature, roi.labels, roi.regression_targets))
        terms["loss_sd"] = loss_sd + rpn_losses
        loss = loss * (1 - cfg.w) + terms["loss_sd"] / 3 * cfg.w
    return StepResult(loss, {**_detached(clean), **_detached(terms)}, (h_adv - h.detach()), sd_perturbation)


def pixel_pgd(model, images: list[Tensor], targets: Targets, cfg: AdvPropConfig) -> list[Tensor]:
    """L-infinity PGD images in [0, 1] around ``images`` against the total detection loss
    (radius and step in units of 1/255; images may differ in size, see ``afan.pixel_pgd``)."""
    return afan.pixel_pgd(images, lambda adv: _total(forward_losses(model, adv, targets)), **cfg.attack())


def advprop_step(model, images: list[Tensor], targets: Targets, cfg: AdvPropConfig) -> StepResult:
    """AdvProp (:class:`afan.AdvProp`): ``(L_clean + L_adv) / 2`` with pixel PGD; the attack
    and the adversarial pass use the auxiliary BN, so the model must have been converted with
    ``afan.convert_aux_bn`` (needs ``norm="bn"``). ``losses``: the clean pass's four
    losses, ``loss_clean`` and ``loss_adv``."""
    objective = afan.AdvProp(model, **cfg.attack(), forward=forward_losses)
    result = objective.step(images, targets, lambda losses, _: _total(losses))
    return StepResult(result.loss, {**_detached(result.output), **result.losses})
