"""Faster R-CNN built from torchvision's public pieces: the release's R-C4 detector and the FPN one.

Two families share one class (torchvision's ``GeneralizedRCNN``: transform → backbone → RPN
→ RoI heads, the same modules and state-dict keys as torchvision's ``FasterRCNN``):

* ``fasterrcnn_resnet{18,50,101}_c4``, the release's detector (``Detection/model.py`` and
  ``backbone/resnet50.py`` of the A-FAN release): ResNet stem..layer3 give one feature map
  (stride 16, 1024 channels for R-50); the RPN (a 3x3 convolution to 512 channels, as
  released) puts anchors of sizes 128/256/512 and ratios 1:2, 1:1, 2:1 on it; each RoI is
  RoIAligned to 14x14 on that map, max-pooled to 7x7, run through layer4 (the RoI head) and
  max-pooled to one vector (2048 for R-50) that the class and box linears read. conv1, bn1
  and layer1 are frozen; every BatchNorm is frozen (``FrozenBatchNorm2d``) unless
  ``norm="bn"``; smooth-L1 beta 1.0 for RPN and RoI; 128 RoIs per image; RPN top-n before /
  after NMS 12000/2000 in training, 6000/300 at test; class-wise NMS 0.3 at test.
* ``fasterrcnn_resnet{18,50,101}_fpn``: torchvision's ResNet-FPN Faster R-CNN with
  torchvision's defaults, so plain torchvision checkpoints load and predict identically.

The subclass records how it was built (``arch``, ``num_classes``, ``model_kwargs``) and where
A-FAN may perturb it (``split_points``, stage names inside ``backbone.body``).
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from afan_harness.settings import unknown_name

from .backbone_weights import load_backbone_weights
from .parts import roi_training_losses

# The ResNet stages SE may perturb after (a C4 model has layer1..layer3 in its backbone).
SPLIT_POINTS = ("layer1", "layer2", "layer3", "layer4")

ARCHS = {  # name -> (torchvision ResNet, family)
    "fasterrcnn_resnet18_c4": ("resnet18", "c4"),  # small: CPU runs and tests
    "fasterrcnn_resnet50_c4": ("resnet50", "c4"),
    "fasterrcnn_resnet101_c4": ("resnet101", "c4"),
    "fasterrcnn_resnet18_fpn": ("resnet18", "fpn"),
    "fasterrcnn_resnet50_fpn": ("resnet50", "fpn"),
    "fasterrcnn_resnet101_fpn": ("resnet101", "fpn"),
}
MODEL_NAMES = tuple(ARCHS)
NORMS = {"frozen": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RATIOS = (0.5, 1.0, 2.0)  # height / width, the release's 1:2, 1:1, 2:1

# What each family uses when a setting is not given: the release's values for C4,
# torchvision's for FPN. The RPN and RoI-head top-n are (training, test).
DEFAULTS = {
    "c4": {"min_size": 600, "max_size": 1000, "anchor_sizes": [128, 256, 512], "roi_batch_size": 128,
           "rpn_pre_nms_top_n": [12000, 6000], "rpn_post_nms_top_n": [2000, 300], "rpn_smooth_l1_beta": 1.0,
           "roi_smooth_l1_beta": 1.0, "box_nms_thresh": 0.3, "representation_size": None, "roi_pool_size": 14},
    "fpn": {"min_size": 800, "max_size": 1333, "anchor_sizes": [32, 64, 128, 256, 512], "roi_batch_size": 512,
            "rpn_pre_nms_top_n": [2000, 1000], "rpn_post_nms_top_n": [2000, 1000], "rpn_smooth_l1_beta": 1 / 9,
            "roi_smooth_l1_beta": 1 / 9, "box_nms_thresh": 0.5, "representation_size": 1024, "roi_pool_size": None},
}
C4_RPN_CHANNELS = 512  # the release's RPN convolution width

AnchorSizes = Sequence[Union[int, Sequence[int]]]


def check_name(name: str) -> str:
    if name not in ARCHS:
        raise unknown_name("detection model", name, MODEL_NAMES)
    return name


def family(name: str) -> str:
    """``"c4"`` or ``"fpn"``."""
    return ARCHS[check_name(name)][1]


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's RPN with the smooth-L1 beta of its box loss as a setting (torchvision
    fixes 1/9; the release uses 1.0 on VOC and 1/9 on COCO)."""

    def __init__(self, *args, smooth_l1_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negative))[0]])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        # Normalised by all sampled anchors, positive and negative, as torchvision does.
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[positive], regression_targets[positive],
                                    beta=self.smooth_l1_beta, reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's RoI heads whose training losses are ``parts.roi_training_losses`` (the
    box loss with a settable smooth-L1 beta); evaluation is torchvision's."""

    def __init__(self, *args, smooth_l1_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        losses, _ = roi_training_losses(self, features, proposals, image_shapes, targets)
        return [], losses


class C4Backbone(nn.Module):
    """ResNet stem..layer3: one feature map at stride 16 (``{"0": map}``, as FasterRCNN wants)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
        self.out_channels = resnet.layer4[0].conv1.in_channels  # layer3's output width

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.body(x)


class C4BoxHead(nn.Module):
    """The release's RoI head: the RoIAlign output (14x14) max-pooled to half its size, ResNet
    layer4, then max-pooled to one vector per RoI (``roi/pooler.py`` and ``Model.Detection``
    there)."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.layer4(F.max_pool2d(pooled, kernel_size=2, stride=2))
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)


