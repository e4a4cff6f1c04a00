"""Normalization pieces of the method (DESIGN.md items 3 and 5).

* ``mix_statistics``: adversarial feature normalization, the clean feature re-normalised
  to carry the statistics of an adversarial one.
* ``AuxBatchNorm2d`` with ``use_aux_bn``, ``convert_aux_bn`` and ``strip_aux_bn``: AdvProp's
  auxiliary BatchNorm, laid out like timm's ``SplitBatchNorm2d`` so its checkpoints load.
* ``frozen_bn_stats``: run attack passes with batch statistics without touching running
  statistics (a deliberate option: the release's attack passes update them).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import numbers
from typing import Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from afan.perturb import strength

Dim = Union[int, tuple[int, ...]]


def mix_statistics(clean: torch.Tensor, adv: torch.Tensor, *, dim: Dim = 1, eps: float = 1e-5) -> torch.Tensor:
    """``(clean - mu(clean)) / sigma(clean) * sigma(adv) + mu(adv)``, statistics over ``dim``.

    ``dim=1`` (the release) takes mean and standard deviation across channels at every
    position; ``dim=(0, 2, 3)`` is the BatchNorm-style variant, per channel over batch and
    space. ``sigma = sqrt(var + eps)`` with the unbiased variance (``correction=1``), as the
    release computes it (``Tensor.var``). The result is computed in at least float32 and stays
    differentiable in both inputs.
    """
    if clean.shape != adv.shape:
        raise ValueError(
            f"mix_statistics: clean and adv must have the same shape, got {tuple(clean.shape)} "
            f"and {tuple(adv.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(clean.dtype, adv.dtype), torch.float32)
    clean, adv = clean.to(dtype), adv.to(dtype)

    def moments(t):
        var, mean = torch.var_mean(t, dim=dim, keepdim=True, correction=1)
        return mean, torch.sqrt(var + eps)

    clean_mean, clean_std = moments(clean)
    adv_mean, adv_std = moments(adv)
    return (clean - clean_mean) / clean_std * adv_std + adv_mean


def check_mask(mask: str, n: int, name: str = "mixing mask") -> None:
    """ValueError unless ``mask`` has one ``"0"``/``"1"`` character per strength."""
    if len(mask) != n or set(mask) - {"0", "1"}:
        example = "0" * (n // 2) + "1" * (n - n // 2)
        raise ValueError(f"{name} {mask!r} must be {n} characters of '0'/'1', one per strength "
                         f"(n = {n}), e.g. {example!r}")


def mix_by_mask(clean: torch.Tensor, features: list[torch.Tensor], mask: str, *, dim: Dim = 1,
                eps: float = 1e-5) -> list[torch.Tensor]:
    """Apply ``mix_statistics`` to the features whose mask character is ``"1"``.

    ``mask`` has one character per feature, e.g. ``"0011"`` for the four strengths of the
    detection release: the two weakest stay as they are, the two strongest are replaced by
    the clean feature carrying their statistics.
    """
    check_mask(mask, len(features))
    return [mix_statistics(clean, f, dim=dim, eps=eps) if m == "1" else f for m, f in zip(mask, features)]


def mixed_strength(clean: torch.Tensor, adv: torch.Tensor, i: int, mask: str, *, dim: Dim = 1) -> torch.Tensor:
    """The ``i``-th (``1..len(mask)``) of ``mix_by_mask(clean, interpolate(clean, adv, n), mask)``
    alone (``n = len(mask)``), for a caller that runs one strength at a time."""
    check_mask(mask, len(mask))
    feature = strength(clean, adv, i, len(mask))
    return mix_statistics(clean, feature, dim=dim) if mask[i - 1] == "1" else feature


# Children of timm's BatchNormAct2d that run after the normalisation, in timm's order.
_POST_NORM_CHILDREN = ("drop", "act")


class AuxBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with auxiliary BatchNorm(s) for adversarial inputs (AdvProp).

    The main statistics and affine parameters are this module's own; the auxiliary ones
    live in ``aux_bn.0`` (``aux_bn.1``, ... with ``num_aux > 1``), the layout of timm's
    ``SplitBatchNorm2d``. Routing in training mode is set by ``use_aux_bn``: the main BN by
    default, the auxiliary BN inside ``use_aux_bn(model)``, and inside
    ``use_aux_bn(model, split=k)`` the batch is ``k`` equal chunks, the first through the
    main BN and chunk ``i`` through ``aux_bn[i - 1]`` (or ``aux_bn[0]`` when there is only
    one), each normalised with its own batch statistics. Evaluation always uses the main BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, num_aux: int = 1,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if num_aux < 1:
            raise ValueError(f"AuxBatchNorm2d: num_aux must be at least 1, got {num_aux}")
        self.aux_bn = nn.ModuleList(
            nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            for _ in range(num_aux)
        )
        # None: main BN; "aux": auxiliary BN; an int k: k chunks. Set by `use_aux_bn`.
        self.route: Union[None, str, int] = None
        # The class this layer replaced, restored by `strip_aux_bn`.
        self.plain_type: type = nn.BatchNorm2d

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.route is None:
            return super().forward(x)
        if self.route == "aux":
            return self.aux_bn[0](x)
        chunks = self.route
        if x.shape[0] % chunks:
            raise ValueError(
                f"AuxBatchNorm2d: a batch of {x.shape[0]} cannot be split into {chunks} equal "
                "chunks; stack the passes so that every chunk has the same size"
            )
        if len(self.aux_bn) not in (1, chunks - 1):
            raise ValueError(
                f"AuxBatchNorm2d: split={chunks} needs 1 or {chunks - 1} auxiliary BNs, "
                f"this layer has {len(self.aux_bn)}"
            )
        parts = x.split(x.shape[0] // chunks)
        out = [super().forward(parts[0])]
        for i, part in enumerate(parts[1:]):
            out.append(self.aux_bn[i if len(self.aux_bn) > 1 else 0](part))
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalize(x)
        for name in _POST_NORM_CHILDREN:
            if name in self._modules:
                x = self._modules[name](x)
        return x

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_aux: int = 1) -> "AuxBatchNorm2d":
        """A copy of ``bn`` whose main and auxiliary branches both start from its state."""
        extra = set(bn._modules) - set(_POST_NORM_CHILDREN)
        if extra:
            raise TypeError(
                f"cannot convert {type(bn).__name__}: it has child modules {sorted(extra)} that "
                f"AuxBatchNorm2d does not know how to run (only {list(_POST_NORM_CHILDREN)})"
            )
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        aux = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  num_aux=num_aux, **factory)
        state = bn.state_dict()
        aux.load_state_dict(state, strict=False)
        for branch in aux.aux_bn:
            branch.load_state_dict(state, strict=False)
        for name, child in bn.named_children():
            aux.add_module(name, child)
        aux.plain_type = type(bn)
        aux.train(bn.training)
        for name, param in bn.named_parameters(recurse=False):  # keep frozen affines frozen
            for branch in (aux, *aux.aux_bn):
                getattr(branch, name).requires_grad_(param.requires_grad)
        return aux

    def to_plain(self) -> nn.BatchNorm2d:
        """The main branch as the class this layer replaced (auxiliary BN dropped)."""
        plain = copy.deepcopy(self)
        del plain.aux_bn
        del plain.route, plain.plain_type
        # The main branch's state is exactly a BatchNorm2d's (plus timm's drop/act
        # children), so switching the class back restores the original layer type.
        plain.__class__ = self.plain_type
        return plain


def _aux_layers(model: nn.Module) -> list[AuxBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, AuxBatchNorm2d)]


@contextlib.contextmanager
def use_aux_bn(model: nn.Module, split: Optional[int] = None, enabled: bool = True) -> Iterator[None]:
    """Route training-mode passes of every ``AuxBatchNorm2d`` in ``model``.

    Without ``split`` the whole batch goes through the auxiliary BN; with ``split=k`` the
    batch is ``k`` equal chunks ``[clean; adv; ...]`` and only the first uses the main BN.
    ``enabled=False`` makes the context a no-op, for code where auxiliary BN is optional.
    """
    if not enabled:
        yield
        return
    if split is not None and (isinstance(split, bool) or not isinstance(split, numbers.Integral) or split < 2):
        raise ValueError(f"use_aux_bn: split must be an integer of at least 2, got {split!r}")
    layers = _aux_layers(model)
    if not layers:
        raise ValueError(
            "use_aux_bn: the model has no AuxBatchNorm2d layers; convert it first with "
            "afan.convert_aux_bn(model), or pass enabled=False"
        )
    previous = [layer.route for layer in layers]
    route = "aux" if split is None else int(split)
    try:
        for layer in layers:
            layer.route = route
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.route = old


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Forward passes inside use BN batch statistics as usual but update no running stats.

    Running mean, variance and ``num_batches_tracked`` of every BatchNorm (main and
    auxiliary) stay as they are: with ``track_running_stats`` off, PyTorch's BatchNorm
    normalises a training-mode batch with its own statistics and skips the update, while
    eval mode still reads the running statistics. ``enabled=False`` changes nothing (the
    release's attack passes, which update the running statistics like any training pass).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats] if enabled else []
    try:
        for layer in layers:
            layer.track_running_stats = False
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _reached_by(model: nn.Module, after: str, example_input) -> set[str]:
    """Names of the BatchNorm layers whose input depends on the output of ``after``.

    Traced with one forward pass: parameters stop tracking gradients, the output of
    ``after`` is marked as requiring them, and each BatchNorm records whether its input
    carries that mark.
    """
    reached: set[str] = set()
    hooks = []
    target = model.get_submodule(after)

    def mark(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"convert_aux_bn: {after!r} returns {type(output).__name__}, not a tensor; "
                "name the module whose output tensor is perturbed"
            )
        return output.detach().requires_grad_(True)

    hooks.append(target.register_forward_hook(mark))
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            def record(m, inputs, name=name):
                if inputs[0].requires_grad:
                    reached.add(name)
            hooks.append(module.register_forward_pre_hook(record))
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()  # eval: no running statistics change during the trace
        with torch.enable_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return reached


def _replace(model: nn.Module, names: set[str], make) -> nn.Module:
    if "" in names:  # the model itself is a BatchNorm
        return make(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(parent.get_submodule(child)))
    return model


def convert_aux_bn(model: nn.Module, after: Optional[str] = None, *, num_aux: int = 1,
                   example_input=None) -> nn.Module:
    """Replace BatchNorm2d layers by ``AuxBatchNorm2d``, both branches starting from the
    layer's weights and statistics. Changes ``model`` in place and returns it.

    ``after="layer2"`` converts only the layers that run after that named module, the ones
    the adversarial feature reaches. Without ``example_input`` these are the layers
    registered after it (right for torchvision/timm backbones and sequential models);
    with an ``example_input`` one forward pass traces which layers its output really reaches
    (needed where a later module also takes earlier features, e.g. DeepLabv3+'s decoder).
    """
    converted = [name for name, m in model.named_modules() if isinstance(m, AuxBatchNorm2d)]

    def convertible(name, m):
        # Layers converted before, and the branches inside them, stay as they are.
        inside = any(name == c or name.startswith(c + ".") for c in converted)
        return isinstance(m, nn.BatchNorm2d) and not inside

    candidates = [name for name, m in model.named_modules() if convertible(name, m)]
    if after is not None:
        names = [name for name, _ in model.named_modules()]
        if after not in names:
            close = difflib.get_close_matches(after, names, n=3)
            top = [name for name, _ in model.named_children()]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"convert_aux_bn: the model has no module named {after!r}.{hint} "
                f"Top-level modules: {top}"
            )
        if example_input is not None:
            reached = _reached_by(model, after, example_input)
            candidates = [name for name in candidates if name in reached]
        else:
            position = names.index(after)
            candidates = [name for name in candidates
                          if names.index(name) > position and not name.startswith(after + ".")]
    return _replace(model, set(candidates), lambda bn: AuxBatchNorm2d.from_bn(bn, num_aux))


def strip_aux_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``AuxBatchNorm2d`` back to its plain main-branch layer,
    for deployment; ``model`` itself is left unchanged."""
    model = copy.deepcopy(model)
    names = {name for name, m in model.named_modules() if isinstance(m, AuxBatchNorm2d)}
    return _replace(model, names, AuxBatchNorm2d.to_plain)


def strip_aux_state_dict(state_dict: dict) -> dict:
    """``state_dict`` without the auxiliary-BN entries (``*.aux_bn.*``), for loading a
    checkpoint trained with auxiliary BN into a plain model."""
    return {k: v for k, v in state_dict.items() if ".aux_bn." not in f".{k}"}
