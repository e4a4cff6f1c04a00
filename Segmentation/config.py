"""Settings of a segmentation run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan_harness.config``). Defaults are the VOC2012 release's
(DeepLabv3+ R-50, output stride 16, on DeepLabV3Plus-Pytorch's recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from afan_harness.settings import AdvPropConfig, InputPgdConfig, IterationRun, SeSdConfig
from Segmentation.data import DataConfig
from Segmentation.models.deeplab import OUTPUT_STRIDES, SD_LAYERS, SPLIT_POINTS, check_name


@dataclass
class ModelConfig:
    name: str = "deeplabv3plus_resnet50"
    output_stride: int = 16
    # A torchvision ImageNet state dict of the backbone (resnet50-*.pth, mobilenet_v2-*.pth),
    # read from disk; the released runs start from one. Empty: random initialisation.
    backbone_weights: str = ""
    # Running-statistics momentum of the backbone's BatchNorms; the release's 0.01
    # (PyTorch's default, which the decoder keeps, is 0.1).
    backbone_bn_momentum: float = 0.01

    def __post_init__(self):
        check_name(self.name)
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"model.output_stride={self.output_stride!r} is not valid; use 8 or 16")
        if not 0 < self.backbone_bn_momentum <= 1:
            raise ValueError(f"model.backbone_bn_momentum={self.backbone_bn_momentum!r} is not valid; use a number "
                             "in (0, 1], e.g. 0.01 (the release) or 0.1 (PyTorch's default)")


@dataclass
class OptimConfig:
    """SGD (as released) or AdamW with DeepLabV3Plus-Pytorch's poly schedule: each parameter
    group at ``max(base * (1 - it / iterations) ** power, min_lr)``; the backbone's base rate
    is ``backbone_lr_factor`` times ``lr`` (DeepLabV3Plus-Pytorch: 0.1), and a group whose
    base rate is 0 stays at 0. AdamW ignores ``momentum``; it is there for short runs from
    random weights (Shapes)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    backbone_lr_factor: float = 0.1
    min_lr: float = 1e-6  # the schedule's floor (DeepLabV3Plus-Pytorch's PolyLR); 0: none

    def __post_init__(self):
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"optim.name={self.name!r} is not valid; choose sgd or adamw")
        if self.lr <= 0 or self.power < 0 or self.backbone_lr_factor < 0:
            raise ValueError("optim.lr must be > 0, optim.power and optim.backbone_lr_factor >= 0")
        if self.weight_decay < 0 or self.momentum < 0 or self.min_lr < 0:
            raise ValueError("optim.weight_decay, optim.momentum and optim.min_lr must be >= 0")


@dataclass
class AfanConfig(SeSdConfig):
    """A-FAN for DeepLabv3+ (``afan_harness.settings.SeSdConfig``), the VOC2012 release's settings.

    SE with no random start and no projection, as released. SD on ``sd_layer``, the ASPP
    output (``aspp``, the VOC release) or the decoder's concatenated feature (``concat``, the
    Cityscapes release). Loss: ``(1 - w) L_0 + w / k * (L_1 + ... + L_n + L_sd)`` with ``k``
    adversarial terms; the release's ``w = 0.3``, ``n = 2`` gives
    ``0.7 L_0 + 0.1 L_1 + 0.1 L_2 + 0.1 L_sd``. ``input_pgd`` defaults to the segmentation
    release's pixel PGD (``main_aug_muti_advt.py``: 5 steps of 1/255 within 4/255).
    """

    split_points: ClassVar[tuple] = tuple(SPLIT_POINTS)

    se_layer: str = "layer3"
    gamma_se: float = 0.01
    gamma_sd: float = 0.4
    w: float = 0.3  # total weight of the adversarial terms
    sd_layer: str = "aspp"
    input_pgd: InputPgdConfig = field(default_factory=lambda: InputPgdConfig(step_size=1.0, eps=4.0))

    def __post_init__(self):
        super().__post_init__()
        if self.sd_layer not in SD_LAYERS:
            raise ValueError(f"afan.sd_layer must be one of {list(SD_LAYERS)}, got {self.sd_layer!r}")


@dataclass
class EvalConfig:
    """How the validation images are predicted: ``whole`` images at once; ``crop``, the
    release's ``--crop_val``: image and mask resized so the shorter side is ``crop`` pixels
    (image bilinear, mask nearest), then their centre ``crop`` x ``crop`` scored; or
    ``sliding`` ``crop``-sized windows every ``stride`` pixels, their logits averaged where
    they overlap."""

    mode: Literal["whole", "crop", "sliding"] = "whole"
    crop: int = 513
    stride: int = 341
    batch_size: int = 1  # validation images of real data sets differ in size
    save_images: int = 4  # colourised predictions written at the end

    def __post_init__(self):
        if self.mode not in ("whole", "crop", "sliding"):
            raise ValueError(f"eval.mode={self.mode!r} is not valid; use whole, crop or sliding")
        if self.crop < 1:
            raise ValueError(f"eval.crop must be >= 1, got {self.crop}")
        if self.mode == "sliding" and not 0 < self.stride <= self.crop:
            raise ValueError(f"eval.stride must be in (0, eval.crop], got stride {self.stride}, crop {self.crop}")
        if self.batch_size < 1 or self.save_images < 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.save_images >= 0")


@dataclass
class TrainConfig(IterationRun):
    iterations: int = 30000
    batch_size: int = 4
    log_every: int = 10
    out: str = "runs/segmentation"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    afan: AfanConfig = field(default_factory=AfanConfig)
    advprop: AdvPropConfig = field(default_factory=AdvPropConfig)
