"""Settings of a classification run: dataclass defaults, overridden by a YAML file and
``key=value`` arguments (see ``afan_harness.config``). The paper configs in ``configs/`` hold only
what differs from these defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from afan_harness import settings
from afan_harness.settings import (InputPgdConfig, ReleaseSwitches, RunSettings, check_nonnegative, check_positive,
                                   check_strengths)

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
    ``afan_harness.settings.ReleaseSwitches``."""

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
    # A-FAN on top of input adversarial training (docs/method.md, "The variants"; not in the
    # classification release, which has no such script): the detection release's pixel PGD.
    input_pgd: InputPgdConfig = field(default_factory=InputPgdConfig)

    def __post_init__(self):
        check_nonnegative(self, "afan", ("steps", "gamma", "eps"))
        check_strengths(self)


# The release's nine perturbed layers (main_learnable.py: perturb_idx_list = [4, 8, 11, 14,
# 18, 21, 24, 28, 31], end points into resnet_s.py's nn.Sequential of ResNet-56s: after the
# stem's ReLU, after layer1 block 3, ...), in the names of the project's ResNet-s.
RELEASE_LEARNABLE_LAYERS = ("stem", "layer1.3", "layer1.6", "layer2.0", "layer2.4", "layer2.7", "layer3.1",
                            "layer3.5", "layer3")


@dataclass
class LearnableConfig(ReleaseSwitches):
    """The release's learnable multi-layer variant (``main_learnable.py``; docs/method.md,
    "The variants"): feature PGD at each of ``layers`` (a split point, or ``<stage>.<i>``: after block
    ``i`` of a stage), ``steps`` steps of ``gamma / 255`` (radius ``eps / 255`` with
    ``random_start`` / ``project``, the release's ``--randinit`` / ``--clip``); the adversarial
    feature at layer k is ``h_k + w_k * delta_k`` with weights ``w`` from ``1/K``, trained by
    their own SGD at ``w_lr`` (the run's momentum, no weight decay, no schedule) under an
    ``l1 * |w|_1`` penalty and projected back to sum 1 after every step. The defaults are the
    release's (``--steps 3 --gamma 1 --eps 2 --w_lr 0.01 --l1_coef 1``)."""

    layers: list[str] = field(default_factory=lambda: list(RELEASE_LEARNABLE_LAYERS))
    steps: int = 3
    gamma: float = 1.0
    eps: float = 2.0
    random_start: bool = False
    project: bool = False
    w_lr: float = 0.01
    l1: float = 1.0

    def __post_init__(self):
        if not self.layers:
            raise ValueError("learnable.layers must name at least one layer, e.g. [layer1, layer2]")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"learnable.layers must be distinct, got {self.layers}")
        check_nonnegative(self, "learnable", ("steps", "gamma", "eps", "w_lr", "l1"))


@dataclass
class AdvPropConfig(settings.AdvPropConfig):
    steps: int = 5  # the classification comparison runs 5 PGD steps, as A-FAN's default


@dataclass
class TrainConfig(RunSettings):
    mode: Literal["base", "afan", "advprop", "learnable"] = "base"
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
    learnable: LearnableConfig = field(default_factory=LearnableConfig)

    def __post_init__(self):
        check_positive(self, ("epochs", "batch_size"))
