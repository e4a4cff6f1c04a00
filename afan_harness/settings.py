"""Checks and sections that the configs of every task share: the run settings, the A-FAN
settings' ranges, the AdvProp (pixel PGD) section and the A-FAN variants' sections
(several SE layers, input adversarial training)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
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
    # capture only, a check); see afan_harness.runtime.compile_parts.
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
class InputPgdConfig:
    """A-FAN on top of input adversarial training (docs/method.md, "The variants"), off by default:
    pixel PGD images ``x_adv`` (L-infinity, ``steps`` steps of ``step_size / 255``, projected
    to the ``eps / 255`` ball, from a random start, clamped to [0, 1] once at the end, as the
    release's ``attack_algo.adv_input``), whose loss takes the place of A-FAN's clean term
    (``clean_term="adversarial"``, the release's ``*_advt`` scripts) or is added to a clean
    A-FAN loss (``"clean"``, ``train_aug_final_advtrain.py``). The step's loss is
    ``(1 - weight) * A-FAN + weight * L(x_adv)``. The defaults are the detection release's
    (``train_aug_muti_advt.py``: 5 steps of 0.3/255 within 2/255)."""

    enabled: bool = False
    steps: int = 5
    step_size: float = 0.3
    eps: float = 2.0
    random_start: bool = True  # the release's randinit
    project: bool = True  # the release's clip
    clean_term: Literal["adversarial", "clean"] = "adversarial"
    weight: float = 0.0  # of L(x_adv) added to the A-FAN loss (the release's loss_settings 2-4: 0.5, 0.6, 0.7)

    def __post_init__(self):
        check_nonnegative(self, "afan.input_pgd", ("steps", "step_size", "eps"))
        if not 0 <= self.weight <= 1:
            raise ValueError(f"afan.input_pgd.weight must be in [0, 1], got {self.weight}")
        if self.enabled and self.clean_term == "clean" and self.weight == 0:
            raise ValueError("afan.input_pgd with clean_term=clean and weight 0 never uses its PGD images: set "
                             "afan.input_pgd.weight > 0 (train_aug_final_advtrain.py: 0.5) or clean_term=adversarial")

    def attack(self) -> dict:
        """The keyword arguments of ``afan.pixel_pgd`` (step and radius given in 1/255)."""
        return {"steps": self.steps, "step_size": self.step_size / 255, "eps": self.eps / 255,
                "random_start": self.random_start, "project": self.project, "clamp_at_end": True}

    @property
    def replaces_clean(self) -> bool:
        """Whether the PGD images' loss is A-FAN's clean term ``L_0``."""
        return self.enabled and self.clean_term == "adversarial"

    def total(self, afan_loss, pgd_loss):
        """The step's loss, ``(1 - weight) * afan_loss + weight * pgd_loss`` (``afan_loss``
        itself when off)."""
        return (1 - self.weight) * afan_loss + self.weight * pgd_loss if self.enabled else afan_loss


@dataclass
class MultiLayerConfig:
    """SE at several backbone stages (the release's ``*_muti_*`` scripts), used when ``layers``
    is not empty: one feature PGD per stage from the clean feature, ``se_steps`` steps of
    ``gammas[k] / 255`` (radius ``eps[k] / 255`` with ``random_start`` / ``project``), the
    adversarial feature itself (one strength) re-normalised to the clean statistics where
    ``mask[k]`` is "1", one tail pass each; with SD as configured. The loss is
    ``weights[0] L_0 + weights[1] L_1 + ... + weights[K] L_K (+ weights[K+1] L_sd)``, the
    release's ``--loss_settings`` tables."""

    layers: list[str] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    eps: list[float] = field(default_factory=list)
    mask: str = ""
    weights: list[float] = field(default_factory=list)

    def check(self, split_points, sd: bool) -> None:
        """ValueError unless every list has one entry per layer (``weights``: one more, and one
        for L_sd with ``sd``), the layers are distinct split points and no number is negative."""
        k = len(self.layers)
        for name in self.layers:
            if name not in split_points:
                raise ValueError(f"afan.multi.layers: {name!r} is not one of {list(split_points)}")
        if len(set(self.layers)) != k:
            raise ValueError(f"afan.multi.layers must be distinct, got {self.layers}")
        for name in ("gammas", "eps"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"afan.multi.{name} needs one value per layer ({k}), got {getattr(self, name)}")
        check_mask(self.mask, k, "afan.multi.mask")
        terms = k + 1 + sd
        if len(self.weights) != terms:
            raise ValueError(f"afan.multi.weights needs {terms} values (L_0, one per layer{', L_sd' if sd else ''}), "
                             f"got {self.weights}")
        if min(self.gammas + self.eps + self.weights) < 0:
            raise ValueError("afan.multi.gammas, eps and weights must be >= 0")


@dataclass
class SeSdConfig(ReleaseSwitches):
    """The A-FAN section of detection and segmentation: SE (feature PGD after backbone stage
    ``se_layer``, ``se_steps`` steps of ``gamma_se / 255``, ``n`` strengths mixed by ``mask``)
    and SD (PGD on a late feature, ``sd_steps`` steps of ``gamma_sd / 255``; ``sd_mix``
    re-normalises the clean SD feature with the adversarial statistics, ``sd_noise`` adds
    uniform noise in ``[-1, 1] * gamma_sd * sd_noise``), the loss weight ``w`` of the
    adversarial terms and ``aux_bn``; the release's ``--randinit`` / ``--clip`` (``random_start``,
    ``project``, radii ``eps_se``, ``eps_sd``), SE at several stages (``multi``) and input
    adversarial training (``input_pgd``), all off by default. Each task subclasses it with its
    release's defaults and its ``split_points``."""

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
    # The release's --randinit / --clip, for SE and SD alike: start from a uniform point of the
    # L-infinity ball of radius eps_se / 255 (SD: eps_sd / 255), project back into it after
    # each step. The release's radius is 2/255 for both.
    random_start: bool = False
    project: bool = False
    eps_se: float = 2.0
    eps_sd: float = 2.0
    multi: MultiLayerConfig = field(default_factory=MultiLayerConfig)
    input_pgd: InputPgdConfig = field(default_factory=InputPgdConfig)

    def __post_init__(self):
        if self.se_layer not in self.split_points:
            raise ValueError(f"afan.se_layer must be one of {list(self.split_points)}, got {self.se_layer!r}")
        check_nonnegative(self, "afan", ("se_steps", "sd_steps", "gamma_se", "gamma_sd", "sd_noise", "eps_se",
                                         "eps_sd"))
        check_strengths(self)
        if self.multi.layers:
            self.multi.check(self.split_points, self.sd)
            if self.aux_bn:
                raise ValueError("afan.aux_bn does not combine with afan.multi.layers: the auxiliary BN is made after "
                                 "afan.se_layer only; set afan.aux_bn=false")

    def pgd(self, eps: float) -> dict:
        """The ``afan.feature_pgd`` keywords of the random start and projection, radius ``eps``
        in 1/255."""
        return {"eps": eps / 255, "random_start": self.random_start, "project": self.project}


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
