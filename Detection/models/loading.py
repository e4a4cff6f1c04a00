"""Detection checkpoints: this project's payload and plain torchvision state dicts.

``checkpoint_payload(model)`` is what training saves; ``load_model`` reads it (or a plain
``FasterRCNN`` state dict, given the architecture name) into an evaluation model with plain
BatchNorm. Every problem becomes one ``CheckpointError`` naming the file; nothing is loaded
partially.
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

from .faster_rcnn import MODEL_NAMES, check_name, create_model

CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"
_EXAMPLES = 5  # keys quoted per kind of difference in error messages


def checkpoint_payload(model: nn.Module) -> dict:
    """``{"model", "arch", "num_classes", "model_kwargs"}``: enough for ``load_model`` to
    rebuild the very same network. Auxiliary-BN layers are saved as they are (``load_model``
    drops them); ``model_kwargs`` are ``create_model``'s keywords (plain values only)."""
    return {"model": model.state_dict(), "arch": model.arch, "num_classes": model.num_classes,
            "model_kwargs": dict(model.model_kwargs)}


def _unpack(path: Path, checkpoint: Mapping):
    """``(state, arch, num_classes, model_kwargs)``; unknown entries are None / {}."""
    if isinstance(checkpoint.get("model"), Mapping):
        kwargs = checkpoint.get("model_kwargs") or {}
        return dict(checkpoint["model"]), checkpoint.get("arch"), checkpoint.get("num_classes"), dict(kwargs)
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint), None, None, {}
    raise CheckpointError(
        f"{path} is not a detection checkpoint this project reads (top-level keys: "
        f"{list(checkpoint)[:_EXAMPLES]}). Expected {{'model': state_dict, 'arch', 'num_classes', "
        "'model_kwargs'}} as training writes it, or a plain torchvision FasterRCNN state dict"
    )


def _check_keys(path: Path, model: nn.Module, state: Mapping) -> None:
    # A norm="bn" model may load a FrozenBatchNorm2d checkpoint, which has no step counters.
    problems = key_mismatches(model.state_dict(), state, optional=lambda k: k.endswith("num_batches_tracked"))
    if problems:
        raise CheckpointError(
            f"{path} does not fit {model.arch} with {model.num_classes} classes "
            f"({model.model_kwargs}); " + "; ".join(problems)
            + ". Is it a checkpoint of another architecture or built with other options? "
            "Name the right one (--model NAME, or name= in Python; and its anchor_sizes=/norm=)"
        )


def load_model(path, name: Optional[str] = None, num_classes: Optional[int] = None, **kw) -> nn.Module:
    """The detector stored at ``path``, in eval mode, with plain BatchNorm.

    Reads ``checkpoint_payload`` files and plain torchvision ``FasterRCNN`` state dicts
    (``name`` required there; ``num_classes`` is read from the classifier weight). ``kw``
    are ``create_model`` keywords; they override those recorded in the file (e.g. another
    ``min_size`` for evaluation). Auxiliary-BN entries (``*.aux_bn.*``) are dropped.
    """
    path = Path(path)
    if name is not None:
        check_name(name)  # a bad argument is reported before the file is read
    state, arch, declared, recorded = _unpack(path, load_checkpoint(path))
    state = {k.removeprefix("module."): v for k, v in strip_aux_state_dict(state).items()}
    name = resolve_architecture(path, name, arch, check_name, MODEL_NAMES)
    num_classes = resolve_num_classes(path, num_classes, declared, state.get(CLASSIFIER_KEY))
    try:
        # Without a classifier weight the count is unknown; the key check then fails anyway.
        model = create_model(name, num_classes or 2, **{**recorded, **kw})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build {name} with {({**recorded, **kw})}: {error}") from None
    # BatchNorm's step counter is not part of what a model computes: torchvision's own
    # untrained builders use nn.BatchNorm2d (with counters), FrozenBatchNorm2d has none.
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("num_batches_tracked")}
    _check_keys(path, model, state)
    model.load_state_dict(state, strict=False)  # strict up to BN step counters, checked above
    return model.eval()
