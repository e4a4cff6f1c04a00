"""Settings of a classification run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan.config``). The paper configs in ``configs/`` hold only
what differs from these defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from afan import settings
from afan.settings import ReleaseSwitches, RunSettings, check_nonnegative, check_positive, check_strengths

from Classification.data import DataConfig


@dataclass
class OptimConfig:
    """SGD with linear warm-up, then step decay (as released) or cosine decay."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = field(default_factory=lambda: [50, 150])
    decay: float = 0.1  # lr factor at each milestone
    warmup_epochs: float = 1.0  # linear warm-up, per iteration (the release: over epoch 0)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.weight_decay, optim.momentum and optim.warmup_epochs must be >= 0")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"optim.milestones must be increasing, got {self.milestones}")


@dataclass
class AfanConfig(ReleaseSwitches):
    """Feature PGD after ``layer``. Step size and radius are in units of 1/255, as released:
    step_size = gamma / 255, eps = eps / 255. ``attack_bn_stats`` and ``se_trains_head``: see
    ``afan.settings.ReleaseSwitches``."""

    layer: str = "layer1"
    steps: int = 5
    gamma: float = 0.5
    eps: float = 2.0  # used with random_start or project
    norm: Literal["inf", "2"] = "inf"
    random_start: bool = False
    project: bool = False
    n: int = 1  # strengths i/n of the perturbation, i = 1..n
    mask: str = "0"  # one character per strength: "1" = adversarial feature normalization
    mix_dim: Literal["channel", "batch"] = "channel"
    aux_bn: bool = False  # the classification release had no auxiliary BN

    def __post_init__(self):
        check_nonnegative(self, "afan", ("steps", "gamma", "eps"))
        check_strengths(self)


@dataclass
class AdvPropConfig(settings.AdvPropConfig):
    steps: int = 5  # the classification comparison runs 5 PGD steps, as A-FAN's default


@dataclass
class TrainConfig(RunSettings):
    mode: Literal["base", "afan", "advprop"] = "base"
    model: str = "resnet56"  # EfficientNets take timm's weights tags: tf_efficientnet_b0.ap_in1k
    # Input mean/std inside the model: "auto" = the model's own (CIFAR-10 for ResNet-s,
    # ImageNet for torchvision ResNets, the weights tag's for EfficientNets: 0.5 for
    # .ap_in1k, ImageNet otherwise); "imagenet" or "half" (mean = std = 0.5) for any model.
    input_norm: Literal["auto", "imagenet", "half"] = "auto"
    epochs: int = 200
    batch_size: int = 128
    out: str = "runs/classification"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    afan: AfanConfig = field(default_factory=AfanConfig)
    advprop: AdvPropConfig = field(default_factory=AdvPropConfig)

    def __post_init__(self):
        check_positive(self, ("epochs", "batch_size"))
