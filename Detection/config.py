"""Settings of a detection run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan_harness.config``). Defaults are the VOC2007 release's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from afan_harness.settings import AdvPropConfig, IterationRun, SeSdConfig
from Detection.data import DataConfig
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
class AfanConfig(SeSdConfig):
    """A-FAN for detection (``afan_harness.settings.SeSdConfig``), the VOC2007 release's settings
    (``train_aug_final.py`` and ``sh/voc2007/clean50/090_final_setting1.sh``).

    SE after ``se_layer``, with no random start and no projection by default, as released
    (``random_start`` / ``project`` use the radii ``eps_se`` / ``eps_sd``), built from the
    clean feature detached. SD attacks the RoI
    head's output (the box features the class and box linears read). ``only_roi`` is the
    release's ``--only_roi_sd``: the SD attack's loss is the RoI losses only, else also the
    RPN losses, which do not depend on the box features, so both give the same perturbation
    (in the release too); L_sd always includes the clean RPN losses. Loss:
    ``(L_0 + ... + L_n) / 3 * (1 - w) + L_sd / 3 * w``. ``aux_bn`` needs ``model.norm=bn``.
    """

    split_points: ClassVar[tuple] = tuple(SPLIT_POINTS)

    se_layer: str = "layer2"
    gamma_se: float = 1.0
    n: int = 4
    mask: str = "0011"
    gamma_sd: float = 0.1
    w: float = 0.3  # weight of the SD loss (the release's sd_adv_loss_weight)
    only_roi: bool = True  # the SD attack's loss is the RoI losses only (no effect on its result)
    # The n strengths in one tail pass over n x B images (frozen BatchNorm only; see
    # Detection.steps._joined_strengths): fewer, larger kernels, the n graphs held together.
    batched: bool = False


@dataclass
class OptimConfig:
    """SGD with linear warm-up and step decay at given iterations (VOC2007 release)."""

    lr: float = 0.008
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the VOC2007 release (its train_config.py); COCO: 1e-4
    steps: list[int] = field(default_factory=lambda: [6250, 8750])
    decay: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1 / 3  # lr factor at iteration 0, rising linearly to 1

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_iters < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_iters >= 0")
        if sorted(self.steps) != list(self.steps):
            raise ValueError(f"optim.steps must be increasing, got {self.steps}")


@dataclass
class TrainConfig(IterationRun):
    iterations: int = 11250
    draw_images: int = 4  # test images drawn with their predictions at the end
    out: str = "runs/detection"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    afan: AfanConfig = field(default_factory=AfanConfig)
    advprop: AdvPropConfig = field(default_factory=AdvPropConfig)

    def __post_init__(self):
        super().__post_init__()
        needs_bn = self.mode == "advprop" or (self.mode == "afan" and self.afan.aux_bn)
        if needs_bn and self.model.norm != "bn":
            raise ValueError("auxiliary BN (mode=advprop or afan.aux_bn=true) needs trainable "
                             "BatchNorm: add model.norm=bn")
        if self.afan.batched and (self.model.norm != "frozen" or self.afan.multi.layers):
            raise ValueError("afan.batched joins the strengths of one SE stage in one pass, which needs every "
                             "BatchNorm frozen (model.norm=frozen) and one SE stage (no afan.multi.layers); "
                             "set afan.batched=false")
