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

from afan_harness.checkpoint import CheckpointError, ModelFormat, load_model_file

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


FORMAT = ModelFormat(
    names=MODEL_NAMES, check_name=check_name, unpack=_unpack,
    classifier=lambda name, state: state.get(CLASSIFIER_KEY), build=create_model,
    # BatchNorm's step counter is not part of what a model computes: torchvision's own
    # untrained builders use nn.BatchNorm2d (with counters), FrozenBatchNorm2d has none.
    optional=lambda key: key.endswith("num_batches_tracked"),
    describe=lambda model: f"{model.arch} with {model.num_classes} classes ({model.model_kwargs})",
    fit_hint="Is it a checkpoint of another architecture or built with other options? Name the right one "
             "(--model NAME, or name= in Python; and its anchor_sizes=/norm=)")


def load_model(path, name: Optional[str] = None, num_classes: Optional[int] = None, **kw) -> nn.Module:
    """The detector stored at ``path``, in eval mode, with plain BatchNorm
    (``afan_harness.checkpoint.load_model_file``).

    Reads ``checkpoint_payload`` files and plain torchvision ``FasterRCNN`` state dicts
    (``name`` required there; ``num_classes`` is read from the classifier weight). ``kw``
    are ``create_model`` keywords; they override those recorded in the file (e.g. another
    ``min_size`` for evaluation).
    """
    return load_model_file(path, FORMAT, name, num_classes, **kw)
