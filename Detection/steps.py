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
from torchvision.models.detection.image_list import ImageList

import afan
from afan_harness.settings import AdvPropConfig
from Detection.config import AfanConfig
from Detection.models.parts import RoiSample, Targets, forward_losses, head, predictor_losses, prepare, tail


@dataclass
class StepResult:
    loss: Tensor  # what to back-propagate
    losses: dict[str, Tensor]  # detached scalars for logging (see each step for the keys)
    se_perturbation: Optional[Tensor] = None  # SE: adversarial minus clean backbone feature
    sd_perturbation: Optional[Tensor] = None  # SD: adversarial minus clean pooled RoI features


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The detection loss: the sum of the pass's losses (torchvision's four)."""
    return sum(losses.values())


def _detached(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in losses.items()}


def base_step(model, images: list[Tensor], targets: Targets) -> StepResult:
    """Plain Faster R-CNN: the sum of torchvision's four losses (``losses`` holds them)."""
    losses = forward_losses(model, images, targets)
    return StepResult(total_loss(losses), _detached(losses))


def se_attack(model, feats, at: str, image_list, targets: Targets, cfg: AfanConfig, *,
              gamma: Optional[float] = None, eps: Optional[float] = None) -> Tensor:
    """Feature PGD on ``feats[at]`` against the total detection loss of the tail (SE):
    ``se_steps`` steps of ``gamma / 255`` (default ``gamma_se``), with the random start and
    projection of ``cfg`` in the radius ``eps / 255`` (default ``eps_se``).

    Each step re-runs RPN and RoI sampling, as the release's full forward passes did.
    Leaves parameter ``.grad`` untouched; with ``attack_bn_stats="frozen"`` also the BN
    running statistics; auxiliary BN when ``cfg.aux_bn``.
    """
    # The attack differentiates only towards feats[at]: detach the other stages (layer1,
    # which the FPN reads too) so no graph back into the head is built.
    fixed = {name: f.detach() for name, f in feats.items()}

    def loss_fn(feature):
        return total_loss(tail(model, {**fixed, at: feature}, at, image_list, targets))

    step_size = (cfg.gamma_se if gamma is None else gamma) / 255
    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return afan.feature_pgd(feats[at], loss_fn, steps=cfg.se_steps, step_size=step_size,
                                **cfg.pgd(cfg.eps_se if eps is None else eps))


def sd_attack(model, sample: RoiSample, rpn_losses: Tensor, cfg: AfanConfig) -> Tensor:
    """Feature PGD (SD) on the clean pass's RoI-head output (the box features the class and
    box linears read), on the clean pass's sampled RoIs, as released. Its loss is the RoI
    losses, plus the clean ``rpn_losses`` unless ``only_roi``, as released; those do not
    depend on the box features, so both give the same perturbation."""
    constant = 0 if cfg.only_roi else rpn_losses.detach()

    def loss_fn(box_features):
        return total_loss(predictor_losses(model.roi_heads, box_features, sample.labels, sample.regression_targets)) + constant

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return afan.feature_pgd(sample.box_features, loss_fn, steps=cfg.sd_steps, step_size=cfg.gamma_sd / 255,
                                **cfg.pgd(cfg.eps_sd))


def sd_term(model, clean: dict[str, Tensor], roi: RoiSample, cfg: AfanConfig) -> tuple[Tensor, Tensor]:
    """``L_sd`` of the clean pass's losses ``clean`` and RoIs ``roi`` (SD attack, optional
    mixing and noise, the box predictor's losses, plus the clean RPN losses) and the SD
    perturbation."""
    clean_box = roi.box_features.detach()
    rpn_losses = clean["loss_objectness"] + clean["loss_rpn_box_reg"]
    box_adv = sd_attack(model, roi, rpn_losses, cfg)
    # As released, the SD feature is detached: its RoI losses train the class and box
    # linears, and L_sd adds the clean pass's RPN losses.
    sd_feature = afan.mix_statistics(clean_box, box_adv) if cfg.sd_mix else box_adv
    if cfg.sd_noise:
        noise = torch.rand_like(sd_feature) * 2 - 1
        sd_feature = sd_feature + noise * (cfg.gamma_sd * cfg.sd_noise)
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        loss_sd = total_loss(predictor_losses(model.roi_heads, sd_feature, roi.labels, roi.regression_targets))
    return loss_sd + rpn_losses, box_adv - clean_box


def input_pgd_term(model, images: list[Tensor], targets: Targets, cfg: AfanConfig) -> Tensor:
    """``L(x_adv)``, the total detection loss of pixel PGD images (``cfg.input_pgd``, the
    release's ``attack_algo.adv_input``), the attack's passes as A-FAN's (``attack_bn_stats``)."""
    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn):
        adv = afan.pixel_pgd(images, lambda x: total_loss(forward_losses(model, x, targets)), **cfg.input_pgd.attack())
    return total_loss(forward_losses(model, adv, targets))


