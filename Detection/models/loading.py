"""Detection checkpoints: this project's payload and plain torchvision state dicts.

``checkpoint_payload(model)`` is what training saves; ``load_model`` reads it (or a plain
``FasterRCNN`` state dict, given the architecture name) into an evaluation model with plain
BatchNorm. Every problem becomes one ``CheckpointError`` naming the file; nothing is loaded
partially.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from afan_harness.checkpoint import ModelFormat, load_model_file, model_payload, unpack_model_file

from .faster_rcnn import MODEL_NAMES, check_name, create_model

CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"

checkpoint_payload = model_payload  # what training saves, load_model reads back

FORMAT = ModelFormat(
    names=MODEL_NAMES, check_name=check_name,
    unpack=lambda path, checkpoint: unpack_model_file(path, checkpoint, "detection",
                                                      "or a plain torchvision FasterRCNN state dict"),
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
