"""The loss of one segmentation training step in each mode: ``base``, ``afan`` and ``advprop``.

Each function runs the forward passes (and the attacks, if any) and returns a ``StepResult``;
the training loop owns the optimizer. Images are [0, 1] batches ``[N, 3, H, W]``, masks
``[N, H, W]`` class ids with 255 ignored. The passes are the model's ``head`` (clean features,
once per step), ``encode`` (rest of the backbone and ASPP), ``fuse`` (the decoder's
concatenated feature) and ``classify`` (see ``Segmentation.models.deeplab``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import afan
from afan_harness.settings import AdvPropConfig
from Segmentation.config import AfanConfig
from Segmentation.models.deeplab import SPLIT_POINTS

IGNORE_INDEX = 255


@dataclass
class StepResult:
    loss: Tensor  # what to back-propagate
    logits: Tensor  # the clean pass's logits, for training metrics
    losses: dict[str, Tensor]  # detached scalars for logging (see each step for the keys)
    perturbation: Optional[Tensor] = None  # SE feature (afan) or image (advprop): adversarial minus clean
    sd_perturbation: Optional[Tensor] = None  # SD: adversarial minus clean feature (ASPP output or concat)


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean cross-entropy over the pixels that are not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def base_step(model, images: Tensor, masks: Tensor) -> StepResult:
    logits = model(images)
    loss = segmentation_loss(logits, masks)
    return StepResult(loss, logits, {"loss_0": loss.detach()})


def input_pgd_term(model, images: Tensor, masks: Tensor, cfg: AfanConfig) -> tuple[Tensor, Tensor]:
    """``(L(x_adv), logits)`` of pixel PGD images (``cfg.input_pgd``, the release's
    ``attack_algo.adv_input``), the attack's passes as A-FAN's (``attack_bn_stats``)."""
    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn):
        adv = afan.pixel_pgd(images, lambda x: segmentation_loss(model(x), masks), **cfg.input_pgd.attack())
    logits = model(adv)
    return segmentation_loss(logits, masks), logits


def se_attack(model, h: Tensor, at: str, low_level: Tensor, masks: Tensor, size, cfg: AfanConfig, *,
              gamma: float, eps: float) -> Tensor:
    """Feature PGD on the backbone feature ``h`` after ``at`` through the rest of the network
    (the decoder reading the clean ``low_level`` feature, a constant here): ``se_steps`` steps
    of ``gamma / 255``, radius ``eps / 255`` for the random start and projection."""
    fixed_low = low_level.detach()

    def se_loss(feature):
        return segmentation_loss(model.tail(feature, at, fixed_low, size), masks)

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return afan.feature_pgd(h, se_loss, steps=cfg.se_steps, step_size=gamma / 255, **cfg.pgd(eps))


def sd_term(model, aspp_out: Tensor, fused: Tensor, low_level: Tensor, masks: Tensor, size,
            cfg: AfanConfig) -> tuple[Tensor, Tensor]:
    """``(L_sd, perturbation)``: the decoder PGD at ``cfg.sd_layer`` (the ASPP output or the
    concatenated feature ``fused``), optional mixing and noise, the decoder's loss on it."""
    # At the ASPP output the decoder still fuses in the low-level feature; the concatenated
    # feature already holds it.
    sd_clean = (aspp_out if cfg.sd_layer == "aspp" else fused).detach()
    fixed_low = low_level.detach()

    def sd_tail(feature, low):
        return model.decode(feature, low, size) if cfg.sd_layer == "aspp" else model.classify(feature, size)

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        sd_adv = afan.feature_pgd(sd_clean, lambda f: segmentation_loss(sd_tail(f, fixed_low), masks),
                                  steps=cfg.sd_steps, step_size=cfg.gamma_sd / 255, **cfg.pgd(cfg.eps_sd))
    # The SD feature is a constant, as released: L_sd trains only what runs after it.
    sd_feature = afan.mix_statistics(sd_clean, sd_adv) if cfg.sd_mix else sd_adv
    if cfg.sd_noise:
        # As released, the noise is gamma_sd * sd_noise in feature units (not / 255).
        noise = torch.rand_like(sd_feature) * 2 - 1
        sd_feature = sd_feature + noise * (cfg.gamma_sd * cfg.sd_noise)
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        return segmentation_loss(sd_tail(sd_feature, low_level), masks), sd_adv - sd_clean