def _c4_rpn_head(in_channels: int, num_anchors: int) -> RPNHead:
    """torchvision's RPN head with the release's 3x3 convolution from the feature map to 512
    channels (torchvision keeps the input width), initialised as torchvision initialises it."""
    head = RPNHead(C4_RPN_CHANNELS, num_anchors)
    head.conv = nn.Sequential(Conv2dNormActivation(in_channels, C4_RPN_CHANNELS, kernel_size=3, norm_layer=None))
    nn.init.normal_(head.conv[0][0].weight, std=0.01)
    nn.init.zeros_(head.conv[0][0].bias)
    return head


def _freeze(resnet: nn.Module, trainable_layers: int) -> None:
    """Stop gradients of all but the last ``trainable_layers`` stages (torchvision's counting:
    layer4, layer3, layer2, layer1, then conv1 with bn1)."""
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trained.append("bn1")
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(stage) for stage in trained):
            parameter.requires_grad_(False)


def _anchor_levels(sizes: AnchorSizes, c4: bool) -> tuple[tuple[int, ...], ...]:
    """C4: all sizes on the one feature map. FPN: one tuple of sizes per level; plain ints
    (the config's ``[32, 64, ...]``) mean one size per level, 2 to 5 levels."""
    if c4:
        flat = [int(s) for s in sizes] if all(isinstance(s, numbers.Integral) for s in sizes) else None
        if not flat or min(flat) <= 0:
            raise ValueError(f"anchor_sizes of a C4 model must be positive sizes for its one feature map, "
                             f"got {list(sizes)!r}; e.g. [128, 256, 512]")
        return (tuple(flat),)
    levels = tuple((int(s),) if isinstance(s, numbers.Integral) else tuple(int(v) for v in s) for s in sizes)
    # The FPN has one level per returned ResNet stage plus the max-pool level, so 2 to 5.
    if not 2 <= len(levels) <= 5 or any(not level or min(level) <= 0 for level in levels):
        raise ValueError(f"anchor_sizes must give 2 to 5 FPN levels of positive sizes, got {list(sizes)!r}; "
                         "e.g. [32, 64, 128, 256, 512]")
    return levels


