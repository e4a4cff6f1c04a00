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

from torch import nn

from afan_harness.checkpoint import CheckpointError, ModelFormat, foreign_file, is_state_dict, load_model_file

from .efficientnet import ARCHS as EFFICIENTNETS
from .library import is_library_name
from .registry import MODEL_NAMES, create_model, model_class
from .release import convert_release_state_dict, is_release_state_dict


def checkpoint_payload(model: nn.Module) -> dict:
    """What training scripts save and ``load_model`` reads back. The input normalisation is
    recorded because it is not in the state dict and need not be the name's default
    (``input_norm``, ``mean=``/``std=``)."""
    return {"model": model.state_dict(), "arch": model.arch, "num_classes": model.num_classes,
            "mean": model.normalize.mean.tolist(), "std": model.normalize.std.tolist()}


def _strip_data_parallel(state: Mapping) -> dict:
    """(Distributed)DataParallel saved every key with a ``module.`` prefix."""
    return {key.removeprefix("module."): value for key, value in state.items()}


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
    if is_state_dict(checkpoint):
        return _strip_data_parallel(checkpoint), None, None, {}
    raise foreign_file(path, checkpoint, "classification", "a dict with 'model' (a state dict), 'arch' and "
                       "'num_classes' as training writes it, a plain state dict, or an A-FAN release checkpoint "
                       "whose 'state_dict' holds 'sequential_model.*' keys")


def _classifier(name: str, state: Mapping):
    key = model_class(name).classifier_key
    if key:
        return state.get(key)
    # A library model's classifier has no fixed key: it is the last matrix of the state dict.
    return next((v for k, v in reversed(state.items()) if k.endswith(".weight") and v.dim() == 2), None)


def _prepare(name: str, state: Mapping) -> dict:
    if is_library_name(name) and not any(key.startswith("net.") for key in state):
        return {f"net.{key}": value for key, value in state.items()}  # torchvision's or timm's own state dict
    return dict(state)


def _training_state(key: str) -> bool:
    """The learnable mode's layer weights (``Classification.steps.LayerWeights``): training
    state its checkpoints carry, not part of the classifier."""
    return key.startswith("layer_weights.")


FORMAT = ModelFormat(names=MODEL_NAMES, check_name=model_class, unpack=_unpack, classifier=_classifier,
                     build=create_model, prepare=_prepare, optional=_training_state)


def load_model(path, name: Optional[str] = None, num_classes: Optional[int] = None) -> nn.Module:
    """The model stored at ``path``, in eval mode, with plain BatchNorm
    (``afan_harness.checkpoint.load_model_file``). ``name`` and ``num_classes`` are needed only where
    the file does not record them (``name`` for plain state dicts)."""
    return load_model_file(path, FORMAT, name, num_classes)