def afan_step(model, images: list[Tensor], targets: Targets, cfg: AfanConfig) -> StepResult:
    """A-FAN for Faster R-CNN, the release's step and loss:

    ``(L_0 + L_1 + ... + L_n) / 3 * (1 - w) + L_sd / 3 * w``

    ``L_0`` clean, ``L_i`` the tails on the ``n`` SE strengths (mixed by ``mask``) built from
    the clean feature detached (so they train the layers after the split point only, unless
    ``se_trains_head``), ``L_sd`` the RoI losses on the SD features (detached: they train the
    class and box linears) plus the clean RPN losses. The ``/ 3`` is the release's constant,
    kept as released (it is not ``/ (n + 1)``); without SD (``sd=False``) the loss is
    ``(L_0 + ... + L_n) / 3``. With ``cfg.multi.layers`` the step is :func:`multi_layer_step`;
    with ``cfg.input_pgd`` the PGD images' loss replaces ``L_0`` or is added (docs/method.md,
    "The variants"). With ``cfg.batched`` the strengths run as one tail pass
    (:func:`_joined_strengths`). ``losses`` holds the clean pass's four losses and ``loss_0``
    ... ``loss_n`` (batched: ``loss_strengths``, their mean), ``loss_sd`` (and
    ``loss_input_pgd``).
    """
    if cfg.multi.layers:
        return multi_layer_step(model, images, targets, cfg)
    pgd_loss = input_pgd_term(model, images, targets, cfg) if cfg.input_pgd.enabled else None
    image_list, targets = prepare(model, images, targets)
    at = cfg.se_layer
    feats = head(model, image_list.tensors, at)  # clean features, reused by every pass below
    clean, roi = tail(model, feats, at, image_list, targets, return_roi=True)
    terms = {"loss_0": pgd_loss if cfg.input_pgd.replaces_clean else total_loss(clean)}

    # SE: attack, strengths, adversarial feature normalization, one tail pass each, each
    # back-propagated at once (its graph freed) towards the shared clean features. As
    # released, the strengths start from the clean feature detached; the other stages the
    # tail reads (FPN levels below the split) stay attached.
    h = feats[at]
    h_adv = se_attack(model, feats, at, image_list, targets, cfg)
    shared = {**feats, at: h if cfg.se_trains_head else h.detach()}
    names = list(shared)

    passes = ([_joined_strengths(model, names, at, h_adv, cfg, image_list, targets)] if cfg.batched
              else [_strength_tail(model, names, at, h_adv, i, cfg.mask, image_list, targets)
                    for i in range(1, cfg.n + 1)])
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        strengths_loss, values = afan.backward_each([shared[k] for k in names], passes, model.parameters())
    if cfg.batched:
        terms["loss_strengths"] = values[0] / cfg.n
    else:
        terms.update({f"loss_{i}": value for i, value in enumerate(values, start=1)})
    loss = (terms["loss_0"] + strengths_loss) / 3

    sd_perturbation = None
    if cfg.sd:
        terms["loss_sd"], sd_perturbation = sd_term(model, clean, roi, cfg)
        loss = loss * (1 - cfg.w) + terms["loss_sd"] / 3 * cfg.w
    if pgd_loss is not None:
        terms["loss_input_pgd"] = pgd_loss
    loss = cfg.input_pgd.total(loss, pgd_loss)
    return StepResult(loss, {**_detached(clean), **_detached(terms)}, (h_adv - h.detach()), sd_perturbation)


def _joined_strengths(model, names: list[str], at: str, h_adv: Tensor, cfg: AfanConfig, image_list, targets: Targets):
    """``cfg.batched``: the sum of the ``n`` strengths' losses from one tail pass over the
    ``n × B`` images, each image once per strength (as a function of the shared features
    named ``names``, for ``afan.backward_each``). Every image samples its own anchors and RoIs,
    and the RPN and RoI losses average over the sampled ones, so the joined pass's loss is the
    mean of the ``n`` passes' wherever each image samples its full count (``roi_batch_size``
    RoIs, 256 anchors), as on real data; the tail's layers must treat each image on its own
    (frozen BatchNorm, ``afan.per_sample_only``)."""
    n = cfg.n

    def loss(*inputs):
        inputs = dict(zip(names, inputs))
        feats = {name: torch.cat([feature] * n) for name, feature in inputs.items()}
        feats[at] = torch.cat([afan.mixed_strength(inputs[at], h_adv, i, cfg.mask) for i in range(1, n + 1)])
        images = ImageList(torch.cat([image_list.tensors] * n), list(image_list.image_sizes) * n)
        with afan.per_sample_only(model):
            return n * total_loss(tail(model, feats, at, images, list(targets) * n))
    return loss


