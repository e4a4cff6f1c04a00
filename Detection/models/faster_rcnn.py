"""Faster R-CNN with a ResNet-FPN backbone, built from torchvision's public pieces.

The model *is* torchvision's ``FasterRCNN`` (same modules, same state-dict keys, same
``forward``), so plain torchvision checkpoints load and predict identically. The subclass
only records how it was built (``arch``, ``num_classes``, ``model_kwargs``) and where
A-FAN may perturb it (``split_points``, names inside ``backbone.body``).
"""
from __future__ import annotations

import difflib
import numbers
from typing import Sequence, Union

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

ARCHS = {
    "fasterrcnn_resnet18_fpn": "resnet18",  # small: CPU runs and tests
    "fasterrcnn_resnet50_fpn": "resnet50",
    "fasterrcnn_resnet101_fpn": "resnet101",
}
MODEL_NAMES = tuple(ARCHS)
NORMS = {"frozen": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
DEFAULT_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
SPLIT_POINTS = ("layer1", "layer2", "layer3", "layer4")

AnchorSizes = Sequence[Union[int, Sequence[int]]]


def check_name(name: str) -> str:
    if name not in ARCHS:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown detection model {name!r}.{hint} Valid names: {', '.join(MODEL_NAMES)}")
    return name


def _anchor_sizes(sizes: AnchorSizes) -> tuple[tuple[int, ...], ...]:
    """One tuple of sizes per FPN level; plain ints (the config's ``[32, 64, ...]``) mean
    one size per level."""
    levels = tuple((int(s),) if isinstance(s, numbers.Integral) else tuple(int(v) for v in s) for s in sizes)
    # The FPN has one level per returned ResNet stage plus the max-pool level, so 2 to 5.
    if not 2 <= len(levels) <= 5 or any(not level or min(level) <= 0 for level in levels):
        raise ValueError(
            f"anchor_sizes must give 2 to 5 FPN levels of positive sizes, got {list(sizes)!r}; "
            "e.g. [32, 64, 128, 256, 512]"
        )
    return levels


class DetectionModel(FasterRCNN):
    """torchvision's ``FasterRCNN`` plus the facts this project needs about it."""

    split_points = SPLIT_POINTS

    def __init__(self, arch: str, num_classes: int, model_kwargs: dict, backbone, representation_size: int,
                 **faster_rcnn_kwargs):
        # torchvision's own box head and predictor, only with a chosen width.
        resolution = 7  # torchvision's MultiScaleRoIAlign output size
        box_head = TwoMLPHead(backbone.out_channels * resolution ** 2, representation_size)
        super().__init__(backbone, box_head=box_head, box_predictor=FastRCNNPredictor(representation_size, num_classes),
                         **faster_rcnn_kwargs)
        self.arch = arch
        self.num_classes = num_classes
        self.model_kwargs = model_kwargs  # what create_model was given, for checkpoints

    def parts_to_compile(self) -> list:
        """The backbone stages, FPN, RPN head and box head and predictor: the convolution and
        linear work of the parts A-FAN calls (``Detection.models.parts``); anchors, NMS and
        RoI pooling stay eager (for ``afan.runtime.compile_parts``)."""
        return [*self.backbone.body.children(), self.backbone.fpn, self.rpn.head, self.roi_heads.box_head,
                self.roi_heads.box_predictor]


def create_model(name: str, num_classes: int, *, min_size: int = 800, max_size: int = 1333,
                 anchor_sizes: AnchorSizes = DEFAULT_ANCHOR_SIZES, trainable_layers: int = 3,
                 norm: str = "frozen", roi_batch_size: int = 512, representation_size: int = 1024) -> DetectionModel:
    """Faster R-CNN ``name`` with random weights (nothing is downloaded).

    ``num_classes`` counts the background (VOC: 21). Images are lists of [0, 1] tensors;
    torchvision's transform resizes them (shorter side ``min_size``, longer at most
    ``max_size``) and normalises them with the ImageNet mean/std. The defaults are
    torchvision's, so a plain torchvision state dict loads and behaves identically.
    ``norm="bn"`` uses trainable ``nn.BatchNorm2d`` instead of torchvision's
    ``FrozenBatchNorm2d``, which auxiliary BN (``afan.convert_aux_bn``) needs.
    ``len(anchor_sizes)`` sets the FPN levels: 5 uses layer1-layer4 + pool, 4 drops layer1.
    ``roi_batch_size`` RoIs are sampled per image for the box head in training (torchvision:
    512); fewer make CPU runs on small images much faster, since the box head dominates.
    ``representation_size`` is the width of the box head's two layers (torchvision: 1024);
    its first layer reads 256 x 7 x 7 RoI features, so at 1024 it costs 12.8M multiply-adds per
    RoI: with 64 RoIs on a 128-pixel image, more than the ResNet-18 backbone spends on the image.
    """
    check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an integer >= 2, got {num_classes!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if not (isinstance(trainable_layers, numbers.Integral) and 0 <= trainable_layers <= 5):
        raise ValueError(f"trainable_layers must be an integer in [0, 5], got {trainable_layers!r}")
    if not (isinstance(roi_batch_size, numbers.Integral) and roi_batch_size >= 1):
        raise ValueError(f"roi_batch_size must be a positive integer, got {roi_batch_size!r}")
    if not (isinstance(representation_size, numbers.Integral) and representation_size >= 1):
        raise ValueError(f"representation_size must be a positive integer, got {representation_size!r}")
    if min_size <= 0 or max_size < min_size:
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    levels = _anchor_sizes(anchor_sizes)
    returned_layers = list(range(6 - len(levels), 5))  # the last len-1 stages, then pool
    backbone = resnet_fpn_backbone(backbone_name=ARCHS[name], weights=None, norm_layer=NORMS[norm],
                                   trainable_layers=int(trainable_layers), returned_layers=returned_layers)
    anchors = AnchorGenerator(levels, ((0.5, 1.0, 2.0),) * len(levels))
    kwargs = {"min_size": int(min_size), "max_size": int(max_size),
              "anchor_sizes": [list(level) for level in levels],
              "trainable_layers": int(trainable_layers), "norm": norm, "roi_batch_size": int(roi_batch_size),
              "representation_size": int(representation_size)}
    return DetectionModel(name, int(num_classes), kwargs, backbone, int(representation_size), min_size=int(min_size),
                          max_size=int(max_size), rpn_anchor_generator=anchors,
                          box_batch_size_per_image=int(roi_batch_size))
