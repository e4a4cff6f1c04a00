"""Loading classification checkpoints into plain evaluation models, and the format they use.

``load_model`` reads three formats: this project's ``{"model", "arch", "num_classes", "mean",
"std"}`` (``checkpoint_payload``; ``mean``/``std`` are the model's input normalisation),
plain state dicts (also under a ``state_dict`` key), and the original A-FAN release;
``module.`` prefixes from (Distributed)DataParallel are removed. Every problem with the file
becomes one ``CheckpointError`` that names it; nothing is loaded partially.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from afan import strip_aux_state_dict
from afan.checkpoint import (CheckpointError, key_mismatches, load_checkpoint, resolve_architecture,
                             resolve_num_classes)

from .efficientnet import ARCHS as EFFICIENTNETS
from .library import is_library_name
from .registry import MODEL_NAMES, create_model, model_class
from .release import convert_release_state_dict, is_release_state_dict

_EXAMPLES = 5  # keys quoted per kind of difference in error messages


def checkpoint_payload(model: nn.Module) -> dict:
    """What training scripts save and ``load_model`` reads back. The input normalisation is
    recorded because it is not in the state dict and need not be the name's default
    (``input_norm``, ``mean=``/``std=``)."""
    return {"model": model.state_dict(), "arch": model.arch, "num_classes": model.num_classes,
            "mean": model.normalize.mean.tolist(), "std": model.normalize.std.tolist()}


def _strip_data_parallel(state: Mapping) -> dict:
    """(Distributed)DataParallel saved every key with a ``module.`` prefix."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def _is_plain_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(value, torch.Tensor) for value in obj.values())


def _unpack(path: Path, checkpoint: Mapping):
    """``(state, arch, num_classes, normalisation kwargs)``; arch/num_classes None if unknown."""
    if isinstance(checkpoint.get("model"), Mapping):
        state = _strip_data_parallel(checkpoint["model"])
        arch = checkpoint.get("arch")
        if "mean" in checkpoint and "std" in checkpoint:
            norm = {"mean": checkpoint["mean"], "std": checkpoint["std"]}
        elif arch in EFFICIENTNETS:
            # Written before checkpoints recorded the normalisation, when every EfficientNet
            # normalised with mean = std = 0.5 (now the default of the bare name is ImageNet's).
            norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
        else:
            norm = {}
        return state, arch, checkpoint.get("num_classes"), norm
    if isinstance(checkpoint.get("state_dict"), Mapping):
        state = _strip_data_parallel(checkpoint["state_dict"])
        if not is_release_state_dict(state):  # e.g. timm's training script's format
            return state, None, None, {}
        try:
            arch, classes, state, mean, std = convert_release_state_dict(state)
        except ValueError as error:
            raise CheckpointError(f"{path} is not an A-FAN release ResNet-s checkpoint: {error}") from None
        norm = {"mean": mean, "std": std} if mean is not None and std is not None else {}
        return state, arch, classes, norm
    if _is_plain_state_dict(checkpoint):
        return _strip_data_parallel(checkpoint), None, None, {}
    raise CheckpointError(
        f"{path} is not a classification checkpoint this project reads (top-level keys: "
        f"{list(checkpoint)[:_EXAMPLES]}). Expected a dict with 'model' (a state dict), "
        "'arch' and 'num_classes' as training writes it, a plain state dict, or an A-FAN "
        "release checkpoint whose 'state_dict' holds 'sequential_model.*' keys"
    )


def _check_keys(path: Path, model: nn.Module, state: Mapping) -> None:
    """CheckpointError listing missing, unexpected and mis-shaped keys, if any."""
    problems = key_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{path} does not fit {model.arch} with {model.num_classes} classes; "
            + "; ".join(problems)
            + ". Is it a checkpoint of another architecture? Name the right one (--model NAME, or name= in Python)"
        )


def load_model(path, name: Optional[str] = None, num_classes: Optional[int] = None) -> nn.Module:
    """The model stored at ``path``, in eval mode, with plain BatchNorm.

    ``name`` and ``num_classes`` are needed only where the file does not record them
    (``name`` for plain state dicts); given anyway, they must agree with the file.
    Auxiliary-BN entries (``*.aux_bn.*``) are dropped.
    """
    path = Path(path)
    if name is not None:
        model_class(name)  # a bad argument is reported before the file is read
    state, arch, declared, norm = _unpack(path, load_checkpoint(path))
    state = strip_aux_state_dict(state)
    name = resolve_architecture(path, name, arch, model_class, MODEL_NAMES)
    key = model_class(name).classifier_key
    # A library model's classifier has no fixed key: it is the last matrix of the state dict.
    classifier = state.get(key) if key else next((v for k, v in reversed(state.items())
                                                  if k.endswith(".weight") and v.dim() == 2), None)
    num_classes = resolve_num_classes(path, num_classes, declared, classifier)
    # Without a classifier weight the class count is unknown; any count will do, as the
    # key check then fails on the missing classifier anyway.
    if is_library_name(name) and not any(key.startswith("net.") for key in state):
        state = {f"net.{key}": value for key, value in state.items()}  # torchvision's or timm's own state dict
    model = create_model(name, num_classes or 1, **norm)
    _check_keys(path, model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
