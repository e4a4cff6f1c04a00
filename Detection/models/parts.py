"""One Faster R-CNN training pass, cut into pieces A-FAN can reach into.

torchvision's ``GeneralizedRCNN.forward`` runs transform → backbone body → FPN → RPN →
RoI heads in one call. Here the same public modules run in the same order (so with the same
seed the losses are torchvision's, bit for bit), split so that

* ``prepare`` resizes/normalises once per step,
* ``head`` computes the clean backbone features up to a split point once per step,
* ``tail`` finishes the pass from a (possibly perturbed) feature at that split point,
* ``roi_losses``/``box_losses`` expose the pooled RoI features before the box head, and
  the sampled RoIs, so the decoder-side attack and its loss reuse the clean pass's RoIs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

Targets = list[dict[str, Tensor]]
RoiFeatureFn = Callable[[Tensor], Tensor]


@dataclass
class RoiSample:
    """The RoIs the box head was trained on in one pass, and their pooled features.

    Sampling (``select_training_samples``) draws random RoIs, so an attack on the pooled
    features and the loss on its result must both use this record to see the same RoIs.
    """

    proposals: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    pooled: Tensor  # box_roi_pool output, before the box head (still in the graph)


@dataclass
class TailState:
    """What a tail pass leaves behind besides its losses."""

    features: "OrderedDict[str, Tensor]"  # FPN outputs
    proposals: list[Tensor]  # RPN proposals
    roi: RoiSample


def _check_targets(targets: Targets) -> None:
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a float tensor of shape [N, 4] (x1, y1, x2, y2)")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: 'labels' must be an int64 tensor with one label per box")
        if labels.numel() and labels.min() < 1:
            raise ValueError(f"target {i}: labels start at 1; 0 is the background")


def prepare(model, images: list[Tensor], targets: Targets) -> tuple[ImageList, Targets]:
    """``model.transform`` on a list of [0, 1] images and their targets (boxes in pixels of
    the given image, ``xyxy``; labels >= 1): resized, normalised, batched; targets rescaled
    (copies, the caller's dicts stay as they are)."""
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    _check_targets(targets)
    image_list, targets = model.transform(images, targets)
    for i, target in enumerate(targets):
        # Same check as GeneralizedRCNN.forward: such boxes give NaN regression targets.
        bad = target["boxes"][:, 2:] <= target["boxes"][:, :2]
        if bad.any():
            box = target["boxes"][torch.where(bad.any(dim=1))[0][0]].tolist()
            raise ValueError(f"target {i}: box {box} has no positive width and height")
    return image_list, targets


def _body_children(model):
    return list(model.backbone.body.named_children())


def _check_split(model, at: str) -> None:
    if at not in model.split_points:
        raise ValueError(f"{model.arch}: unknown split point {at!r}; valid: {', '.join(model.split_points)}")


def head(model, image_tensors: Tensor, at: str) -> "OrderedDict[str, Tensor]":
    """The backbone body up to and including stage ``at``: ``{"layer1": ..., at: ...}``,
    every stage output the FPN will need from this part, plus ``at`` itself."""
    _check_split(model, at)
    returned = model.backbone.body.return_layers
    outputs, x = OrderedDict(), image_tensors
    for name, module in _body_children(model):
        x = module(x)
        if name in returned or name == at:
            outputs[name] = x
        if name == at:
            return outputs
    raise ValueError(f"{model.arch}: the backbone has no stage {at!r}")  # unreachable for ResNets


def box_losses(model, pooled: Tensor, labels: list[Tensor], regression_targets: list[Tensor]) -> dict[str, Tensor]:
    """Box head → box predictor → ``fastrcnn_loss`` on pooled RoI features."""
    class_logits, box_regression = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def roi_losses(model, features, proposals: list[Tensor], image_sizes, targets: Targets,
               roi_feature_fn: Optional[RoiFeatureFn] = None) -> tuple[dict[str, Tensor], RoiSample]:
    """RoI-head losses as torchvision's ``RoIHeads.forward`` computes them in training:
    sample RoIs (random), pool them, optionally pass the pooled features through
    ``roi_feature_fn``, then box head, predictor and loss. Returns the losses and the
    ``RoiSample`` (with the untransformed pooled features) for reuse."""
    heads = model.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    pooled = heads.box_roi_pool(features, proposals, image_sizes)
    sample = RoiSample(proposals, labels, regression_targets, pooled)
    used = pooled if roi_feature_fn is None else roi_feature_fn(pooled)
    return box_losses(model, used, labels, regression_targets), sample


def tail(model, feats: "OrderedDict[str, Tensor]", at: str, images: ImageList, targets: Targets, *,
         sd: Optional[RoiFeatureFn] = None, return_state: bool = False):
    """Finish the training pass from ``feats = head(...)`` (``feats[at]`` may be replaced by
    a perturbed feature): remaining body stages, FPN, RPN, RoI heads. Returns the four
    losses in torchvision's order (``loss_classifier``, ``loss_box_reg``,
    ``loss_objectness``, ``loss_rpn_box_reg``), and with ``return_state=True`` also a
    ``TailState``. ``sd`` transforms the pooled RoI features before the box head."""
    _check_split(model, at)
    body = model.backbone.body
    outputs = OrderedDict(feats)
    names = [name for name, _ in _body_children(model)]
    x = feats[at]
    for name, module in _body_children(model)[names.index(at) + 1:]:
        x = module(x)
        outputs[name] = x
    # IntermediateLayerGetter's output: the returned stages under the FPN's key names.
    body_out = OrderedDict((key, outputs[layer]) for layer, key in body.return_layers.items())
    features = model.backbone.fpn(body_out)
    proposals, rpn_losses = model.rpn(images, features, targets)
    losses, roi = roi_losses(model, features, proposals, images.image_sizes, targets, sd)
    losses.update(rpn_losses)
    return (losses, TailState(features, proposals, roi)) if return_state else losses


def forward_losses(model, images: list[Tensor], targets: Targets) -> dict[str, Tensor]:
    """``model(images, targets)`` in training mode, through the pieces above."""
    image_list, targets = prepare(model, images, targets)
    last = model.split_points[-1]
    return tail(model, head(model, image_list.tensors, last), last, image_list, targets)
