"""Normalization pieces of the method (docs/method.md items 3 and 5).

* ``mix_statistics``: adversarial feature normalization, the clean feature re-normalised
  to carry the statistics of an adversarial one.
* ``AuxBatchNorm2d`` with ``use_aux_bn``, ``convert_aux_bn`` and ``strip_aux_bn``: AdvProp's
  auxiliary BatchNorm, laid out like timm's ``SplitBatchNorm2d`` so its checkpoints load.
* ``AuxNorm`` with ``convert_aux_norm``: the same for LayerNorm and GroupNorm layers (ViTs,
  ConvNeXts), routed by the same ``use_aux_bn``.
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


def _resolve_dim(t: torch.Tensor, dim: Optional[Dim], caller: str) -> Dim:
    """``dim``, or where it was left out, 1: the channels of an NCHW (or ``[B, C]``) feature.

    A 3-D feature has no such default: its channels may be last (``[B, N, C]`` tokens, where
    dim 1 would mix across tokens) or second (``[B, C, L]``), so the caller must say which.
    """
    if dim is not None:
        return dim
    if t.dim() == 3:
        raise ValueError(
            f"{caller}: a 3-D feature {tuple(t.shape)} needs an explicit dim: for token "
            "features [B, N, C] pass dim=-1 (statistics over the channels, last), for "
            "[B, C, L] pass dim=1"
        )
    return 1


def mix_statistics(clean: torch.Tensor, adv: torch.Tensor, *, dim: Optional[Dim] = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """``(clean - mu(clean)) / sigma(clean) * sigma(adv) + mu(adv)``, statistics over ``dim``.

    ``dim=1`` (the release, and the default for NCHW features) takes mean and standard
    deviation across channels at every position; ``dim=(0, 2, 3)`` is the BatchNorm-style
    variant, per channel over batch and space. Token features ``[B, N, C]`` take ``dim=-1``
    (across channels for every token); for 3-D features ``dim`` has no default, since dim 1
    would silently mix across tokens. ``sigma = sqrt(var + eps)`` with the unbiased variance
    (``correction=1``), as the release computes it (``Tensor.var``). The result is computed in
    at least float32 and stays differentiable in both inputs.
    """
    if clean.shape != adv.shape:
        raise ValueError(
            f"mix_statistics: clean and adv must have the same shape, got {tuple(clean.shape)} "
            f"and {tuple(adv.shape)}"
        )
    dim = _resolve_dim(clean, dim, "mix_statistics")
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


def mix_by_mask(clean: torch.Tensor, features: list[torch.Tensor], mask: str, *,
                dim: Optional[Dim] = None, eps: float = 1e-5) -> list[torch.Tensor]:
    """Apply ``mix_statistics`` (with its ``dim``) to the features whose mask character is ``"1"``.

    ``mask`` has one character per feature, e.g. ``"0011"`` for the four strengths of the
    detection release: the two weakest stay as they are, the two strongest are replaced by
    the clean feature carrying their statistics.
    """
    check_mask(mask, len(features))
    dim = _resolve_dim(clean, dim, "mix_by_mask")  # loud even where the mask mixes nothing
    return [mix_statistics(clean, f, dim=dim, eps=eps) if m == "1" else f for m, f in zip(mask, features)]


def mixed_strength(clean: torch.Tensor, adv: torch.Tensor, i: int, mask: str, *,
                   dim: Optional[Dim] = None) -> torch.Tensor:
    """The ``i``-th (``1..len(mask)``) of ``mix_by_mask(clean, interpolate(clean, adv, n), mask)``
    alone (``n = len(mask)``), for a caller that runs one strength at a time."""
    check_mask(mask, len(mask))
    dim = _resolve_dim(clean, dim, "mixed_strength")  # loud for unmixed strengths too
    feature = strength(clean, adv, i, len(mask))
    return mix_statistics(clean, feature, dim=dim) if mask[i - 1] == "1" else feature


# Children of timm's BatchNormAct2d that run after the normalisation, in timm's order.
_POST_NORM_CHILDREN = ("drop", "act")

# The layer types that can get auxiliary branches, subclasses included.
_SUPPORTED_KINDS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _routed(layer: nn.Module, x: torch.Tensor, main) -> torch.Tensor:
    """``layer``'s output for ``x`` under the route ``use_aux_bn`` set on it; ``main(x)`` runs
    its main branch, ``layer.aux_bn`` holds the auxiliary ones."""
    if layer.route is None or not (layer.training or layer.__dict__.get("route_in_eval", False)):
        return main(x)
    if layer.route == "aux":
        return layer.aux_bn[0](x)
    chunks, name, branches = layer.route, type(layer).__name__, layer.aux_bn
    if x.shape[0] % chunks:
        raise ValueError(
            f"{name}: a batch of {x.shape[0]} cannot be split into {chunks} equal "
            "chunks; stack the passes so that every chunk has the same size"
        )
    if len(branches) not in (1, chunks - 1):
        raise ValueError(
            f"{name}: split={chunks} needs 1 or {chunks - 1} auxiliary branches, "
            f"this layer has {len(branches)}"
        )
    parts = x.split(x.shape[0] // chunks)
    out = [main(parts[0])]
    for i, part in enumerate(parts[1:]):
        out.append(branches[i if len(branches) > 1 else 0](part))
    return torch.cat(out)


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
        _check_num_aux(num_aux, "AuxBatchNorm2d")
        self.aux_bn = nn.ModuleList(
            nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            for _ in range(num_aux)
        )
        # None: main BN; "aux": auxiliary BN; an int k: k chunks. Set by `use_aux_bn`.
        self.route: Union[None, str, int] = None
        # The class this layer replaced, restored by `strip_aux_bn`.
        self.plain_type: type = nn.BatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _routed(self, x, super().forward)
        for name in _POST_NORM_CHILDREN:
            if name in self._modules:
                x = self._modules[name](x)
        return x

    @staticmethod
    def check_convertible(bn: nn.BatchNorm2d) -> None:
        """TypeError unless ``bn``'s children are only the ones ``forward`` runs."""
        extra = set(bn._modules) - set(_POST_NORM_CHILDREN)
        if extra:
            raise TypeError(
                f"cannot convert {type(bn).__name__}: it has child modules {sorted(extra)} that "
                f"AuxBatchNorm2d does not know how to run (only {list(_POST_NORM_CHILDREN)})"
            )

    @classmethod
    def convert_(cls, bn: nn.BatchNorm2d, num_aux: int = 1) -> "AuxBatchNorm2d":
        """Turn ``bn`` itself into an ``AuxBatchNorm2d`` and return it.

        In place, so that every reference to ``bn`` (a tail assembled from a model's layers,
        an optimizer holding its parameters) sees the converted layer: its own parameters,
        statistics, children (timm's ``drop``/``act``) and hooks stay as they are, and each
        auxiliary branch starts as a copy of its state.
        """
        cls.check_convertible(bn)
        _check_num_aux(num_aux, cls.__name__)
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        branches = nn.ModuleList(
            nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory)
            for _ in range(num_aux)
        )
        own = {**dict(bn.named_parameters(recurse=False)), **dict(bn.named_buffers(recurse=False))}
        for branch in branches:
            branch.load_state_dict({key: own[key] for key in branch.state_dict()})
            branch.train(bn.training)
            for name, param in bn.named_parameters(recurse=False):  # keep frozen affines frozen
                getattr(branch, name).requires_grad_(param.requires_grad)
        plain_type = type(bn)
        # The main branch's state is exactly the BatchNorm2d's, so only the class changes.
        bn.__class__ = cls
        bn.aux_bn = branches
        bn.route = None
        bn.plain_type = plain_type
        return bn

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_aux: int = 1) -> "AuxBatchNorm2d":
        """A copy of ``bn`` whose main and auxiliary branches both start from its state
        (``bn`` itself is left as it is; ``convert_`` converts it in place)."""
        cls.check_convertible(bn)  # before the copy, which would be wasted
        return cls.convert_(copy.deepcopy(bn), num_aux)

    def to_plain(self) -> nn.BatchNorm2d:
        """The main branch as the class this layer replaced (auxiliary BN dropped)."""
        plain = copy.deepcopy(self)
        _strip_(plain)
        return plain


