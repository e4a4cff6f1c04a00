"""Several loss passes over the same inputs, each back-propagated as soon as it is computed.

A-FAN runs the tail of the network once per perturbation strength. Summing those losses
and back-propagating once keeps every pass's graph alive until the end of the step, so
memory grows with the number of passes. :func:`backward_each` takes each
pass's gradients (towards the inputs and the parameters) right after its forward pass and
frees its graph; the sum it returns carries those gradients, so the single backward of the
step delivers them exactly where the plain sum would have.

The gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written until the step's
own backward), so the step stays one forward and one backward for DistributedDataParallel
and for ``optimizer`` bookkeeping. Under fp16 with a grad scaler the passes are scaled by
the scaler's factor (see :func:`loss_scale`), so their half-precision gradients do not
underflow; an overflow reaches the step's gradients as inf, where the scaler finds it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

_LOSS_SCALE = contextvars.ContextVar("afan_loss_scale", default=1.0)


@contextlib.contextmanager
def loss_scale(scale: float):
    """The factor the step's loss is multiplied by before its backward (a grad scaler's)."""
    token = _LOSS_SCALE.set(float(scale))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


class _TakenGradients(torch.autograd.Function):
    """Value: the total given. Backward: the gradients given, times the incoming gradient."""

    @staticmethod
    def forward(ctx, total, gradients, *inputs):
        ctx.gradients = gradients
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total):
        return (None, None, *(None if g is None else g * grad_total for g in ctx.gradients))


def _at_least_float32(t: Tensor) -> Tensor:
    """Half-precision sums lose the small terms; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def backward_each(inputs: Sequence[Tensor], losses: Sequence[Callable[..., Tensor]],
                  parameters: Iterable[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``sum(loss(*inputs) for loss in losses)`` with each pass's graph freed at once.

    Each ``loss`` gets detached copies of ``inputs`` (features the passes share, e.g. the clean
    backbone features) and returns a scalar. Its gradients towards those copies and towards
    ``parameters`` are taken right away and added up. Returns the sum (a scalar whose backward
    hands those gradients to ``inputs`` and ``parameters``, as back-propagating the plain sum
    would) and each pass's detached value.
    """
    parameters = [p for p in parameters if p.requires_grad]
    leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
    targets = [leaf for leaf in leaves if leaf.requires_grad] + parameters
    scale = _LOSS_SCALE.get()
    sums: list[Tensor | None] = [None] * len(targets)
    values = []
    with torch.enable_grad():
        for loss_fn in losses:
            loss = loss_fn(*leaves)
            values.append(loss.detach())
            grads = torch.autograd.grad(loss * scale, targets, allow_unused=True)
            sums = [s if g is None else _at_least_float32(g) if s is None else s + g for s, g in zip(sums, grads)]
    taken = iter(None if s is None else s / scale for s in sums)
    # One gradient per input of _TakenGradients, in its order; inputs without one get None.
    gradients = tuple(next(taken) if leaf.requires_grad else None for leaf in leaves) + tuple(taken)
    total = _TakenGradients.apply(torch.stack([_at_least_float32(v) for v in values]).sum(), gradients, *inputs,
                                  *parameters)
    return total, values
