"""Settings of a detection run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan.config``). Defaults are the VOC2007 release's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from afan.settings import ReleaseSwitches, check_nonnegative, check_strengths
from Detection.models.faster_rcnn import SPLIT_POINTS, check_name, model_settings


@dataclass
class ModelConfig:
    """``Detection.models.create_model`` arguments (num_classes comes from the data). A setting
    left at null takes the architecture family's value (``Detection.models.DEFAULTS``): the
    release's for the C4 models, torchvision's for the FPN ones."""

    name: str = "fasterrcnn_resnet50_c4"
    min_size: Optional[int] = None  # shorter image side after resizing (C4: 600, the VOC release)
    max_size: Optional[int] = None  # longer side at most (C4: 1000)
    anchor_sizes: Optional[list] = None  # C4: sizes on its one map; FPN: one per level
    trainable_layers: int = 3  # ResNet stages trained, counted from the last (3: conv1..layer1 frozen)
    norm: Literal["frozen", "bn"] = "frozen"  # "bn": trainable BatchNorm, which auxiliary BN needs
    roi_batch_size: Optional[int] = None  # RoIs sampled per training image (C4: 128)
    representation_size: Optional[int] = None  # FPN only: width of the box head's two layers
    rpn_pre_nms_top_n: Optional[list[int]] = None  # [training, test] (C4: [12000, 6000])
    rpn_post_nms_top_n: Optional[list[int]] = None  # [training, test] (C4: [2000, 300])
    rpn_smooth_l1_beta: Optional[float] = None  # C4: 1.0 (the release's COCO runs: 1/9)
    roi_smooth_l1_beta: Optional[float] = None  # C4: 1.0
    box_nms_thresh: Optional[float] = None  # class-wise NMS of the detections (C4: 0.3)
    roi_pool_size: Optional[int] = None  # C4 only: RoIAlign side, max-pooled to half (C4: 14)
    # A torchvision ImageNet ResNet state dict (e.g. resnet50-0676ba61.pth), read from disk:
    # the released runs start from one. Empty: random initialisation.
    backbone_weights: str = ""

    def __post_init__(self):
        check_name(self.name)
        model_settings(self.name, **self.settings())

    def settings(self) -> dict:
        """The ``model_settings`` / ``create_model`` keywords these fields give."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("name", "backbone_weights")}


@dataclass
class AfanConfig(ReleaseSwitches):
    """A-FAN for detection, the VOC2007 release's settings (``train_aug_final.py`` and
    ``sh/voc2007/clean50/090_final_setting1.sh``).

    SE: feature PGD after backbone stage ``se_layer``, ``se_steps`` steps of
    ``gamma_se / 255`` (no random start, no projection, as released; ``eps_se`` is kept
    for reference only), ``n`` strengths mixed by ``mask``, built from the clean feature
    detached. SD: PGD on the RoI head's output (the box features the class and box linears
    read), ``sd_steps`` steps of ``gamma_sd / 255``; ``sd_mix`` re-normalises the clean box
    features with the adversarial statistics, ``sd_noise`` adds uniform noise in
    ``[-1, 1] * gamma_sd * sd_noise`` (the release's formula). ``only_roi`` is the release's
    ``--only_roi_sd``: the SD attack's loss is the RoI losses only, else also the RPN losses,
    which do not depend on the box features, so both give the same perturbation (in the
    release too); L_sd always includes the clean RPN losses. Loss:
    ``(L_0 + ... + L_n) / 3 * (1 - w) + L_sd / 3 * w``. ``attack_bn_stats``,
    ``se_trains_head``: see ``afan.settings.ReleaseSwitches``.
    """

    se_layer: str = "layer2"
    se_steps: int = 1
    gamma_se: float = 1.0
    eps_se: float = 2.0
    n: int = 4
    mask: str = "0011"
    sd: bool = True
    sd_steps: int = 1
    gamma_sd: float = 0.1
    sd_mix: bool = False
    sd_noise: float = 0.0
    w: float = 0.3  # weight of the SD loss (the release's sd_adv_loss_weight)
    only_roi: bool = True  # the SD attack's loss is the RoI losses only (no effect on its result)
    aux_bn: bool = False  # adversarial passes through auxiliary BN (needs model.norm=bn)

    def __post_init__(self):
        if self.se_layer not in SPLIT_POINTS:
            raise ValueError(f"afan.se_layer must be one of {list(SPLIT_POINTS)}, got {self.se_layer!r}")
        check_nonnegative(self, "afan", ("se_steps", "sd_steps", "gamma_se", "gamma_sd", "eps_se", "sd_noise"))
        check_strengths(self)
