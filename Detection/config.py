"""Settings of a detection run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan.config``). Defaults are the VOC2007 release's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from afan.settings import check_nonnegative, check_strengths

SPLIT_POINTS = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class ModelConfig:
    """``Detection.models.create_model`` arguments (num_classes comes from the data)."""

    name: str = "fasterrcnn_resnet50_fpn"
    min_size: int = 600  # shorter image side after resizing (VOC release; COCO: 800)
    max_size: int = 1000  # longer side at most (COCO: 1333)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    trainable_layers: int = 3  # ResNet stages trained, counted from the last
    norm: Literal["frozen", "bn"] = "frozen"  # "bn" for auxiliary BN
    roi_batch_size: int = 512  # RoIs sampled per training image for the box head
    representation_size: int = 1024  # width of the box head's two layers (torchvision's)

    def __post_init__(self):
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"model.min_size and model.max_size need 0 < min_size <= max_size, "
                             f"got {self.min_size} and {self.max_size}")
        if not 2 <= len(self.anchor_sizes) <= 5 or min(self.anchor_sizes, default=0) <= 0:
            raise ValueError(f"model.anchor_sizes must be 2 to 5 positive sizes (one per FPN level), got {self.anchor_sizes}")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"model.trainable_layers must be in [0, 5], got {self.trainable_layers}")


@dataclass
class AfanConfig:
    """A-FAN for detection (DESIGN.md items 1-6), the VOC2007 release's settings.

    SE: feature PGD after backbone stage ``se_layer``, ``se_steps`` steps of
    ``gamma_se / 255`` (no random start, no projection, as released; ``eps_se`` is kept
    for reference only), ``n`` strengths mixed by ``mask``. SD: PGD on the pooled RoI
    features, ``sd_steps`` steps of ``gamma_sd / 255``; ``sd_mix`` re-normalises the clean
    RoI features with the adversarial statistics, ``sd_noise`` adds uniform noise in
    ``[-1, 1] * gamma_sd * sd_noise`` (the release's formula). Loss:
    ``(L_0 + ... + L_n) / 3 * (1 - w) + L_sd / 3 * w``.
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
    only_roi: bool = True  # SD attack and L_sd use the RoI losses only
    aux_bn: bool = False  # adversarial passes through auxiliary BN (needs model.norm=bn)

    def __post_init__(self):
        if self.se_layer not in SPLIT_POINTS:
            raise ValueError(f"afan.se_layer must be one of {list(SPLIT_POINTS)}, got {self.se_layer!r}")
        check_nonnegative(self, "afan", ("se_steps", "sd_steps", "gamma_se", "gamma_sd", "eps_se", "sd_noise"))
        check_strengths(self)