def _strength_tail(model, names: list[str], at: str, h_adv: Tensor, i: int, mask: str, image_list,
                   targets: Targets):
    """The loss of the tail on strength ``i`` of ``len(mask)`` between the clean feature and
    ``h_adv`` (re-normalised to the adversarial statistics where ``mask[i - 1]`` is "1"), as a
    function of the shared features named ``names`` (for ``afan.backward_each``)."""
    def loss(*inputs):
        inputs = dict(zip(names, inputs))
        feature = afan.mixed_strength(inputs[at], h_adv, i, mask)
        return total_loss(tail(model, {**inputs, at: feature}, at, image_list, targets))
    return loss


def multi_layer_step(model, images: list[Tensor], targets: Targets, cfg: AfanConfig) -> StepResult:
    """SE at several backbone stages at once (``cfg.multi``; the release's
    ``train_aug_muti_final.py``), the release's step and loss:

    ``weights[0] L_0 + weights[1] L_1 + ... + weights[K] L_K + weights[K+1] L_sd``

    For each stage ``k`` of ``multi.layers``: its clean feature (a head pass of its own, as
    released), ``se_steps`` PGD steps of ``multi.gammas[k] / 255`` (``multi.eps[k] / 255``
    for the random start and projection), the adversarial feature itself (mixed where
    ``multi.mask[k]`` is "1") built from the clean feature detached (unless
    ``se_trains_head``), one tail pass: ``L_k``. ``L_0`` and ``L_sd`` as in
    :func:`afan_step` (``L_0``: the PGD images' loss with ``cfg.input_pgd``, the release's
    ``train_aug_muti_advt.py``). ``losses``: the clean pass's four losses, ``loss_0``,
    ``loss_<stage>`` for each stage, ``loss_sd`` (and ``loss_input_pgd``);
    ``se_perturbation``: every stage's perturbation, flattened and concatenated per image.
    """
    m = cfg.multi
    pgd_loss = input_pgd_term(model, images, targets, cfg) if cfg.input_pgd.enabled else None
    image_list, targets = prepare(model, images, targets)
    deepest = max(m.layers, key=model.split_points.index)
    clean_feats = head(model, image_list.tensors, deepest)  # the clean pass's head, reused by its stage
    clean, roi = tail(model, clean_feats, deepest, image_list, targets, return_roi=True)
    terms = {"loss_0": pgd_loss if cfg.input_pgd.replaces_clean else total_loss(clean)}
    loss = m.weights[0] * terms["loss_0"]
    perturbations = []
    for k, at in enumerate(m.layers):
        feats = clean_feats if at == deepest else head(model, image_list.tensors, at)
        h = feats[at]
        h_adv = se_attack(model, feats, at, image_list, targets, cfg, gamma=m.gammas[k], eps=m.eps[k])
        perturbations.append((h_adv - h.detach()).flatten(1))
        shared = {**feats, at: h if cfg.se_trains_head else h.detach()}
        stage_loss = _strength_tail(model, list(shared), at, h_adv, 1, m.mask[k], image_list, targets)
        total, (terms[f"loss_{at}"],) = afan.backward_each(list(shared.values()), [stage_loss], model.parameters())
        loss = loss + m.weights[k + 1] * total

    sd_perturbation = None
    if cfg.sd:
        terms["loss_sd"], sd_perturbation = sd_term(model, clean, roi, cfg)
        loss = loss + m.weights[-1] * terms["loss_sd"]
    if pgd_loss is not None:
        terms["loss_input_pgd"] = pgd_loss
    loss = cfg.input_pgd.total(loss, pgd_loss)
    return StepResult(loss, {**_detached(clean), **_detached(terms)}, torch.cat(perturbations, 1), sd_perturbation)


def pixel_pgd(model, images: list[Tensor], targets: Targets, cfg: AdvPropConfig) -> list[Tensor]:
    """L-infinity PGD images in [0, 1] around ``images`` against the total detection loss
    (radius and step in units of 1/255; images may differ in size, see ``afan.pixel_pgd``)."""
    return afan.pixel_pgd(images, lambda adv: total_loss(forward_losses(model, adv, targets)), **cfg.attack())


def advprop_step(model, images: list[Tensor], targets: Targets, cfg: AdvPropConfig) -> StepResult:
    """AdvProp (:class:`afan.AdvProp`): ``(L_clean + L_adv) / 2`` with pixel PGD; the attack
    and the adversarial pass use the auxiliary BN, so the model must have been converted with
    ``afan.convert_aux_bn`` (needs ``norm="bn"``). ``losses``: the clean pass's four
    losses, ``loss_clean`` and ``loss_adv``."""
    objective = afan.AdvProp(model, **cfg.attack(), forward=forward_losses)
    result = objective.step(images, targets, lambda losses, _: total_loss(losses))
    return StepResult(result.loss, {**_detached(result.output), **result.losses})