class DetectionModel(GeneralizedRCNN):
    """Faster R-CNN (``GeneralizedRCNN`` with an RPN and box RoI heads) plus the facts this
    project needs about it; see the module docstring for the two families."""

    def __init__(self, arch: str, num_classes: int, model_kwargs: dict, backbone: nn.Module, rpn, roi_heads,
                 transform):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.arch = arch
        self.num_classes = num_classes
        self.model_kwargs = model_kwargs  # what create_model was given, resolved, for checkpoints
        self.resnet_name, kind = ARCHS[arch]
        self.c4 = kind == "c4"
        # C4: the RoI head holds layer4, so SE can perturb layer1..layer3 only.
        self.split_points = tuple(name for name in SPLIT_POINTS if hasattr(backbone.body, name))

    def neck(self, body_out: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """The feature maps the RPN and RoI pooling read, from the backbone body's outputs."""
        return body_out if self.c4 else self.backbone.fpn(body_out)

    def parts_to_compile(self) -> list:
        """The backbone stages, FPN, RPN head and box head and predictor: the convolution and
        linear work of the parts A-FAN calls (``Detection.models.parts``); anchors, NMS and
        RoI pooling stay eager (for ``afan_harness.runtime.compile_parts``)."""
        neck = [] if self.c4 else [self.backbone.fpn]
        return [*self.backbone.body.children(), *neck, self.rpn.head, self.roi_heads.box_head,
                self.roi_heads.box_predictor]


def _check_pair(name: str, value) -> list[int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be [training, test] positive integers, got {value!r}")
    return [int(v) for v in value]


def _check_positive(name: str, value, integer: bool) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def model_settings(name: str, *, min_size: Optional[int] = None, max_size: Optional[int] = None,
                   anchor_sizes: Optional[AnchorSizes] = None, trainable_layers: int = 3, norm: str = "frozen",
                   roi_batch_size: Optional[int] = None, representation_size: Optional[int] = None,
                   rpn_pre_nms_top_n: Optional[Sequence[int]] = None, rpn_post_nms_top_n: Optional[Sequence[int]] = None,
                   rpn_smooth_l1_beta: Optional[float] = None, roi_smooth_l1_beta: Optional[float] = None,
                   box_nms_thresh: Optional[float] = None, roi_pool_size: Optional[int] = None) -> dict:
    """``create_model``'s settings for ``name`` checked, with those left at None taken from
    the family (``DEFAULTS``); a ``ValueError`` names the first bad one. The result is what
    checkpoints record (``model_kwargs``)."""
    c4 = family(name) == "c4"
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if isinstance(trainable_layers, bool) or not (isinstance(trainable_layers, numbers.Integral)
                                                  and 0 <= trainable_layers <= 5):
        raise ValueError(f"trainable_layers must be an integer in [0, 5], got {trainable_layers!r}")
    if c4 and representation_size is not None:
        raise ValueError(f"representation_size is the FPN box head's width; {name}'s RoI head is ResNet layer4 "
                         "(its width is fixed): leave it unset")
    if not c4 and roi_pool_size is not None:
        raise ValueError(f"roi_pool_size is the C4 models' RoIAlign size; {name} pools 7x7 from its FPN levels, "
                         "as torchvision does: leave it unset")
    given = {"min_size": min_size, "max_size": max_size, "anchor_sizes": anchor_sizes, "roi_batch_size": roi_batch_size,
             "rpn_pre_nms_top_n": rpn_pre_nms_top_n, "rpn_post_nms_top_n": rpn_post_nms_top_n,
             "rpn_smooth_l1_beta": rpn_smooth_l1_beta, "roi_smooth_l1_beta": roi_smooth_l1_beta,
             "box_nms_thresh": box_nms_thresh, "representation_size": representation_size,
             "roi_pool_size": roi_pool_size}
    s = {key: DEFAULTS["c4" if c4 else "fpn"][key] if value is None else value for key, value in given.items()}
    for key in ("min_size", "max_size", "roi_batch_size") + (("roi_pool_size",) if c4 else ("representation_size",)):
        _check_positive(key, s[key], integer=True)
    for key in ("rpn_smooth_l1_beta", "roi_smooth_l1_beta", "box_nms_thresh"):
        _check_positive(key, s[key], integer=False)
    if s["max_size"] < s["min_size"]:
        raise ValueError(f"need min_size <= max_size, got min_size={s['min_size']}, max_size={s['max_size']}")
    levels = _anchor_levels(s["anchor_sizes"], c4)
    settings = {"min_size": int(s["min_size"]), "max_size": int(s["max_size"]),
                "anchor_sizes": list(levels[0]) if c4 else [list(level) for level in levels],
                "trainable_layers": int(trainable_layers), "norm": norm, "roi_batch_size": int(s["roi_batch_size"]),
                "rpn_pre_nms_top_n": _check_pair("rpn_pre_nms_top_n", s["rpn_pre_nms_top_n"]),
                "rpn_post_nms_top_n": _check_pair("rpn_post_nms_top_n", s["rpn_post_nms_top_n"]),
                "rpn_smooth_l1_beta": float(s["rpn_smooth_l1_beta"]), "roi_smooth_l1_beta": float(s["roi_smooth_l1_beta"]),
                "box_nms_thresh": float(s["box_nms_thresh"])}
    if c4:
        if s["roi_pool_size"] < 2 or s["roi_pool_size"] % 2:
            raise ValueError(f"roi_pool_size must be even and >= 2 (it is max-pooled to half), got {s['roi_pool_size']!r}")
        settings["roi_pool_size"] = int(s["roi_pool_size"])
    else:
        settings["representation_size"] = int(s["representation_size"])
    return settings


def create_model(name: str, num_classes: int, *, backbone_weights=None, **settings) -> DetectionModel:
    """Faster R-CNN ``name`` with random weights, or with the ImageNet ResNet state dict at
    ``backbone_weights`` (a local file, e.g. torchvision's ``resnet50-0676ba61.pth``; see
    ``Detection.models.load_backbone_weights``). Nothing is downloaded.

    ``num_classes`` counts the background (VOC: 21). Images are lists of [0, 1] tensors;
    the transform resizes them (shorter side ``min_size``, longer at most ``max_size``) and
    normalises them with the ImageNet mean/std. ``settings`` are ``model_settings``'s; one left
    out takes the family's value (``DEFAULTS``: the release's for C4, torchvision's for FPN):

    * ``trainable_layers`` counts ResNet stages from the last (3: layer2..layer4 train;
      conv1, bn1 and layer1 are frozen, as released);
    * ``norm="bn"``: trainable ``nn.BatchNorm2d`` instead of ``FrozenBatchNorm2d``, which
      auxiliary BN (``afan.convert_aux_bn``) and training from random weights need;
    * ``anchor_sizes``: C4, all on the one map; FPN, one per level (5 use layer1-layer4 +
      pool, 4 drop layer1);
    * ``roi_batch_size`` RoIs are sampled per image for the box head;
    * ``representation_size`` (FPN only): the width of the box head's two layers; its first
      layer reads 256 x 7 x 7 RoI features, so at 1024 it costs 12.8M multiply-adds per RoI;
    * ``roi_pool_size`` (C4 only): the RoIAlign output side, max-pooled to half before layer4
      (the release: 14); layer4 costs about 135M multiply-adds per RoI for R-18 at 14, a
      quarter of that at 8, which is what small CPU runs need;
    * ``rpn_pre_nms_top_n`` / ``rpn_post_nms_top_n``: ``[training, test]`` proposals kept
      before / after the RPN's NMS, per image;
    * ``rpn_smooth_l1_beta`` / ``roi_smooth_l1_beta``: the box losses' smooth-L1 beta;
    * ``box_nms_thresh``: the class-wise NMS of the final detections.
    """
    check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an integer >= 2, got {num_classes!r}")
    s = model_settings(name, **settings)
    c4 = family(name) == "c4"
    levels = (tuple(s["anchor_sizes"]),) if c4 else tuple(tuple(level) for level in s["anchor_sizes"])
    pre, post = s["rpn_pre_nms_top_n"], s["rpn_post_nms_top_n"]
    resnet_name = ARCHS[name][0]
    anchors = AnchorGenerator(levels, (RATIOS,) * len(levels))
    if c4:
        resnet = getattr(torchvision.models, resnet_name)(weights=None, norm_layer=NORMS[s["norm"]])
        _freeze(resnet, s["trainable_layers"])
        backbone = C4Backbone(resnet)
        rpn_head = _c4_rpn_head(backbone.out_channels, anchors.num_anchors_per_location()[0])
        box_roi_pool = MultiScaleRoIAlign(["0"], output_size=s["roi_pool_size"], sampling_ratio=0)
        box_head = C4BoxHead(resnet.layer4)
        features = resnet.fc.in_features
    else:
        returned = list(range(6 - len(levels), 5))  # the last len-1 stages, then pool
        backbone = resnet_fpn_backbone(backbone_name=resnet_name, weights=None, norm_layer=NORMS[s["norm"]],
                                       trainable_layers=s["trainable_layers"], returned_layers=returned)
        rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
        # torchvision's pooler: the levels it names that the FPN has ("pool" is not pooled from).
        box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        features = s["representation_size"]
        box_head = TwoMLPHead(backbone.out_channels * 7 ** 2, features)
    # Matching, sampling and NMS thresholds: torchvision's, which are also the release's
    # (RPN: IoU >= 0.7 object, < 0.3 background, 256 anchors per image half positive, NMS
    # 0.7; RoIs: IoU >= 0.5 object, a quarter positive, box coding weights 10, 10, 5, 5).
    rpn = SmoothL1RPN(anchors, rpn_head, 0.7, 0.3, 256, 0.5, {"training": pre[0], "testing": pre[1]},
                      {"training": post[0], "testing": post[1]}, 0.7, smooth_l1_beta=s["rpn_smooth_l1_beta"])
    roi_heads = SmoothL1RoIHeads(box_roi_pool, box_head, FastRCNNPredictor(features, int(num_classes)), 0.5, 0.5,
                                 s["roi_batch_size"], 0.25, None, 0.05, s["box_nms_thresh"], 100,
                                 smooth_l1_beta=s["roi_smooth_l1_beta"])
    transform = GeneralizedRCNNTransform(s["min_size"], s["max_size"], IMAGENET_MEAN, IMAGENET_STD)
    model = DetectionModel(name, int(num_classes), s, backbone, rpn, roi_heads, transform)
    if backbone_weights:
        load_backbone_weights(model, backbone_weights)
    return model
