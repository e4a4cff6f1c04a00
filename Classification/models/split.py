"""Head/tail split shared by every classification model.

A-FAN perturbs the feature after a named layer, so each model describes its forward pass
as an ordered list of named stages. ``forward``, ``head`` and ``tail`` all run slices of
that one list, which makes ``tail(head(x, at), at)`` the very same computation as
``forward(x)``, not a re-implementation of it.
"""
from __future__ import annotations

from typing import Callable

import torch

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


class SplitModel:
    """Mixin for ``nn.Module`` classes that define ``stages()`` and ``split_points``.

    ``split_points`` names the stages after which a feature may be perturbed; each is also
    the name of a submodule, so ``afan.convert_aux_bn(model, after=at)`` accepts it.
    """

    split_points: tuple[str, ...]

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def module_name(self, at: str) -> str:
        """The submodule that split point ``at`` names (itself, for these models)."""
        return at

    def _cut(self, at: str) -> int:
        """Number of stages the head runs for split point ``at``."""
        if at not in self.split_points:
            raise ValueError(
                f"{self.arch}: unknown split point {at!r}; valid split points: "
                f"{', '.join(self.split_points)}"
            )
        return [name for name, _ in self.stages()].index(at) + 1

    @staticmethod
    def _run(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
        for _, stage in stages:
            x = stage(x)
        return x

    def head(self, x: torch.Tensor, at: str) -> torch.Tensor:
        """Input normalisation and every layer up to and including ``at``."""
        return self._run(self.stages()[: self._cut(at)], x)

    def tail(self, h: torch.Tensor, at: str) -> torch.Tensor:
        """The layers after ``at``: a feature from ``head(x, at)`` to logits."""
        return self._run(self.stages()[self._cut(at):], h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.stages(), x)

    def parts_to_compile(self) -> list:
        """The stage modules, which head and tail call (for ``afan_harness.runtime.compile_parts``)."""
        return [stage for _, stage in self.stages() if isinstance(stage, torch.nn.Module)]
