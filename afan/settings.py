"""Checks and sections that the configs of every task share: the run settings, the A-FAN
settings' ranges and the AdvProp (pixel PGD) section."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar, Literal

from afan.norm import check_mask


def unknown_name(what: str, name, names, note: str = "") -> ValueError:
    """The error for a ``name`` not among ``names`` (``what``: e.g. "detection model"): the
    closest valid name, ``note``, then every valid one."""
    close = difflib.get_close_matches(str(name), list(names), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{hint}{note} Valid names: {', '.join(names)}")


def _check_at_least(section, prefix: str, names, least) -> None:
    for name in names:
        value = getattr(section, name)
        if value < least:
            raise ValueError(f"{prefix + '.' if prefix else ''}{name} must be >= {least}, got {value}")


def check_nonnegative(section, prefix: str, names) -> None:
    """Every named setting of ``section`` is >= 0 (``prefix`` names the section in the error,
    "" for the top level)."""
    _check_at_least(section, prefix, names, 0)


def check_positive(section, names, prefix: str = "") -> None:
    """Every named setting of ``section`` is >= 1 (counts such as iterations, batch size)."""
    _check_at_least(section, prefix, names, 1)


def check_strengths(section, prefix: str = "afan") -> None:
    """``n >= 1`` strengths, a mixing ``mask`` of ``n`` characters and, where the section has
    one, an adversarial loss weight ``w`` in [0, 1]."""
    if section.n < 1:
        raise ValueError(f"{prefix}.n must be >= 1, got {section.n}")
    check_mask(section.mask, section.n, f"{prefix}.mask")
    w = getattr(section, "w", None)
    if w is not None and not 0 <= w <= 1:
        raise ValueError(f"{prefix}.w must be in [0, 1], got {w}")


@dataclass
class RunSettings:
    """How any task's run executes; each task's ``TrainConfig`` starts with these fields."""

    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    # Mixed precision of the training passes; auto: bf16 (else fp16) on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the whole batch
    # NHWC weights and features: faster convolutions with oneDNN (CPU) and cuDNN (GPU).
    channels_last: bool = True
    # torch.compile of the model's stages: off, inductor (generated kernels) or eager (graph
    # capture only, a check); see afan.runtime.compile_parts.
    compile: Literal["off", "inductor", "eager"] = "off"
    # A NaN or infinite loss: "stop" (the last checkpoint is kept) or "skip" the step's update
    # and count it (``skipped_steps`` in the log and summary).
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class IterationRun(RunSettings):
    """The settings of an iteration-based run (detection, segmentation), with its defaults
    set by each task's ``TrainConfig``."""

    mode: Literal["base", "afan", "advprop"] = "base"
    iterations: int = 1000
    batch_size: int = 8
    checkpoint_every: int = 1000
    log_every: int = 20
    eval_every: int = 0  # also evaluate (and keep best.pth) every N iterations; 0: only at the end

    def __post_init__(self):
        check_positive(self, ("iterations", "batch_size", "checkpoint_every", "log_every"))
        check_nonnegative(self, "", ("eval_every",))


@dataclass
class ReleaseSwitches:
    """The deliberate changes from the release that every task's A-FAN section offers; the
    defaults are the release's behaviour."""

    # "update": the attack's training-mode passes update BN running statistics, as the
    # release's do; "frozen": they use batch statistics and leave running statistics alone.
    attack_bn_stats: Literal["update", "frozen"] = "update"
    # The release builds the SE strengths from the clean feature detached, so their losses
    # train only the layers after the split point; true lets them reach the layers before too.
    se_trains_head: bool = False

    @property
    def freeze_attack_bn(self) -> bool:
        return self.attack_bn_stats == "frozen"


@dataclass
class SeSdConfig(ReleaseSwitches):
    """The A-FAN section of detection and segmentation: SE (feature PGD after backbone stage
    ``se_layer``, ``se_steps`` steps of ``gamma_se / 255``, ``n`` strengths mixed by ``mask``)
    and SD (PGD on a late feature, ``sd_steps`` steps of ``gamma_sd / 255``; ``sd_mix``
    re-normalises the clean SD feature with the adversarial statistics, ``sd_noise`` adds
    uniform noise in ``[-1, 1] * gamma_sd * sd_noise``), the loss weight ``w`` of the
    adversarial terms and ``aux_bn``. Each task subclasses it with its release's defaults and
    its ``split_points``."""

    split_points: ClassVar[tuple] = ()  # the task's valid ``se_layer`` names

    se_layer: str = "layer3"
    se_steps: int = 1
    gamma_se: float = 1.0
    n: int = 2
    mask: str = "11"
    sd: bool = True
    sd_steps: int = 1
    gamma_sd: float = 0.1
    sd_mix: bool = False
    sd_noise: float = 0.0
    w: float = 0.3
    aux_bn: bool = False  # adversarial passes through auxiliary BN

    def __post_init__(self):
        if self.se_layer not in self.split_points:
            raise ValueError(f"afan.se_layer must be one of {list(self.split_points)}, got {self.se_layer!r}")
        check_nonnegative(self, "afan", ("se_steps", "sd_steps", "gamma_se", "gamma_sd", "sd_noise"))
        check_strengths(self)


@dataclass
class AdvPropConfig:
    """Pixel-level PGD with auxiliary BN everywhere (docs/method.md item 7); units of 1/255."""

    steps: int = 1
    step_size: float = 1.0
    eps: float = 4.0
    random_start: bool = True

    def __post_init__(self):
        check_nonnegative(self, "advprop", ("steps", "step_size", "eps"))

    def attack(self) -> dict:
        """The keyword arguments of ``afan.pixel_pgd`` and ``afan.AdvProp``: the same
        settings in pixel units (step and radius are given in 1/255)."""
        return {"steps": self.steps, "step_size": self.step_size / 255, "eps": self.eps / 255,
                "random_start": self.random_start}
