"""One Faster R-CNN training pass, cut into pieces A-FAN can reach into.

``GeneralizedRCNN.forward`` runs transform → backbone body → neck (FPN, or nothing for C4)
→ RPN → RoI heads in one call. Here the same modules run in the same order (so with the same
seed the losses are the model's own, bit for bit), split so that

* ``prepare`` resizes/normalises once per step,
* ``head`` computes the clean backbone features up to a split point once per step,
* ``tail`` finishes the pass from a (possibly perturbed) feature at that split point,
* ``tail_detections`` finishes an evaluation pass from such a feature,
* ``roi_training_losses``/``predictor_losses`` expose the RoI head's output (the box features the
  class and box linears read: C4 layer4 + max-pool, FPN the two-layer box head) and the
  sampled RoIs, so the decoder-side attack (SD) and its loss reuse the clean pass's RoIs.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

Targets = list[dict[str, Tensor]]


@dataclass
class RoiSample:
    """The RoIs the box head was trained on in one pass, and the RoI head's output for them.

    Sampling (``select_training_samples``) draws random RoIs, so an attack on the box features
    and the loss on its result must both use this record to see the same RoIs.
    """

    proposals: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    box_features: Tensor  # box_head output, what the predictor reads (still in the graph)


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


def fast_rcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                   regression_targets: list[Tensor], beta: float) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with the smooth-L1 ``beta`` as an argument (torchvision
    fixes 1/9): cross-entropy over the sampled RoIs, and the box loss of the positive ones
    at their class, summed and divided by the number of sampled RoIs."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    classification = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    boxes = box_regression.reshape(len(labels), -1, 4)[positive, labels[positive]]
    box = F.smooth_l1_loss(boxes, regression_targets[positive], beta=beta, reduction="sum") / labels.numel()
    return classification, box


def predictor_losses(roi_heads, box_features: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> dict[str, Tensor]:
    """Box predictor (the class and box linears) → loss, on the RoI head's output."""
    class_logits, box_regression = roi_heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = fast_rcnn_loss(class_logits, box_regression, labels, regression_targets,
                                                   roi_heads.smooth_l1_beta)
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def roi_training_losses(roi_heads, features, proposals: list[Tensor], image_sizes,
                        targets: Targets) -> tuple[dict[str, Tensor], RoiSample]:
    """The RoI heads' training losses: sample RoIs (random), pool them, run the RoI head,
    then predictor and loss. Returns the losses and the ``RoiSample`` for reuse."""
    proposals, _, labels, regression_targets = roi_heads.select_training_samples(proposals, targets)
    box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_sizes))
    sample = RoiSample(proposals, labels, regression_targets, box_features)
    return predictor_losses(roi_heads, box_features, labels, regression_targets), sample


def _features(model, feats: "OrderedDict[str, Tensor]", at: str) -> "OrderedDict[str, Tensor]":
    """The neck's output from ``feats = head(...)`` (``feats[at]`` possibly perturbed): the
    body stages after ``at``, then the neck (FPN, or nothing for C4)."""
    _check_split(model, at)
    body = model.backbone.body
    outputs = OrderedDict(feats)
    names = [name for name, _ in _body_children(model)]
    x = feats[at]
    for name, module in _body_children(model)[names.index(at) + 1:]:
        x = module(x)
        outputs[name] = x
    # IntermediateLayerGetter's output: the returned stages under their key names.
    return model.neck(OrderedDict((key, outputs[layer]) for layer, key in body.return_layers.items()))


def tail(model, feats: "OrderedDict[str, Tensor]", at: str, images: ImageList, targets: Targets, *,
         return_roi: bool = False):
    """Finish the training pass from ``feats = head(...)`` (``feats[at]`` may be replaced by
    a perturbed feature): remaining body stages, neck, RPN, RoI heads. Returns the four
    losses in torchvision's order (``loss_classifier``, ``loss_box_reg``,
    ``loss_objectness``, ``loss_rpn_box_reg``), and with ``return_roi=True`` also the
    ``RoiSample`` of the pass (its RoIs and the RoI head's output)."""
    features = _features(model, feats, at)
    proposals, rpn_losses = model.rpn(images, features, targets)
    losses, roi = roi_training_losses(model.roi_heads, features, proposals, images.image_sizes, targets)
    losses.update(rpn_losses)
    return (losses, roi) if return_roi else losses


def tail_detections(model, feats: "OrderedDict[str, Tensor]", at: str, images: ImageList, original_sizes) -> list[dict]:
    """Finish an evaluation pass (the model in eval mode) from ``feats = head(...)``, as
    ``model(images)`` returns it: boxes, labels and scores in the pixels of the images of
    ``original_sizes`` (height, width each)."""
    features = _features(model, feats, at)
    proposals, _ = model.rpn(images, features)
    found, _ = model.roi_heads(features, proposals, images.image_sizes)
    return model.transform.postprocess(found, images.image_sizes, original_sizes)


@contextlib.contextmanager
def losses_mode(model):
    """The model as its attacks at evaluation see it: the RPN and RoI heads in training mode,
    so they compute the training losses (RoIs sampled as in training, the training top-n
    proposals), with the normalisation layers and the resizing in eval mode (running
    statistics; the evaluation's image size). The release's evaluation attacks run the whole
    model in training mode, where its BatchNorm is frozen anyway. Restores every mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, GeneralizedRCNNTransform)):
            module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def forward_losses(model, images: list[Tensor], targets: Targets) -> dict[str, Tensor]:
    """``model(images, targets)`` in training mode, through the pieces above."""
    image_list, targets = prepare(model, images, targets)
    last = model.split_points[-1]
    return tail(model, head(model, image_list.tensors, last), last, image_list, targets)
