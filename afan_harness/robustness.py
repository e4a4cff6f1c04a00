"""Common corruptions of test images (the ImageNet-C families, severities 1-5) and the sweep
that scores a model on each, and the feature attack of a trained model (``FeatureAttack``),
for every task's ``test.py``.

Each corruption maps an image tensor in [0, 1] (C, H, W) to another in [0, 1]; severity 0
returns the image itself. The severity parameters are those of Hendrycks & Dietterich's
ImageNet-C (ICLR 2019), for images of any size: noise (gaussian, shot, impulse), blur
(gaussian, defocus), weather-like photometric changes (brightness, contrast) and digital
ones (pixelate, JPEG). Random corruptions draw from a generator seeded by the sweep's seed and
the image's index, so a corrupted test set is the same in every run and on every process.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

import afan

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class FeatureAttack:
    """A trained model scored on a perturbed feature, the release's ``eval_sat_layers.py``
    (its detection script; here every task): feature PGD on the output of split point
    ``layer`` against the task's loss, ``steps`` sign steps of ``gamma / 255`` (``random_start``
    in and ``project`` to the ``eps / 255`` ball as asked; the release: neither), then the
    strength ``clean + strength * (adv - clean)`` (the release's ``--sat_layer k`` of its five
    points ``k / 4``: ``0.25`` by default), with ``mix`` re-normalised to the clean feature's
    channel statistics (its ``--mix``). The defaults are the release's."""

    layer: str
    gamma: float = 0.5
    steps: int = 10
    eps: float = 2.0
    random_start: bool = False
    project: bool = False
    strength: float = 0.25
    mix: bool = False

    def perturb(self, feature: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """The feature the model is scored on, from the clean ``feature`` and the task's
        ``loss_fn(feature)`` (through the rest of the model); detached."""
        clean = feature.detach()
        adv = afan.feature_pgd(clean, loss_fn, steps=self.steps, step_size=self.gamma / 255, eps=self.eps / 255,
                               random_start=self.random_start, project=self.project)
        strength = torch.lerp(clean, adv.to(clean.dtype), self.strength)
        # As released, the strength's own pattern with the clean feature's statistics.
        return afan.mix_statistics(strength, clean).to(clean.dtype) if self.mix else strength

    def summary(self) -> dict:
        """The settings as ``feature_*`` entries of a test's summary."""
        return {f"feature_{name}": value for name, value in vars(self).items()}


def gaussian_noise(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return image + sigma * torch.randn(image.shape, generator=generator)


def shot_noise(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return torch.poisson(image.clamp(0, 1) * photons, generator=generator) / photons


def impulse_noise(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Salt and pepper: a fraction of the values set to 0 or 1 (each value on its own, as
    ImageNet-C's ``skimage.util.random_noise(mode='s&p')`` does)."""
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    hit = torch.rand(image.shape, generator=generator) < amount
    salt = torch.rand(image.shape, generator=generator) < 0.5
    return torch.where(hit, salt.to(image.dtype), image)


def _blur(image: Tensor, kernel: Tensor) -> Tensor:
    pad = kernel.shape[-1] // 2
    channels = image.shape[0]
    weight = kernel.to(image.dtype).expand(channels, 1, *kernel.shape)
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect" if pad < min(image.shape[-2:]) else "replicate")
    return F.conv2d(padded, weight, groups=channels)[0]


def gaussian_blur(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    radius = math.ceil(3 * sigma)
    axis = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-axis**2 / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return _blur(image, kernel / kernel.sum())


def defocus_blur(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """A disk of ImageNet-C's radius, smoothed by its small gaussian (anti-aliasing)."""
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    axis = torch.arange(-radius, radius + 1, dtype=torch.float64)
    disk = ((axis[:, None] ** 2 + axis[None] ** 2) <= radius**2).double()
    line = torch.exp(-torch.arange(-2, 3, dtype=torch.float64) ** 2 / (2 * alias**2))
    smooth = torch.outer(line, line)
    kernel = F.conv2d(F.pad(disk[None, None], (2, 2, 2, 2)), (smooth / smooth.sum())[None, None])[0, 0]
    return _blur(image, kernel / kernel.sum())


def brightness(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """The HSV value raised by ImageNet-C's amount: scaling a pixel's RGB by a factor keeps
    its hue and saturation and scales its value (the channels' maximum) by that factor."""
    amount = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    value = image.amax(dim=0, keepdim=True)
    target = (value + amount).clamp(max=1.0)
    return torch.where(value > 0, image * target / value.clamp_min(1e-12), target.expand_as(image))


def contrast(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = image.mean()
    return (image - mean) * factor + mean


def pixelate(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    height, width = image.shape[-2:]
    small = F.interpolate(image[None], size=(max(1, int(height * factor)), max(1, int(width * factor))),
                          mode="area")
    return F.interpolate(small, size=(height, width), mode="nearest")[0]


def jpeg_compression(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    to_pil_image(image.clamp(0, 1)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return pil_to_tensor(Image.open(buffer).convert("RGB")).to(image.dtype) / 255


# name -> (family, corruption)
CORRUPTIONS: dict[str, tuple[str, Callable]] = {
    "gaussian_noise": ("noise", gaussian_noise),
    "shot_noise": ("noise", shot_noise),
    "impulse_noise": ("noise", impulse_noise),
    "gaussian_blur": ("blur", gaussian_blur),
    "defocus_blur": ("blur", defocus_blur),
    "brightness": ("weather", brightness),
    "contrast": ("digital", contrast),
    "pixelate": ("digital", pixelate),
    "jpeg_compression": ("digital", jpeg_compression),
}


def corrupt(image: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """``image`` (C, H, W in [0, 1]) under corruption ``name`` at ``severity`` (0: itself)."""
    if severity == 0:
        return image
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be 0 to 5, got {severity}")
    return CORRUPTIONS[name][1](image, severity, generator).clamp(0, 1).to(image.dtype)


def parse_corruptions(text: str) -> list[str]:
    """``all`` or comma-separated names (``gaussian_noise,contrast``); a ValueError names the unknown."""
    if text == "all":
        return list(CORRUPTIONS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f"unknown corruption(s) {unknown or [text]}; choose 'all' or some of {', '.join(CORRUPTIONS)}")
    return names


class CorruptedDataset(Dataset):
    """``dataset`` whose items' image (their first element) is corrupted, the same way for
    the same ``seed`` and index; the rest of each item (label, target, mask) is untouched."""

    def __init__(self, dataset: Dataset, name: str, severity: int, seed: int = 0):
        self.dataset, self.name, self.severity, self.seed = dataset, name, severity, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, *rest = self.dataset[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return (corrupt(image, self.name, self.severity, generator), *rest)

    def __getattr__(self, name):  # the wrapped set's attributes (class names, palette, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def corruption_sweep(dataset: Dataset, score: Callable[[Dataset], float], names, severities=SEVERITIES,
                     seed: int = 0) -> list[dict]:
    """``score`` of ``dataset`` under every corruption and severity: rows ``{corruption,
    family, severity, score}``, then one ``mean`` row per corruption (severity "mean") and
    the mean over all of them (corruption "mean")."""
    rows, means = [], []
    for name in names:
        scores = [score(CorruptedDataset(dataset, name, severity, seed)) for severity in severities]
        family = CORRUPTIONS[name][0]
        rows += [{"corruption": name, "family": family, "severity": s, "score": v} for s, v in zip(severities, scores)]
        means.append(sum(scores) / len(scores))
        rows.append({"corruption": name, "family": family, "severity": "mean", "score": means[-1]})
    rows.append({"corruption": "mean", "family": "", "severity": "mean", "score": sum(means) / len(means)})
    return rows


def corruption_score(dataset: Dataset, score: Callable[[Dataset], float], names, severities, seed: int,
                     metric: str, folder) -> float:
    """:func:`corruption_sweep` saved with :func:`save_sweep` in ``folder``: what a ``test.py``
    reports; returns the mean over every corruption."""
    rows = corruption_sweep(dataset, score, names, severities, seed)
    save_sweep(rows, metric, folder)
    return rows[-1]["score"]


def save_sweep(rows: list[dict], metric: str, folder) -> tuple[Path, Path]:
    """``corruptions.csv`` and ``corruptions.png`` (the score against severity, one line per
    corruption, the clean score at severity 0 where a row gives it) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "corruptions.csv"
    with open(table, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["corruption", "family", "severity", metric], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**{k: v for k, v in row.items() if k != "score"}, metric: row["score"]} for row in rows)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for name in dict.fromkeys(row["corruption"] for row in rows if row["corruption"] != "mean"):
        points = [(row["severity"], row["score"]) for row in rows
                  if row["corruption"] == name and row["severity"] != "mean"]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("severity")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} under common corruptions (mean {rows[-1]['score']:.4g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    picture = folder / "corruptions.png"
    figure.savefig(picture, dpi=100)
    return table, picture