def afan_step(model, images: Tensor, masks: Tensor, cfg: AfanConfig) -> StepResult:
    """A-FAN for DeepLabv3+ (docs/method.md items 1-6), the release's loss:

    ``(1 - w) L_0 + w / k * (L_1 + ... + L_n + L_sd)``

    ``L_0`` clean, ``L_i`` the tails on the ``n`` SE strengths (mixed by ``mask``), ``L_sd``
    the decoder on the SD-attacked feature (``k = n + 1``; ``n`` without SD). SD perturbs the
    ASPP output (``sd_layer="aspp"``; ``L_sd`` trains the decoder and, through the low-level
    feature, the stem) or the decoder's concatenated feature (``"concat"``; ``L_sd`` trains
    only ``classifier.classifier``). The attacks take no parameter gradient; they update BN
    running statistics as the release's do unless ``attack_bn_stats="frozen"``. Every
    adversarial pass uses the auxiliary BN when ``cfg.aux_bn``. With ``cfg.multi.layers`` the
    step is :func:`multi_layer_step`; with ``cfg.input_pgd`` the PGD images' loss replaces
    ``L_0`` (their logits then the step's ``logits``) or is added (docs/method.md, "The variants").
    ``losses`` holds ``loss_0`` ... ``loss_n`` and ``loss_sd`` (and ``loss_input_pgd``).
    """
    if cfg.multi.layers:
        return multi_layer_step(model, images, masks, cfg)
    pgd = input_pgd_term(model, images, masks, cfg) if cfg.input_pgd.enabled else None
    at, size = cfg.se_layer, images.shape[-2:]
    h, low_level = model.head(images, at)  # clean features, reused by every pass below
    aspp_out = model.encode(h, at)
    fused = model.fuse(aspp_out, low_level)
    logits, terms = _clean_term(model, fused, masks, size, pgd, cfg)
    h_adv = se_attack(model, h, at, low_level, masks, size, cfg, gamma=cfg.gamma_se, eps=cfg.eps_se)

    def strength_loss(i):
        def loss(clean, low):
            return segmentation_loss(model.tail(afan.mixed_strength(clean, h_adv, i, cfg.mask), at, low, size), masks)
        return loss

    # One tail pass per strength, each back-propagated at once (its graph freed). As
    # released, the strengths start from the clean feature detached (see se_trains_head)
    # while the low-level feature the decoder reads stays attached.
    clean = h if cfg.se_trains_head else h.detach()
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        adversarial, values = afan.backward_each([clean, low_level], [strength_loss(i) for i in range(1, cfg.n + 1)],
                                                 model.parameters())
    terms.update({f"loss_{i}": value for i, value in enumerate(values, start=1)})

    sd_perturbation = None
    if cfg.sd:
        terms["loss_sd"], sd_perturbation = sd_term(model, aspp_out, fused, low_level, masks, size, cfg)
        adversarial = adversarial + terms["loss_sd"]

    adversarial_terms = cfg.n + cfg.sd
    loss = (1 - cfg.w) * terms["loss_0"] + cfg.w / adversarial_terms * adversarial
    return _result(loss, logits, terms, pgd, cfg, h_adv - h.detach(), sd_perturbation)


