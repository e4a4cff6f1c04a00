"""Predict a segmentation validation set and score it: whole-image, centre-crop (the
release's ``--crop_val``) or sliding-window inference, the confusion-matrix metrics of
``Segmentation.metrics``, per-class IoU as CSV and a few colourised predictions as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from afan.rundir import progress
from Segmentation.config import EvalConfig
from Segmentation.data import center_crop_view, make_loader
from Segmentation.metrics import SegmentationMetric, colorize, write_per_class_csv


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` pixels, the last one moved back so
    that it ends at the border; one window (the whole side) when ``length <= crop``."""
    if length <= crop:
        return [0]
    return list(range(0, length - crop, stride)) + [length - crop]


def sliding_logits(model, images: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """Logits of ``crop`` x ``crop`` windows, averaged where windows overlap."""
    n, _, height, width = images.shape
    total = images.new_zeros(n, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            window = images[:, :, top:top + crop, left:left + crop]
            total[:, :, top:top + crop, left:left + crop] += model(window)
            count[:, :, top:top + crop, left:left + crop] += 1
    return total / count


@torch.no_grad()
def predict(model, images: Tensor, num_classes: int, cfg: EvalConfig) -> Tensor:
    """Class ids ``[N, H, W]`` for a batch of [0, 1] images."""
    if cfg.mode == "sliding":
        logits = sliding_logits(model, images, num_classes, cfg.crop, cfg.stride)
    else:  # whole images, or the centre crops `evaluate` prepares for mode "crop"
        logits = model(images)
    return logits.argmax(dim=1)


def _batches(batch):
    """(images, masks) of one loader batch as lists of single-image batches when the images
    differ in size, else as one stacked batch."""
    images, masks = batch
    if isinstance(images, Tensor):
        return [(images, masks)]
    return [(image[None], mask[None]) for image, mask in zip(images, masks)]


def _picture(image: Tensor, mask: Tensor, pred: Tensor, palette) -> Image.Image:
    """Image, ground truth and prediction side by side."""
    rgb = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    parts = [rgb, np.asarray(colorize(mask.cpu(), palette).convert("RGB")),
             np.asarray(colorize(pred.cpu(), palette).convert("RGB"))]
    return Image.fromarray(np.concatenate(parts, axis=1))


def evaluate(model, dataset, device, num_classes: int, cfg: EvalConfig, *, pictures_dir=None,
             palette=None, workers: int = 0) -> dict:
    """Scores of ``model`` on ``dataset`` (see ``Segmentation.metrics.scores``); with
    ``pictures_dir``, the first ``cfg.save_images`` images are saved with ground truth and
    prediction as ``pred_<k>.png``. ``cfg.mode="crop"`` scores the centre crops of
    ``Segmentation.data.center_crop_view`` instead of the whole images."""
    if cfg.mode == "crop":
        dataset = center_crop_view(dataset, cfg.crop)
    was_training = model.training
    model.eval()
    metric = SegmentationMetric(num_classes)
    saved = 0
    loader = make_loader(dataset, cfg.batch_size, train=False, workers=workers, seed=0)
    try:
        for batch in progress(loader, desc="evaluate", leave=False):
            for images, masks in _batches(batch):
                images, masks = images.to(device), masks.to(device)
                preds = predict(model, images, num_classes, cfg)
                metric.update(preds, masks)
                for k in range(len(images)):
                    if pictures_dir is None or saved >= cfg.save_images:
                        break
                    _picture(images[k], masks[k], preds[k], palette).save(Path(pictures_dir) / f"pred_{saved}.png")
                    saved += 1
    finally:
        model.train(was_training)
    return metric.compute()


def run_evaluation(model, splits, device, out_dir, cfg: EvalConfig, workers: int = 0) -> dict:
    """Evaluate on ``splits.val``; writes ``per_class_iou.csv`` and ``pred_<k>.png`` into
    ``out_dir``; returns mIoU, pixel accuracy and mean class accuracy."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = evaluate(model, splits.val, device, splits.num_classes, cfg, pictures_dir=out_dir,
                      palette=splits.palette, workers=workers)
    write_per_class_csv(out_dir / "per_class_iou.csv", splits.class_names, scores["per_class_iou"])
    return {k: v for k, v in scores.items() if k != "per_class_iou"}
