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
from afan.settings import AdvPropConfig
from Segmentation.config import AfanConfig

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


def afan_step(model, images: Tensor, masks: Tensor, cfg: AfanConfig) -> StepResult:
    """A-FAN for DeepLabv3+ (docs/method.md items 1-6), the release's loss:

    ``(1 - w) L_0 + w / k * (L_1 + ... + L_n + L_sd)``

    ``L_0`` clean, ``L_i`` the tails on the ``n`` SE strengths (mixed by ``mask``), ``L_sd``
    the decoder on the SD-attacked feature (``k = n + 1``; ``n`` without SD). SD perturbs the
    ASPP output (``sd_layer="aspp"``; ``L_sd`` trains the decoder and, through the low-level
    feature, the stem) or the decoder's concatenated feature (``"concat"``; ``L_sd`` trains
    only ``classifier.classifier``). The attacks take no parameter gradient; they update BN
    running statistics as the release's do unless ``attack_bn_stats="frozen"``. Every
    adversarial pass uses the auxiliary BN when ``cfg.aux_bn``. ``losses`` holds ``loss_0``
    ... ``loss_n`` and ``loss_sd``.
    """
    at, size = cfg.se_layer, images.shape[-2:]
    h, low_level = model.head(images, at)  # clean features, reused by every pass below
    aspp_out = model.encode(h, at)
    fused = model.fuse(aspp_out, low_level)
    logits = model.classify(fused, size)
    terms = {"loss_0": segmentation_loss(logits, masks)}
    # The attacks differentiate only towards the attacked feature: the low-level feature
    # they read is a constant for them.
    fixed_low = low_level.detach()

    def se_loss(feature):
        return segmentation_loss(model.tail(feature, at, fixed_low, size), masks)

    with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        h_adv = afan.feature_pgd(h, se_loss, steps=cfg.se_steps, step_size=cfg.gamma_se / 255)

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
        # At the ASPP output the decoder still fuses in the low-level feature; the concatenated
        # feature already holds it.
        sd_clean = (aspp_out if cfg.sd_layer == "aspp" else fused).detach()

        def sd_tail(feature, low):
            return model.decode(feature, low, size) if cfg.sd_layer == "aspp" else model.classify(feature, size)

        with afan.frozen_bn_stats(model, cfg.freeze_attack_bn), afan.use_aux_bn(model, enabled=cfg.aux_bn):
            sd_adv = afan.feature_pgd(sd_clean, lambda f: segmentation_loss(sd_tail(f, fixed_low), masks),
                                      steps=cfg.sd_steps, step_size=cfg.gamma_sd / 255)
        sd_perturbation = sd_adv - sd_clean
        # The SD feature is a constant, as released: L_sd trains only what runs after it.
        sd_feature = afan.mix_statistics(sd_clean, sd_adv) if cfg.sd_mix else sd_adv
        if cfg.sd_noise:
            # As released, the noise is gamma_sd * sd_noise in feature units (not / 255).
            noise = torch.rand_like(sd_feature) * 2 - 1
            sd_feature = sd_feature + noise * (cfg.gamma_sd * cfg.sd_noise)
        with afan.use_aux_bn(model, enabled=cfg.aux_bn):
            terms["loss_sd"] = segmentation_loss(sd_tail(sd_feature, low_level), masks)
        adversarial = adversarial + terms["loss_sd"]

    loss = (1 - cfg.w) * terms["loss_0"] + cfg.w / (len(terms) - 1) * adversarial
    losses = {k: v.detach() for k, v in terms.items()}
    return StepResult(loss, logits, losses, h_adv - h.detach(), sd_perturbation)


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
