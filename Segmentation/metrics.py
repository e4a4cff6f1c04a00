"""Segmentation scores from a confusion matrix, as DeepLabV3Plus-Pytorch computes them.

    metric = SegmentationMetric(num_classes=21)
    for images, masks in loader:
        metric.update(model(images).argmax(1), masks)
    print(metric.compute()["miou"])

The matrix counts pixels: row = ground-truth class, column = predicted class; pixels whose
ground truth is the ignore index (255) are not counted.  It is an int64 tensor on the device of
the predictions, so that several processes can add theirs up with
``torch.distributed.all_reduce(metric.matrix)`` before :meth:`SegmentationMetric.compute`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["confusion_matrix", "scores", "SegmentationMetric", "write_per_class_csv", "colorize"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Int64 [C, C] pixel counts of (ground truth, prediction) pairs, ignored pixels skipped.

    ``pred`` holds class ids (e.g. ``logits.argmax(1)``) of the same shape as ``target``.  A
    value outside ``0..C-1`` (other than ``ignore_index`` in ``target``) raises ValueError: it
    would otherwise be counted as another class.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}; they must match")
    if pred.is_floating_point():
        raise ValueError(f"pred has dtype {pred.dtype}; pass class ids, e.g. logits.argmax(1), not scores")
    keep = target != ignore_index
    target = target[keep].long()
    pred = pred[keep].long()
    for name, values in (("target", target), ("pred", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} holds the class id {values[bad][0].item()}, outside 0..{num_classes - 1}"
                + (f" and not the ignore index {ignore_index}" if name == "target" else "")
                + "; check num_classes and the labels"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(matrix: torch.Tensor) -> dict:
    """Scores of a confusion matrix (rows ground truth, columns prediction), as plain floats.

    * ``pixel_acc``: correct pixels / counted pixels;
    * ``mean_acc``: mean over classes present in the ground truth of their pixel accuracy;
    * ``miou``: mean IoU over the classes present in the ground truth or the prediction (a
      class in neither has no IoU, 0/0, and is left out: ``nanmean``);
    * ``fwiou``: IoU averaged with the classes' ground-truth pixel frequencies as weights;
    * ``per_class_iou``: list of C IoUs, NaN for classes in neither ground truth nor prediction.

    Every score is NaN when no pixel was counted.
    """
    matrix = matrix.detach().double().cpu()
    correct = matrix.diagonal()
    truth = matrix.sum(1)
    total = matrix.sum()
    iou = correct / (truth + matrix.sum(0) - correct)  # 0/0 = NaN for absent classes
    frequency = truth / total
    present = truth > 0
    return {
        "pixel_acc": float(correct.sum() / total),
        "mean_acc": float(torch.nanmean(correct / truth)),
        "miou": float(torch.nanmean(iou)),
        "fwiou": float((frequency[present] * iou[present]).sum()) if total > 0 else math.nan,
        "per_class_iou": iou.tolist(),
    }


class SegmentationMetric:
    """Sums the confusion matrices of batches; :meth:`compute` gives :func:`scores`.

    ``matrix`` (int64 [C, C]) follows the device of the predictions given to :meth:`update`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        counts = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict:
        return scores(self.matrix)


def write_per_class_csv(path: str | Path, class_names: Sequence[str], per_class_iou: Sequence[float]) -> None:
    """Write ``class,iou`` rows, one per class; an absent class's NaN is written as ``nan``.

    ``nan`` (rather than an empty cell) reads back as a float with ``float()`` and as NaN with
    pandas or a spreadsheet, so the file round-trips without special cases.
    """
    if len(class_names) != len(per_class_iou):
        raise ValueError(f"{len(class_names)} class names but {len(per_class_iou)} IoUs; give one IoU per class")
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "iou"])
        writer.writerows((name, repr(float(iou))) for name, iou in zip(class_names, per_class_iou))


def colorize(mask: torch.Tensor | np.ndarray, palette: np.ndarray) -> Image.Image:
    """An RGB image of a mask [H, W] of class ids: pixel = ``palette[id]``.

    With the palettes of ``Segmentation.data`` (256 rows) the ignore index 255 takes row 255:
    VOC's boundary cream (224, 224, 192) as in VOC's own mask files, black for Cityscapes.
    """
    ids = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    palette = np.asarray(palette, dtype=np.uint8)
    if ids.ndim != 2:
        raise ValueError(f"mask has shape {ids.shape}; colorize takes one mask [H, W]")
    if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
        raise ValueError(f"mask holds ids {ids.min()}..{ids.max()} but the palette has {len(palette)} colours")
    return Image.fromarray(palette[ids.astype(np.int64)])