def multi_layer_step(model, images: Tensor, masks: Tensor, cfg: AfanConfig) -> StepResult:
    """SE at several backbone stages at once (``cfg.multi``; the release's
    ``main_aug_muti_clean.py``, with ``--mix_all`` the mask of ones and ``sd_mix``), the
    release's loss:

    ``weights[0] L_0 + weights[1] L_1 + ... + weights[K] L_K + weights[K+1] L_sd``

    For each stage ``k`` of ``multi.layers``: its clean feature (a head pass of its own, as
    released), ``se_steps`` PGD steps of ``multi.gammas[k] / 255`` (``multi.eps[k] / 255``
    for the random start and projection), the adversarial feature itself (mixed where
    ``multi.mask[k]`` is "1") built from the clean feature detached (unless
    ``se_trains_head``), one tail pass reading the attached clean low-level feature:
    ``L_k``. ``L_0`` and ``L_sd`` as in :func:`afan_step` (``L_0``: the PGD images' loss with
    ``cfg.input_pgd``, the release's ``main_aug_muti_advt.py``). ``losses``: ``loss_0``,
    ``loss_<stage>`` for each stage, ``loss_sd`` (and ``loss_input_pgd``); ``perturbation``:
    every stage's perturbation, flattened and concatenated per image.
    """
    m, size = cfg.multi, images.shape[-2:]
    pgd = input_pgd_term(model, images, masks, cfg) if cfg.input_pgd.enabled else None
    deepest = max(m.layers, key=SPLIT_POINTS.index)
    h_deepest, low_level = model.head(images, deepest)  # the clean pass's head, reused by its stage
    aspp_out = model.encode(h_deepest, deepest)
    fused = model.fuse(aspp_out, low_level)
    logits, terms = _clean_term(model, fused, masks, size, pgd, cfg)
    loss = m.weights[0] * terms["loss_0"]
    perturbations = []
    for k, at in enumerate(m.layers):
        h = h_deepest if at == deepest else model.head(images, at).feature
        h_adv = se_attack(model, h, at, low_level, masks, size, cfg, gamma=m.gammas[k], eps=m.eps[k])
        perturbations.append((h_adv - h.detach()).flatten(1))
        stage_loss = _adversarial_tail(model, at, h_adv, m.mask[k], masks, size)
        clean = h if cfg.se_trains_head else h.detach()
        total, (terms[f"loss_{at}"],) = afan.backward_each([clean, low_level], [stage_loss], model.parameters())
        loss = loss + m.weights[k + 1] * total

    sd_perturbation = None
    if cfg.sd:
        terms["loss_sd"], sd_perturbation = sd_term(model, aspp_out, fused, low_level, masks, size, cfg)
        loss = loss + m.weights[-1] * terms["loss_sd"]
    return _result(loss, logits, terms, pgd, cfg, torch.cat(perturbations, 1), sd_perturbation)


def _adversarial_tail(model, at: str, h_adv: Tensor, mix: str, masks: Tensor, size):
    """The loss of the tail on ``h_adv`` (re-normalised to the clean statistics where ``mix``
    is "1"), as a function of the clean feature and the low-level one (for ``afan.backward_each``)."""
    def loss(clean, low):
        return segmentation_loss(model.tail(afan.mixed_strength(clean, h_adv, 1, mix), at, low, size), masks)
    return loss


def _clean_term(model, fused: Tensor, masks: Tensor, size, pgd, cfg: AfanConfig) -> tuple[Tensor, dict]:
    """``(logits, {"loss_0": L_0})``: the clean pass's, or the PGD images' where they replace
    it (``pgd``: ``input_pgd_term``'s result, or None)."""
    if cfg.input_pgd.replaces_clean:
        loss, logits = pgd
        return logits, {"loss_0": loss}
    logits = model.classify(fused, size)
    return logits, {"loss_0": segmentation_loss(logits, masks)}


def _result(loss: Tensor, logits: Tensor, terms: dict, pgd, cfg: AfanConfig, perturbation, sd_perturbation):
    """The step's result: ``loss`` with the input PGD images' loss weighted in (``pgd``, or
    None without ``input_pgd``), the terms detached."""
    if pgd is not None:
        terms["loss_input_pgd"] = pgd[0]
    loss = cfg.input_pgd.total(loss, None if pgd is None else pgd[0])
    losses = {k: v.detach() for k, v in terms.items()}
    return StepResult(loss, logits, losses, perturbation, sd_perturbation)


def pixel_pgd(model, images: Tensor, masks: Tensor, cfg: AdvPropConfig) -> Tensor:
    """An L-infinity PGD image batch in [0, 1] around ``images`` (radius and step in 1/255)."""
    return afan.pixel_pgd(images, lambda x: segmentation_loss(model(x), masks), **cfg.attack())


def advprop_step(model, images: Tensor, masks: Tensor, cfg: AdvPropConfig) -> StepResult:
    """AdvProp (:class:`afan.AdvProp`): ``(L_clean + L_adv) / 2`` with pixel PGD; the attack and
    the adversarial pass use the auxiliary BN (convert the model with ``afan.convert_aux_bn``);
    the attack leaves BN running statistics alone (AdvProp is not part of the release)."""
    objective = afan.AdvProp(model, **cfg.attack())
    result = objective.step(images, masks, segmentation_loss)
    return StepResult(result.loss, result.output, result.losses, result.perturbation)
