"""Any torchvision or timm classifier by name, split for A-FAN at any of its modules.

``tv:NAME`` builds ``torchvision.models.get_model(NAME)``, ``timm:NAME`` builds
``timm.create_model(NAME)``, both with random weights (nothing is downloaded). The model
takes images in [0, 1] and normalises them with ImageNet's statistics inside; its own
modules sit under ``net.``, and a split point is any module name of the library's model
(``layer2``, ``features.6``, ``stages.1``), cut by :func:`afan.split`.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn

import afan
from afan import Normalize
from afan.input_norm import IMAGENET_MEAN, IMAGENET_STD

LIBRARIES = ("tv", "timm")


def is_library_name(name: str) -> bool:
    library, colon, model = str(name).partition(":")
    return bool(colon) and library in LIBRARIES and bool(model)


def _build(arch: str, num_classes: int, **kw) -> nn.Module:
    library, _, name = arch.partition(":")
    if library == "tv":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # the classifiers
        if name not in known:
            raise ValueError(_unknown(name, known, "torchvision classifier"))
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    try:
        import timm
    except ImportError:
        raise ImportError(f"{arch} needs timm: pip install 'timm>=0.9.16'") from None
    if not timm.is_model(name):
        raise ValueError(_unknown(name, timm.list_models(), "timm model"))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def _unknown(name: str, known, what: str) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"unknown {what} {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")


class LibraryClassifier(nn.Module):
    """``tv:NAME`` / ``timm:NAME`` with input normalisation and ``head(x, at)``/``tail(h, at)``."""

    classifier_key = None  # the classifier's key differs per model; checkpoints record the class count

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, **kw):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        self.normalize = Normalize(mean, std)
        self.net = _build(arch, num_classes, **kw)
        self.split_points = tuple(name for name, _ in self.net.named_modules() if name)
        self._splits = {}  # split point -> (head, tail), traced on first use

    def module_name(self, at: str) -> str:
        """The name of split point ``at`` in this module (for ``afan.convert_aux_bn``)."""
        return f"net.{at}"

    def _split(self, at: str):
        if at not in self._splits:
            self._splits[at] = afan.split(self, self.module_name(at))
        return self._splits[at]

    def head(self, x: torch.Tensor, at: str) -> torch.Tensor:
        return self._split(at)[0](x)

    def tail(self, h: torch.Tensor, at: str) -> torch.Tensor:
        return self._split(at)[1](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def parts_to_compile(self) -> list:
        return [self.net]