class AuxNorm(nn.Module):
    """A LayerNorm or GroupNorm layer (or a subclass: timm's ``LayerNorm2d``, ``GroupNorm1``,
    torchvision ConvNeXt's ``LayerNorm2d``, ...) with auxiliary copies for adversarial inputs.

    Made by ``convert_aux_norm``, which switches the layer's class in place to ``Aux<Name>``,
    a subclass of both this class and the layer's own class: ``isinstance`` checks for the
    original class still hold and its ``forward`` (timm's ``LayerNorm2d`` permutes NCHW to
    channels last, say) runs the main branch, with the layer's own parameters. The
    auxiliary branches are copies of the original layer in ``aux_bn.0`` (``aux_bn.1``, ...),
    the key AdvProp's BatchNorm uses, so ``strip_aux_state_dict`` drops them too.
    ``use_aux_bn`` routes training-mode passes as for ``AuxBatchNorm2d``; with ``split`` the
    chunks match separate passes exactly, since these layers normalise each sample on its
    own. They keep no running statistics, so evaluation always uses the main branch.
    """

    plain_type: type  # the class this layer had, set on each generated subclass
    aux_bn: nn.ModuleList
    route: Union[None, str, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _routed(self, x, lambda t: self.plain_type.forward(self, t))

    def __reduce_ex__(self, protocol):
        # The generated class cannot be found by name when unpickling: rebuild it from the
        # (importable) original class instead, then restore the state as pickle does.
        _, _, *state = super().__reduce_ex__(protocol)
        return (_new_aux_norm, (self.plain_type,), *state)

    @staticmethod
    def convert_(layer: nn.Module, num_aux: int = 1) -> "AuxNorm":
        """Turn the LayerNorm or GroupNorm ``layer`` itself into an ``AuxNorm`` and return it
        (in place, like ``AuxBatchNorm2d.convert_``), each auxiliary branch a copy of it."""
        if not isinstance(layer, (nn.LayerNorm, nn.GroupNorm)) or isinstance(layer, AuxNorm):
            raise TypeError(f"AuxNorm: cannot convert {type(layer).__name__}: only a LayerNorm or "
                            "GroupNorm layer (or subclass) not converted before")
        _check_num_aux(num_aux, "AuxNorm")
        branches = nn.ModuleList(_branch_copy(layer) for _ in range(num_aux))
        layer.__class__ = _aux_class(type(layer))
        layer.aux_bn = branches
        layer.route = None
        return layer


_AUX_CLASSES: dict[type, type] = {}


def _aux_class(plain: type) -> type:
    """The ``AuxNorm`` subclass of ``plain``, made once per class so that layers of one type
    share it."""
    if plain not in _AUX_CLASSES:
        _AUX_CLASSES[plain] = type(f"Aux{plain.__name__}", (AuxNorm, plain),
                                   {"plain_type": plain, "__module__": __name__})
    return _AUX_CLASSES[plain]


def _new_aux_norm(plain: type) -> AuxNorm:
    """An empty instance of ``plain``'s ``AuxNorm`` subclass, for unpickling."""
    cls = _aux_class(plain)
    return cls.__new__(cls)


def _branch_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` for an auxiliary branch: same class, parameters and state, but no
    gradients and none of the forward/backward hooks registered on ``layer``; those watch
    the layer, which still runs them once per call."""
    branch = copy.deepcopy(layer)
    branch.zero_grad(set_to_none=True)
    for module in branch.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                      module._backward_hooks):
            hooks.clear()
    return branch


def _check_num_aux(num_aux: int, caller: str) -> None:
    if num_aux < 1:
        raise ValueError(f"{caller}: num_aux must be at least 1, got {num_aux}")


def _strip_(layer: Union[AuxBatchNorm2d, AuxNorm]) -> None:
    """Turn a converted layer back, in place, into its main branch as its original class."""
    plain_type = layer.plain_type
    del layer.aux_bn
    del layer.route
    layer.__dict__.pop("route_in_eval", None)
    layer.__dict__.pop("plain_type", None)  # AuxBatchNorm2d's; AuxNorm's is on the class
    layer.__class__ = plain_type


def _aux_layers(model: nn.Module) -> list[Union[AuxBatchNorm2d, AuxNorm]]:
    return [m for m in model.modules() if isinstance(m, (AuxBatchNorm2d, AuxNorm))]


@contextlib.contextmanager
def use_aux_bn(model: nn.Module, split: Optional[int] = None, enabled: bool = True,
               in_eval: bool = False) -> Iterator[None]:
    """Route training-mode passes of every auxiliary layer in ``model`` (``AuxBatchNorm2d``
    and ``AuxNorm``).

    Without ``split`` the whole batch goes through the auxiliary branches; with ``split=k``
    the batch is ``k`` equal chunks ``[clean; adv; ...]`` along dim 0 of every auxiliary
    layer's input, and only the first uses the main branch (so a sequence-first transformer,
    ``batch_first=False``, cannot use ``split``). ``enabled=False`` makes the context a no-op,
    for code where auxiliary BN is optional. Eval-mode passes use the main branch, as timm's
    ``SplitBatchNorm2d`` does, unless ``in_eval=True``: then they are routed too, each branch
    with its own running statistics (to evaluate or attack a model through its auxiliary
    norms).
    """
    if not enabled:
        yield
        return
    if split is not None and (isinstance(split, bool) or not isinstance(split, numbers.Integral) or split < 2):
        raise ValueError(f"use_aux_bn: split must be an integer of at least 2, got {split!r}")
    layers = _aux_layers(model)
    if not layers:
        raise ValueError(
            "use_aux_bn: the model has no auxiliary layers (AuxBatchNorm2d, AuxNorm); convert "
            "it first with afan.convert_aux_bn(model) (BatchNorm) or afan.convert_aux_norm(model) "
            "(also LayerNorm, GroupNorm), or pass enabled=False"
        )
    previous = [(layer.route, layer.__dict__.get("route_in_eval", False)) for layer in layers]
    route = "aux" if split is None else int(split)
    try:
        for layer in layers:
            layer.route, layer.route_in_eval = route, in_eval
        yield
    finally:
        for layer, (old, old_in_eval) in zip(layers, previous):
            layer.route, layer.route_in_eval = old, old_in_eval


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


def _reached_by(model: nn.Module, after: str, example_input, kinds: tuple[type, ...], caller: str) -> set[str]:
    """Names of the ``kinds`` layers whose input depends on the output of ``after``.

    Traced with one forward pass: parameters stop tracking gradients, the output of
    ``after`` is marked as requiring them, and each such layer records whether its input
    carries that mark.
    """
    reached: set[str] = set()
    hooks = []
    target = model.get_submodule(after)

    def mark(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{caller}: {after!r} returns {type(output).__name__}, not a tensor; "
                "name the module whose output tensor is perturbed"
            )
        return output.detach().requires_grad_(True)

    hooks.append(target.register_forward_hook(mark))
    for name, module in model.named_modules():
        if isinstance(module, kinds):
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


def _nothing_to_convert(model: nn.Module, kinds: tuple[type, ...], caller: str, hint: str) -> str:
    """The message for a model without any ``kinds`` layer, naming the norm layers it has."""
    message = f"{caller}: the model has no {' or '.join(k.__name__ for k in kinds)} layer to convert"
    found: dict[str, str] = {}  # class name -> the first layer of that class
    for name, m in model.named_modules():
        if isinstance(m, _SUPPORTED_KINDS):
            found.setdefault(type(m).__name__, name)
    if not found:
        return (f"{message}, nor any other layer auxiliary branches support (BatchNorm2d, LayerNorm, "
                "GroupNorm and their subclasses)")
    layers = ", ".join(f"{cls} (e.g. {name!r})" for cls, name in found.items())
    return f"{message}; it normalises with {layers}: {hint}"


def registered_after(model: nn.Module, after: str) -> list[str]:
    """Names of the modules registered after the module ``after`` (not inside it): those the
    output of ``after`` reaches in torchvision/timm backbones and sequential models."""
    names = [name for name, _ in model.named_modules()]
    position = names.index(after)
    return [name for name in names[position + 1:] if not name.startswith(after + ".")]


def _convert(model: nn.Module, after: Optional[str], num_aux: int, example_input,
             kinds: tuple[type, ...], caller: str, hint: str) -> nn.Module:
    _check_num_aux(num_aux, caller)
    if not any(isinstance(m, kinds) for m in model.modules()):
        raise ValueError(_nothing_to_convert(model, kinds, caller, hint))
    converted = [name for name, m in model.named_modules() if isinstance(m, (AuxBatchNorm2d, AuxNorm))]

    def convertible(name, m):
        # Layers converted before, and the branches inside them, stay as they are.
        inside = any(name == c or name.startswith(c + ".") for c in converted)
        return isinstance(m, kinds) and not inside

    candidates = [name for name, m in model.named_modules() if convertible(name, m)]
    if after is not None:
        names = [name for name, _ in model.named_modules()]
        if after not in names:
            close = difflib.get_close_matches(after, names, n=3)
            top = [name for name, _ in model.named_children()]
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{caller}: the model has no module named {after!r}.{suggestion} "
                f"Top-level modules: {top}"
            )
        if example_input is not None:
            reached = _reached_by(model, after, example_input, kinds, caller)
            candidates = [name for name in candidates if name in reached]
        else:
            later = set(registered_after(model, after))
            candidates = [name for name in candidates if name in later]
    if after is not None and not candidates and not converted:
        # The adversarial passes would find no auxiliary layer to use (use_aux_bn refuses).
        raise ValueError(f"{caller}: no {' or '.join(k.__name__ for k in kinds)} layer runs after {after!r}, so "
                         "adversarial passes there have no auxiliary layer to use; split earlier, or leave "
                         "auxiliary norms off")
    layers = [model.get_submodule(name) for name in candidates]
    for layer in layers:  # every check before the first change: no half-converted model
        if isinstance(layer, nn.BatchNorm2d):
            AuxBatchNorm2d.check_convertible(layer)
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d):
            AuxBatchNorm2d.convert_(layer, num_aux)
        else:
            AuxNorm.convert_(layer, num_aux)
    return model


def convert_aux_bn(model: nn.Module, after: Optional[str] = None, *, num_aux: int = 1,
                   example_input=None) -> nn.Module:
    """Turn BatchNorm2d layers into ``AuxBatchNorm2d``, both branches starting from the
    layer's weights and statistics. Changes ``model`` in place and returns it.

    The layers are converted in place (``AuxBatchNorm2d.convert_``): a module assembled from
    the model's layers before the conversion, e.g. ``nn.Sequential(model.layer3, model.bn2)``,
    runs the converted layers too.

    ``after="layer2"`` converts only the layers that run after that named module, the ones
    the adversarial feature reaches. Without ``example_input`` these are the layers
    registered after it (right for torchvision/timm backbones and sequential models);
    with an ``example_input`` one forward pass traces which layers its output really reaches
    (needed where a later module also takes earlier features, e.g. DeepLabv3+'s decoder).
    A model without any BatchNorm2d is a ValueError; for LayerNorm/GroupNorm models (ViTs,
    ConvNeXts) use ``convert_aux_norm``.
    """
    return _convert(model, after, num_aux, example_input, (nn.BatchNorm2d,), "convert_aux_bn",
                    "use afan.convert_aux_norm(model), which gives those layers auxiliary branches too")


def convert_aux_norm(model: nn.Module, after: Optional[str] = None, *, num_aux: int = 1,
                     example_input=None,
                     kinds: tuple[type, ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) -> nn.Module:
    """``convert_aux_bn`` for every layer of ``kinds`` (subclasses included): BatchNorm2d
    layers become ``AuxBatchNorm2d``, LayerNorm and GroupNorm layers ``AuxNorm``, all in place
    and routed by ``use_aux_bn``. ``after`` and ``example_input`` select layers as there.

    ``kinds`` narrows the conversion, e.g. ``(nn.LayerNorm,)``, or ``(timm.layers.LayerNorm2d,)``
    for that subclass alone; each must be a subclass of BatchNorm2d, LayerNorm or GroupNorm.
    A model without any layer of ``kinds`` is a ValueError.
    """
    kinds = (kinds,) if isinstance(kinds, type) else tuple(kinds)
    unsupported = [k for k in kinds if not (isinstance(k, type) and issubclass(k, _SUPPORTED_KINDS))]
    if not kinds or unsupported:
        raise TypeError(
            f"convert_aux_norm: kinds must be subclasses of BatchNorm2d, LayerNorm or GroupNorm, "
            f"got {list(kinds)}"
        )
    return _convert(model, after, num_aux, example_input, kinds, "convert_aux_norm",
                    "add their classes to kinds")


def strip_aux_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every auxiliary layer (``AuxBatchNorm2d``, ``AuxNorm``) back to
    its plain main-branch layer of the original class, for deployment; ``model`` itself is
    left unchanged."""
    model = copy.deepcopy(model)
    for layer in _aux_layers(model):
        _strip_(layer)
    return model


def strip_aux_state_dict(state_dict: dict) -> dict:
    """``state_dict`` without the auxiliary entries (``*.aux_bn.*``, of ``AuxBatchNorm2d`` and
    ``AuxNorm`` alike), for loading a checkpoint trained with auxiliary layers into a plain
    model."""
    return {k: v for k, v in state_dict.items() if ".aux_bn." not in f".{k}"}
