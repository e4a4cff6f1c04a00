"""Feature-level PGD and multi-strength interpolation (docs/method.md items 1, 2 and 4).

The attack runs on an intermediate feature ``h = head(x)`` instead of the image: the
caller passes ``loss_fn(h_adv) -> scalar``, usually ``task_loss(tail(h_adv))``, and
gets back an adversarial feature. Only the gradient with respect to the feature is
taken, so the model's parameter gradients are never touched by the attack.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch

NORMS = ("inf", "2")


def _check_arguments(steps, step_size, eps, norm, random_start, project) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"feature_pgd: steps must be a non-negative integer, got {steps!r}")
    if not isinstance(step_size, numbers.Real) or step_size < 0:
        raise ValueError(f"feature_pgd: step_size must be a non-negative number, got {step_size!r}")
    if norm not in NORMS:
        raise ValueError(f"feature_pgd: norm must be one of {NORMS}, got {norm!r}")
    if eps is None:
        if random_start or project:
            raise ValueError(
                "feature_pgd: random_start and project need a radius; pass eps=<positive number>"
            )
    elif not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"feature_pgd: eps must be a non-negative number or None, got {eps!r}")


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample (dim 0), shaped to broadcast against ``t``."""
    norms = t.flatten(1).norm(dim=1) if t.dim() > 1 else t.abs()
    return norms.view(-1, *([1] * (t.dim() - 1)))


def _step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "inf":
        return grad.sign()
    return grad / _per_sample_l2(grad).clamp_min(1e-12)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "inf":
        return delta.clamp(-eps, eps)
    # Shrink only the samples that left the ball; those inside keep their delta exactly.
    scale = (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "inf":
        return delta.uniform_(-eps, eps)
    direction = torch.randn_like(delta)
    direction = direction / _per_sample_l2(direction).clamp_min(1e-12)
    radius = torch.rand(_per_sample_l2(delta).shape, dtype=delta.dtype, device=delta.device)
    return direction * radius * eps


def feature_pgd(
    feature: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    step_size: float,
    eps: Optional[float] = None,
    norm: str = "inf",
    random_start: bool = False,
    project: bool = False,
    bounds: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` with respect to ``feature``.

    Each step moves the feature by ``step_size`` along ``sign(grad)`` (``norm="inf"``) or
    along the per-sample unit gradient (``norm="2"``); with ``project=True`` the result is
    pulled back into the ``eps``-ball around the clean feature after every step, and
    ``random_start=True`` starts from a uniform point of that ball. The release used
    ``step_size = gamma / 255`` with no random start and no projection. ``bounds=(lo, hi)``
    keeps every iterate inside a value range, e.g. ``(0, 1)`` for pixel-level PGD on images.

    The perturbation is accumulated in at least float32, so steps smaller than the
    resolution of a bfloat16/float16 feature are not rounded away; the returned tensor is
    detached and has the promoted dtype. Works with or without ``torch.autocast`` and
    inside ``torch.no_grad()`` (gradients are enabled locally).
    """
    _check_arguments(steps, step_size, eps, norm, random_start, project)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"feature_pgd: bounds must be (low, high) with low < high, got {bounds!r}")
    origin = feature.detach()
    delta = torch.zeros_like(origin, dtype=torch.promote_types(origin.dtype, torch.float32))

    def clip(d):
        return d if bounds is None else (origin + d).clamp(*bounds) - origin

    if random_start:
        delta = clip(_random_start(delta, eps, norm))
    with torch.enable_grad():
        for step in range(steps):
            adv = (origin + delta).requires_grad_(True)
            loss = loss_fn(adv)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("feature_pgd: loss_fn must return a scalar tensor")
            # autograd.grad differentiates only towards `adv`: no parameter .grad is written,
            # and the step's graph is freed as soon as the gradient is taken.
            (grad,) = torch.autograd.grad(loss, adv, allow_unused=True)
            if grad is None:
                raise ValueError(
                    f"feature_pgd: the loss at step {step} does not depend on the feature; "
                    "loss_fn must compute the loss from the tensor it is given"
                )
            delta = delta + step_size * _step_direction(grad.to(delta.dtype), norm)
            if project:
                delta = _project(delta, eps, norm)
            delta = clip(delta)
    return (origin + delta).detach()


def _check_strengths(clean: torch.Tensor, adv: torch.Tensor, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"interpolate: n must be a positive integer, got {n!r}")
    if clean.shape != adv.shape:
        raise ValueError(
            f"interpolate: clean and adv must have the same shape, got {tuple(clean.shape)} "
            f"and {tuple(adv.shape)}"
        )


def _lerp(clean: torch.Tensor, adv: torch.Tensor, weight: float) -> torch.Tensor:
    dtype = torch.promote_types(clean.dtype, adv.dtype)
    # torch.lerp returns `adv` exactly for weight 1, so the strongest feature is the attack's.
    return torch.lerp(clean.to(dtype), adv.to(dtype), weight)


def strength(clean: torch.Tensor, adv: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """``clean + (i/n) * (adv - clean)``: the ``i``-th (``1..n``) of :func:`interpolate`'s
    features alone, for a caller that runs one strength at a time."""
    _check_strengths(clean, adv, n)
    if not 1 <= i <= n:
        raise ValueError(f"interpolate: strength i must be in 1..{n}, got {i!r}")
    return _lerp(clean, adv, i / n)


def interpolate(clean: torch.Tensor, adv: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The ``n`` features ``clean + (i/n) * (adv - clean)``, ``i = 1..n`` (the last is ``adv``).

    Differentiable in both arguments, so a caller that keeps ``clean`` attached to the
    graph lets the augmented losses train the layers before the perturbation point.
    """
    _check_strengths(clean, adv, n)
    return [_lerp(clean, adv, i / n) for i in range(1, n + 1)]
