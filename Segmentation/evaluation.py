"""Predict a segmentation validation set and score it: whole-image, centre-crop (the
release's ``--crop_val``) or sliding-window inference, the confusion-matrix metrics of
``Segmentation.metrics``, per-class IoU as CSV and a few colourised predictions as PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

import afan
from afan_harness import distributed
from afan_harness.robustness import FeatureAttack
from afan_harness.rundir import progress
from afan_harness.settings import AdvPropConfig
from Segmentation.config import EvalConfig
from Segmentation.data import center_crop_view, make_loader
from Segmentation.metrics import SegmentationMetric, colorize, write_per_class_csv
from Segmentation.steps import pixel_pgd, segmentation_loss


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` pixels, the last one moved back so
    that it ends at the border; one window (the whole side) when ``length <= crop``."""
    if length <= crop:
        return [0]
    return list(range(0, length - crop, stride)) + [length - crop]


def sliding_logits(forward: Callable, images: Tensor, masks: Optional[Tensor], num_classes: int, crop: int,
                   stride: int) -> Tensor:
    """Logits of ``crop`` x ``crop`` windows, ``forward(window, its masks)``, averaged where
    windows overlap (``masks`` may be None for a forward that does not read them)."""
    n, _, height, width = images.shape
    total = images.new_zeros(n, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            window = (slice(top, top + crop), slice(left, left + crop))
            total[:, :, window[0], window[1]] += forward(images[:, :, window[0], window[1]],
                                                         None if masks is None else masks[:, window[0], window[1]])
            count[:, :, window[0], window[1]] += 1
    return total / count


def predict(model, images: Tensor, num_classes: int, cfg: EvalConfig, *, masks: Optional[Tensor] = None,
            forward: Optional[Callable] = None) -> Tensor:
    """Class ids ``[N, H, W]`` for a batch of [0, 1] images: of ``model(images)``, or of
    ``forward(images, masks) -> logits`` in the model's place (an attacked model, see
    :func:`pgd_logits`, :func:`feature_logits`; with sliding windows it sees each window and
    its masks)."""
    def logits(run):
        if cfg.mode == "sliding":
            return sliding_logits(run, images, masks, num_classes, cfg.crop, cfg.stride)
        return run(images, masks)  # whole images, or the centre crops `evaluate` prepares for mode "crop"

    if forward is not None:
        return logits(forward).detach().argmax(dim=1)
    with torch.no_grad():
        return logits(lambda x, _: model(x)).argmax(dim=1)


def pgd_logits(model, attack: AdvPropConfig, bn: str = "main") -> Callable:
    """``forward(images, masks)`` for :func:`predict`: the logits of input PGD images made
    against the model in eval mode, the attack's passes through its main or, with
    ``bn="aux"``, its auxiliary BN; the logits always use the main BN."""
    def forward(images, masks):
        with afan.use_aux_bn(model, enabled=bn == "aux", in_eval=True):
            adversarial = pixel_pgd(model, images, masks, attack)
        with torch.no_grad():
            return model(adversarial)
    return forward


def feature_logits(model, attack: FeatureAttack) -> Callable:
    """``forward(images, masks)`` for :func:`predict`: the logits from the backbone feature
    after ``attack.layer`` perturbed by ``attack`` against the segmentation loss, the decoder
    reading the clean low-level feature (as the SE attack in training does)."""
    at = attack.layer

    def forward(images, masks):
        size = images.shape[-2:]
        with torch.no_grad():
            h, low_level = model.head(images, at)
        feature = attack.perturb(h, lambda f: segmentation_loss(model.tail(f, at, low_level, size), masks))
        with torch.no_grad():
            return model.tail(feature, at, low_level, size)
    return forward


def _batches(batch):
    """(images, masks) of one loader batch as lists of single-image batches when the images
    differ in size, else as one stacked batch."""
    images, masks = batch
    if isinstance(images, Tensor):
        return [(images, masks)]
    return [(image[None], mask[None]) for image, mask in zip(images, masks)]


def segmentation_figure(image: Tensor, mask: Tensor, pred: Tensor, palette, class_names):
    """A matplotlib Figure: the image, its ground truth and the prediction side by side, each
    enlarged to at least 256 pixels, with a legend naming the colour of every class shown
    (and of ``ignore``, 255, where the ground truth has it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rgb = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    mask, pred = mask.cpu(), pred.cpu()
    panels = {"image": rgb, "ground truth": np.asarray(colorize(mask, palette).convert("RGB")),
              "prediction": np.asarray(colorize(pred, palette).convert("RGB"))}
    height, width = rgb.shape[:2]
    side = max(2.56, 2.56 * width / max(height, 1))  # inches per panel at 100 dpi
    figure = Figure(figsize=(3 * side, side * height / max(width, 1) + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, picture) in zip(figure.subplots(1, 3), panels.items()):
        axes.imshow(picture, interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.set_axis_off()
    shown = sorted(set(torch.unique(mask).tolist()) | set(torch.unique(pred).tolist()))
    name_of = lambda c: "ignore" if c == 255 else (class_names[c] if c < len(class_names) else str(c))
    handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="grey", label=name_of(c)) for c in shown]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=7, frameon=False)
    return figure


def _predictions(model, dataset, device, num_classes: int, cfg: EvalConfig, workers: int, forward=None):
    """(images, masks, predictions) on ``device``, batch by batch through ``dataset``; with
    ``forward(images, masks) -> logits``, of it in the model's place (see :func:`predict`)."""
    loader = make_loader(dataset, cfg.batch_size, train=False, workers=workers, seed=0)
    for batch in progress(loader, desc="evaluate", leave=False):
        for images, masks in _batches(batch):
            images, masks = images.to(device), masks.to(device)
            yield images, masks, predict(model, images, num_classes, cfg, masks=masks, forward=forward)


def evaluate(model, dataset, device, num_classes: int, cfg: EvalConfig, *, pictures_dir=None,
             palette=None, class_names=(), workers: int = 0, process: Optional[distributed.Process] = None,
             forward=None) -> dict:
    """Scores of ``model`` on ``dataset`` (see ``Segmentation.metrics.scores``), or of
    ``forward(images, masks) -> logits`` in its place (an attacked model, see :func:`predict`);
    with ``pictures_dir``, the first ``cfg.save_images`` images are saved with ground truth and
    prediction as ``pred_<k>.png``. ``cfg.mode="crop"`` scores the centre crops of
    ``Segmentation.data.center_crop_view`` instead of the whole images.

    Under torchrun (``process`` in a process group) pass the whole data set: each process
    predicts its ``distributed.shard`` of it, the confusion matrices are summed over the
    processes, and every process returns the scores of the whole set. The pictures are
    process 0's alone (the others ignore ``pictures_dir``): as its shard does not hold the first
    images, it predicts those few again after the scoring pass. Every process must call it."""
    process = process or distributed.Process()
    if cfg.mode == "crop":
        dataset = center_crop_view(dataset, cfg.crop)
    was_training = model.training
    model.eval()
    metric = SegmentationMetric(num_classes)
    pictures = []  # (image, mask, prediction) of the first images, as far as they are known yet
    try:
        for images, masks, preds in _predictions(model, distributed.shard(dataset, process), device, num_classes, cfg,
                                                 workers, forward):
            metric.update(preds, masks)
            if pictures_dir is not None and not process.distributed:  # one process: its batches come in order
                pictures.extend(zip(images, masks, preds))
                del pictures[cfg.save_images:]
        if pictures_dir is not None and process.distributed and process.is_main:
            first = Subset(dataset, range(min(cfg.save_images, len(dataset))))
            for images, masks, preds in _predictions(model, first, device, num_classes, cfg, 0, forward):  # a few images
                pictures.extend(zip(images, masks, preds))
    finally:
        model.train(was_training)
    # A process with an empty shard still has the CPU matrix it started with; NCCL sums on the GPU.
    metric.matrix = distributed.sum_tensor_over_processes(metric.matrix.to(device), process)
    for k, (image, mask, pred) in enumerate(pictures):
        figure = segmentation_figure(image, mask, pred, palette, class_names)
        figure.savefig(Path(pictures_dir) / f"pred_{k}.png", format="png")
    return metric.compute()


def run_evaluation(model, splits, device, out_dir, cfg: EvalConfig, workers: int = 0,
                   process: Optional[distributed.Process] = None) -> dict:
    """Evaluate on ``splits.val``; writes ``per_class_iou.csv`` and ``pred_<k>.png`` into
    ``out_dir``; returns mIoU, pixel accuracy and mean class accuracy. Under torchrun
    (``process`` in a process group) every process evaluates its part of the split
    (:func:`evaluate`) and returns the scores of the whole split; only process 0 writes (the
    others' ``out_dir`` may be None). Every process must call it."""
    process = process or distributed.Process()
    out_dir = Path(out_dir) if process.is_main else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    scores = evaluate(model, splits.val, device, splits.num_classes, cfg, pictures_dir=out_dir,
                      palette=splits.palette, class_names=splits.class_names, workers=workers, process=process)
    if out_dir is not None:
        write_per_class_csv(out_dir / "per_class_iou.csv", splits.class_names, scores["per_class_iou"])
    return {k: v for k, v in scores.items() if k != "per_class_iou"}
