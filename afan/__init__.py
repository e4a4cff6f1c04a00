"""afan: adversarial feature augmentation and normalization (A-FAN) with auxiliary
adversarial BatchNorm (AdvProp), for any PyTorch vision model.

In one call, for any model split at a named module (see ``afan.split``)::

    objective = afan.AFAN(model, "layer2", steps=5, step_size=0.5 / 255, n=2, mask="01")
    objective.loss(x, y, F.cross_entropy).backward()

The method in five calls::

    h = head(x)                                            # clean feature
    with afan.frozen_bn_stats(model):                      # optional: attack leaves BN stats alone
        h_adv = afan.feature_pgd(h, lambda f: loss(tail(f), y), steps=5, step_size=0.5 / 255)
    clean = h.detach()                                     # as released: strengths train the tail
    feats = afan.interpolate(clean, h_adv, n=2)            # several strengths
    feats = afan.mix_by_mask(clean, feats, "01")           # adversarial feature normalization
    with afan.use_aux_bn(model):                           # auxiliary BN for adversarial passes
        loss_adv = sum(loss(tail(f), y) for f in feats)
"""
from .batched import batch_strengths, per_sample_only
from .input_norm import Normalize
from .norm import (
    AuxBatchNorm2d,
    AuxNorm,
    convert_aux_bn,
    convert_aux_norm,
    frozen_bn_stats,
    mix_by_mask,
    mix_statistics,
    mixed_strength,
    strip_aux_bn,
    strip_aux_state_dict,
    use_aux_bn,
)
from .objectives import AFAN, AdvProp, pixel_pgd
from .passes import backward_each, loss_scale
from .perturb import feature_pgd, interpolate, strength
from .split import split

__version__ = "0.1.0"

__all__ = [
    "AFAN",
    "AdvProp",
    "AuxBatchNorm2d",
    "AuxNorm",
    "Normalize",
    "backward_each",
    "batch_strengths",
    "convert_aux_bn",
    "convert_aux_norm",
    "feature_pgd",
    "frozen_bn_stats",
    "interpolate",
    "loss_scale",
    "mix_by_mask",
    "mix_statistics",
    "mixed_strength",
    "per_sample_only",
    "pixel_pgd",
    "split",
    "strip_aux_bn",
    "strip_aux_state_dict",
    "strength",
    "use_aux_bn",
]
