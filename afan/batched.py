"""A-FAN's ``n`` strength passes through the tail as one pass over ``n × B`` samples.

A-FAN runs the tail once per strength (:class:`afan.AFAN`, :func:`afan.backward_each`). Where
every layer of the tail computes each sample's output from that sample alone (convolutions,
linears, GroupNorm and LayerNorm, BatchNorm reading its running statistics: eval mode, or
torchvision's ``FrozenBatchNorm2d`` as detection backbones use), the ``n`` passes can run as
one: the strength features concatenated along the batch, the tail run once, its output split
back into the ``n`` strengths and the criterion applied to each part. The losses, and so
their gradients, are the ``n`` passes' (up to the order of floating-point sums), from fewer
and larger kernels::

    losses = afan.batch_strengths(tail, [f_1, ..., f_n], criterion, target)
    loss_adv = torch.stack(losses).mean()       # AFAN's reduction: the mean over strengths

The joined pass holds the graphs of all ``n`` strengths until its backward, as a plain sum of
the ``n`` losses does; :func:`afan.backward_each`, passes one by one, holds one at a time.

Where a layer would see the other strengths (BatchNorm normalising with its batch's
statistics in training mode, auxiliary BatchNorm included; a layer that ``use_aux_bn(split=k)``
cuts into chunks; InstanceNorm updating running statistics once per call), joining the
strengths changes what each one computes, so ``batch_strengths`` refuses with a ValueError
naming the layer. Dropout draws its masks for the joined batch: the same distribution as ``n``
passes, not the same numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from afan.norm import AuxBatchNorm2d, AuxNorm

__all__ = ["batch_strengths", "per_sample_only"]


def _batch_dependence(module: nn.Module) -> Optional[str]:
    """Why ``module``'s output for one sample would depend on the other samples of its batch
    (or its state on how the batch is cut into calls), or None."""
    if isinstance(module, (AuxBatchNorm2d, AuxNorm)) and module.training and isinstance(module.route, int):
        return f"cuts its batch into {module.route} chunks (afan.use_aux_bn(split={module.route}))"
    # BatchNorm's own rule: batch statistics in training mode, or without running statistics.
    if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
        return "normalises with the statistics of its batch (a BatchNorm in training mode)"
    if isinstance(module, _InstanceNorm) and module.training and module.track_running_stats:
        return "updates its running statistics once per call, from the whole batch"
    return None


class _RefuseBatchDependence:
    """Raises, before a layer that depends on its batch runs, a ValueError naming it: no state
    has changed by then, since only such layers change state in a forward pass."""

    def __init__(self, names: dict[int, str]):
        self.names = names

    def __enter__(self):
        self.handle = nn.modules.module.register_module_forward_pre_hook(self.check)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def check(self, module: nn.Module, inputs) -> None:
        why = _batch_dependence(module)
        if why is None:
            return
        name = self.names.get(id(module))
        layer = f"{name!r} ({type(module).__name__})" if name else f"a {type(module).__name__} layer"
        raise ValueError(
            f"batch_strengths: {layer} {why}, so one pass over the strengths joined would not "
            "compute what one pass per strength does. Run one pass per strength instead "
            "(afan.backward_each with one loss per strength), or make the layer independent of "
            "its batch: eval mode, torchvision.ops.misc.FrozenBatchNorm2d, GroupNorm or LayerNorm"
        )


def _module_names(source: Optional[nn.Module]) -> dict[int, str]:
    return {} if source is None else {id(m): name for name, m in source.named_modules() if name}


def per_sample_only(model: Optional[nn.Module] = None) -> _RefuseBatchDependence:
    """A context in which every forward pass of a layer whose output for one sample would
    depend on the other samples of its batch (see the module docstring) raises a ValueError,
    before the layer runs, naming it by its name in ``model``: for a pass of your own over
    several strengths joined along the batch, where :func:`batch_strengths` cannot split the
    output per strength (e.g. a detector's losses)."""
    return _RefuseBatchDependence(_module_names(model))


def _repeated(value: Any, n: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"batch_strengths: the tail's extra inputs must be tensors with the batch first, to be "
                        f"repeated for each strength; got {type(value).__name__}")
    return torch.cat([value] * n)


def _split(output: Any, n: int, total: int) -> list[Any]:
    """The ``n`` strengths' parts of the joined pass's output (tensors with ``total`` samples
    first, or tuples, lists and dicts of them)."""
    if isinstance(output, Tensor):
        if output.dim() == 0 or output.shape[0] != total:
            raise ValueError(f"batch_strengths: the tail returned a tensor of shape {tuple(output.shape)} for "
                             f"{total} samples; it must keep the samples along dim 0 to be split per strength")
        return list(output.chunk(n))
    if isinstance(output, dict):
        parts = {key: _split(value, n, total) for key, value in output.items()}
        return [{key: value[i] for key, value in parts.items()} for i in range(n)]
    if isinstance(output, (tuple, list)):
        columns = list(zip(*(_split(value, n, total) for value in output)))
        if hasattr(output, "_fields"):  # a namedtuple takes its fields as arguments
            return [type(output)(*column) for column in columns]
        return [type(output)(column) for column in columns]
    raise TypeError(f"batch_strengths: cannot split the tail's output of type {type(output).__name__} per "
                    "strength; return tensors (or tuples, lists or dicts of them) with the samples first")


def batch_strengths(tail: Callable, features: Sequence[Tensor], criterion: Callable[[Any, Any], Tensor], target,
                    *inputs: Tensor, model: Optional[nn.Module] = None) -> list[Tensor]:
    """``[criterion(tail(f, *inputs), target) for f in features]`` from one pass of ``tail``
    over the features concatenated along dim 0 (each ``[B, ...]``, one per strength).

    ``inputs`` (the model's input ``x`` for a tail ``tail(h, x)``) are repeated once per
    strength, unless the tail says it does not read them (``tail.needs_input`` False, as
    :func:`afan.split`'s tails do). The output, tensors with the ``n × B`` samples first (or
    tuples, lists and dicts of them), is split back into the strengths, so ``criterion``
    sees exactly what it would in ``n`` passes, whatever its reduction. ``model`` (default:
    the tail, if it is a module) names the layer in the ValueError raised where a layer of
    the pass depends on its batch (see the module docstring).
    """
    if not features:
        raise ValueError("batch_strengths: no features given; pass one [B, ...] feature per strength")
    shape = features[0].shape
    if any(f.shape != shape for f in features):
        raise ValueError(f"batch_strengths: the strengths must have one shape, got "
                         f"{sorted({tuple(f.shape) for f in features})}")
    n = len(features)
    if getattr(tail, "needs_input", True):
        inputs = tuple(_repeated(value, n) for value in inputs)
    with per_sample_only(model if model is not None else tail if isinstance(tail, nn.Module) else None):
        output = tail(torch.cat(list(features)), *inputs)
    return [criterion(part, target) for part in _split(output, n, n * shape[0])]
