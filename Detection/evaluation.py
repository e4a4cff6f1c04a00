"""Detection metrics: Pascal VOC AP (11-point and all-point), COCO AP through pycocotools, and
their outputs (per-class CSV, pictures of detections).

Detections and ground truth are mappings ``image_id -> dict`` with

* detections: ``boxes`` [N, 4] xyxy, ``labels`` [N] in ``1..C``, ``scores`` [N];
* ground truth: ``boxes`` [K, 4] xyxy, ``labels`` [K], optional ``difficult`` [K] bool,

as tensors, arrays or lists (``Splits.eval_info.ground_truth`` has this form).

Box convention: boxes are 0-based continuous coordinates (a box ``x1..x2`` is ``x2 - x1``
pixels wide), so areas and IoUs use no ``+ 1`` -- unlike the VOC devkit, whose boxes count
inclusive integer pixels.  On VOC data converted as in :mod:`Detection.data`
(``x1 - 1, y1 - 1, x2, y2``) both give the same IoU.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

import afan
from afan_harness import distributed
from afan_harness.checkpoint import atomic_open
from afan_harness.robustness import FeatureAttack
from afan_harness.rundir import progress
from afan_harness.settings import AdvPropConfig
from Detection.data import make_loader, to_device
from Detection.models.parts import head, losses_mode, prepare, tail, tail_detections
from Detection.steps import pixel_pgd, total_loss

__all__ = ["voc_ap", "voc_eval", "coco_eval", "evaluate", "save_per_class_csv", "save_coco_json",
           "detection_figure", "draw_detections", "box_iou"]


def _array(value, dtype, shape=None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value if value is not None else [], dtype=dtype)
    return array.reshape(shape) if shape is not None else array.reshape(-1)


# --------------------------------------------------------------------------------------------
# Pascal VOC


# VOC2007's 11 recall thresholds as the devkit's MATLAB loop ``for t=0:0.1:1`` (VOCevaldet.m)
# makes them. MATLAB's colon operator builds the first half of a range as ``a + k*d`` and the
# second as ``b - k*d``: 0.3 is 3 * 0.1 = 0.30000000000000004, while 0.6 = 1 - 4 * 0.1 and
# 0.7 = 1 - 3 * 0.1 are the doubles nearest 0.6 and 0.7. (The release's thresholds,
# ``k * 0.1`` as ``np.linspace(0, 1, 11)`` makes them, are 0.6000000000000001 and
# 0.7000000000000001 there, which skip a recall of exactly 0.6 or 0.7.)
VOC07_THRESHOLDS = np.array([k * 0.1 for k in range(6)] + [1.0 - k * 0.1 for k in range(4, -1, -1)])


def voc_ap(recall, precision, use_07_metric: bool) -> float:
    """Average precision from the recall and precision of the ranked detections.

    ``use_07_metric=True``: VOC2007's 11-point interpolation, the mean over t = 0, 0.1, ..., 1
    (``VOC07_THRESHOLDS``, the devkit's values) of the highest precision at recall >= t (0
    where no such point).  ``False`` (VOC2010+): the area under the precision envelope
    (precision made monotonically non-increasing from the right), summed over the recall
    steps.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision differ in length ({recall.size} vs {precision.size})")
    if use_07_metric:
        ap = 0.0
        for t in VOC07_THRESHOLDS:
            above = precision[recall >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])  # where recall changes
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU [N, M] of xyxy boxes, continuous coordinates (no + 1)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    others = np.asarray(others, dtype=np.float64).reshape(-1, 4)
    left_top = np.maximum(boxes[:, None, :2], others[None, :, :2])
    right_bottom = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(right_bottom - left_top, 0, None).prod(axis=2)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area(boxes)[:, None] + area(others)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_eval(
    detections: Mapping,
    ground_truth: Mapping,
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    class_names: Optional[Sequence[str]] = None,
) -> dict:
    """Pascal VOC detection AP per class and its mean.

    ``num_classes`` counts the background (labels ``1..num_classes - 1`` are evaluated), as
    ``Splits.num_classes``.  Matching follows the VOC devkit: per class, all detections of all
    images in decreasing score order (ties keep their input order); a detection's best-IoU
    ground-truth box of that class in its image decides: IoU >= ``iou_threshold`` with a
    difficult box -> ignored (neither TP nor FP); with a box not matched yet -> TP, the box is
    now matched; with an already matched box -> FP (duplicate); IoU below the threshold -> FP.
    Detections on images absent from ``ground_truth`` are FPs.

    Returns ``{"per_class": {name: AP}, "mAP": float}``; names are ``class_names[label]``
    (``class_names[0]`` is the background, as ``Splits.class_names``), else ``str(label)``.  A
    class without any non-difficult ground-truth box has AP ``nan`` and is left out of the mAP.
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names; need num_classes={num_classes} (background first)")
    gt = {}
    for image_id, target in ground_truth.items():
        boxes = _array(target["boxes"], np.float64, (-1, 4))
        labels = _array(target["labels"], np.int64)
        difficult = _array(target.get("difficult"), bool) if target.get("difficult") is not None else np.zeros(len(labels), bool)
        gt[image_id] = (boxes, labels, difficult)
    dets = {}
    for image_id, det in detections.items():
        dets[image_id] = (_array(det["boxes"], np.float64, (-1, 4)), _array(det["labels"], np.int64), _array(det["scores"], np.float64))

    per_class = {}
    for label in range(1, num_classes):
        name = class_names[label] if class_names is not None else str(label)
        npos = sum(int(np.sum((labels == label) & ~difficult)) for _, labels, difficult in gt.values())
        # All detections of this class: (score, image_id, box), in input order for ties.
        ids, boxes, scores = [], [], []
        for image_id, (b, found, s) in dets.items():
            keep = found == label
            ids.extend([image_id] * int(keep.sum()))
            boxes.append(b[keep])
            scores.append(s[keep])
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        matched = {image_id: np.zeros(int(np.sum(g_labels == label)), bool) for image_id, (_, g_labels, _) in gt.items()}
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for rank, index in enumerate(order):
            image_id = ids[index]
            if image_id not in gt:
                fp[rank] = 1
                continue
            g_boxes, g_labels, g_difficult = gt[image_id]
            mine = g_labels == label
            ious = box_iou(boxes[index], g_boxes[mine])[0]
            if ious.size == 0 or ious.max() < iou_threshold:
                fp[rank] = 1
                continue
            best = int(ious.argmax())
            if g_difficult[mine][best]:
                continue  # ignored
            if matched[image_id][best]:
                fp[rank] = 1  # duplicate detection
            else:
                tp[rank] = 1
                matched[image_id][best] = True
        if npos == 0:
            per_class[name] = float("nan")
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = voc_ap(recall, precision, use_07_metric)
    valid = [ap for ap in per_class.values() if not math.isnan(ap)]
    return {"per_class": per_class, "mAP": float(np.mean(valid)) if valid else float("nan")}


# --------------------------------------------------------------------------------------------
# COCO

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(detections: Mapping, label_to_category: Mapping[int, int]) -> list[dict]:
    """Detections -> COCO result dicts (bbox as x, y, w, h; labels mapped to category ids)."""
    results = []
    for image_id, det in detections.items():
        boxes = _array(det["boxes"], np.float64, (-1, 4))
        labels = _array(det["labels"], np.int64)
        scores = _array(det["scores"], np.float64)
        for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            if label not in label_to_category:
                raise ValueError(f"detection label {label} has no COCO category; known labels: {sorted(label_to_category)}")
            x1, y1, x2, y2 = box
            results.append({
                "image_id": int(image_id), "category_id": int(label_to_category[label]),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
            })
    return results


def coco_eval(detections: Mapping, coco_gt, label_to_category: Mapping[int, int]) -> dict:
    """COCO box AP (pycocotools COCOeval, ``iouType="bbox"``) on the images in ``detections``.

    ``coco_gt`` is a pycocotools COCO object (``Splits.eval_info.coco_gt``); every image id of
    ``detections`` must be one of its images (an image with no detections still counts: give it
    empty arrays).  Returns AP (IoU 0.50:0.95), AP50, AP75 and APs/APm/APl (small/medium/large
    objects); pycocotools reports -1 where no ground truth falls in a category.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(int(i) for i in detections)
    unknown = set(image_ids) - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections name image ids the ground truth lacks: {sorted(unknown)[:10]}")
    results = coco_results(detections, label_to_category)
    if not results:
        return {key: 0.0 for key in COCO_KEYS}
    quiet = contextlib.redirect_stdout(io.StringIO())  # pycocotools prints its progress
    with quiet:
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(COCO_KEYS, evaluator.stats[:6])}


def evaluate(eval_info, detections: Mapping, class_names: Sequence[str]) -> dict:
    """All the metrics ``eval_info`` (``Splits.eval_info``) supports.

    Always ``per_class`` and ``mAP`` (VOC AP at IoU 0.5 with the data set's AP flavour, on the
    images in ``detections``); for COCO-format data also the :func:`coco_eval` keys.
    """
    ground_truth = {i: eval_info.ground_truth[i] for i in detections if i in eval_info.ground_truth}
    metrics = voc_eval(detections, ground_truth, len(class_names), use_07_metric=eval_info.use_07_metric, class_names=class_names)
    if eval_info.kind == "coco":
        metrics.update(coco_eval(detections, eval_info.coco_gt, eval_info.label_to_category))
    return metrics


# --------------------------------------------------------------------------------------------
# Outputs


def save_per_class_csv(per_class: Mapping[str, float], path) -> Path:
    """Write ``class,AP`` rows (AP as a fraction, ``nan`` for a class without ground truth)."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "AP"])
        for name, ap in per_class.items():
            writer.writerow([name, f"{float(ap):.6f}"])
    return Path(path)


def detection_figure(image, boxes, labels, scores, class_names: Sequence[str], *, ground_truth=None,
                     score_threshold: float = 0.5, at_least: int = 3):
    """A matplotlib Figure of ``image`` with its detections and, dashed, its ground truth.

    ``image``: float [3, H, W] in [0, 1] (tensor or array) or uint8 [H, W, 3]; ``scores=None``
    draws every box without a score; ``class_names[label]`` names a box; ``ground_truth``:
    ``{"boxes", "labels"}`` drawn dashed in the class colour. Detections with a score below
    ``score_threshold`` are left out, except that when none reaches it the ``at_least`` best
    are drawn (a short run's image is not blank) and the legend says so. A legend under the
    image names each class drawn and the two line styles.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        image = image[..., 0]
    boxes = _array(boxes, np.float64, (-1, 4))
    labels = _array(labels, np.int64)
    shown = np.arange(len(boxes))
    note = None
    if scores is not None:
        scores = _array(scores, np.float64)
        shown = np.flatnonzero(scores >= score_threshold)
        if shown.size == 0 and scores.size:
            shown = np.argsort(-scores, kind="stable")[:at_least]
            note = f"no score >= {score_threshold:g}: the {shown.size} best shown"
    truth = (np.zeros((0, 4)), np.zeros(0, np.int64)) if ground_truth is None else (
        _array(ground_truth["boxes"], np.float64, (-1, 4)), _array(ground_truth["labels"], np.int64))
    height, width = image.shape[:2]

    scale = max(1.0, 256 / max(width, height, 1))  # small images are enlarged so captions stay legible
    drawn = sorted({int(label) for label in labels[shown]} | {int(label) for label in truth[1]})
    width_px = max(width * scale, 256)
    columns = max(1, int(width_px // 120))  # legend entries per row that fit the picture's width
    rows = math.ceil((len(drawn) + 2) / columns)
    legend_px = 14 * rows + (14 if note else 0) + 8
    total_px = height * scale + legend_px
    figure = Figure(figsize=(width_px / 100, total_px / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes([0, legend_px / total_px, 1, height * scale / total_px])
    # extent: pixel j covers [j, j + 1), the boxes' convention (imshow centres pixels on j).
    axes.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, width, height, 0), interpolation="nearest")
    axes.set_axis_off()
    colours = matplotlib.colormaps["tab10"].colors
    colour_of = lambda label: colours[int(label) % len(colours)]
    name_of = lambda label: class_names[label] if 0 <= label < len(class_names) else str(label)
    for (x1, y1, x2, y2), label in zip(*truth):
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour_of(label), linewidth=1.2,
                                 linestyle="--"))
    for k in shown:
        x1, y1, x2, y2 = boxes[k]
        label = labels[k]
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour_of(label), linewidth=1.8))
        caption = name_of(label) if scores is None else f"{name_of(label)} {scores[k]:.2f}"
        axes.text(x1, y1, caption, fontsize=7, color="white", va="bottom",
                  bbox=dict(facecolor=colour_of(label), edgecolor="none", pad=1, alpha=0.8))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    handles = [Patch(color=colour_of(label), label=name_of(label)) for label in drawn]
    handles += [Line2D([], [], color="black", linestyle="-", label="prediction"),
                Line2D([], [], color="black", linestyle="--", label="ground truth")]
    figure.legend(handles=handles, loc="lower center", ncols=columns, fontsize=7, frameon=False, title=note,
                  title_fontsize=7, borderaxespad=0.2, handlelength=1.5, columnspacing=1.0)
    return figure


def draw_detections(image, boxes, labels, scores, class_names: Sequence[str], path, score_threshold: float = 0.5,
                    ground_truth=None) -> Path:
    """Save :func:`detection_figure` as a PNG at ``path``."""
    figure = detection_figure(image, boxes, labels, scores, class_names, ground_truth=ground_truth,
                              score_threshold=score_threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def save_coco_json(detections: Mapping, eval_info, path) -> Path:
    """Write the detections as a COCO results file (``[{image_id, category_id, bbox, score}]``,
    bbox as x, y, w, h), which ``pycocotools.coco.COCO.loadRes`` reads. COCO-format data keep
    their category ids; VOC labels are their own ids, and ``file_name`` names the image."""
    label_to_category = eval_info.label_to_category or {label: label for det in detections.values()
                                                         for label in _array(det["labels"], np.int64).tolist()}
    results = coco_results(detections, label_to_category)
    for result in results:
        if result["image_id"] in eval_info.image_names:
            result["file_name"] = eval_info.image_names[result["image_id"]]
    with atomic_open(path, "w", encoding="utf-8") as file:
        json.dump(results, file)
    return Path(path)


# --------------------------------------------------------------------------------------------
# A model on a test split


def predict(model, dataset, device, batch_size: int = 4, process: Optional[distributed.Process] = None,
            outputs: Optional[Callable] = None) -> dict:
    """image_id -> {"boxes", "labels", "scores"} (CPU tensors) for every image of ``dataset``,
    in the data set's order: ``model(images)``, or ``outputs(images, targets)`` in its place
    (an attacked model, see :func:`pgd_outputs`, :func:`feature_outputs`); the model is left
    in the mode it was in (training goes on after an evaluation). Under torchrun (``process``
    in a process group) each process predicts its ``distributed.shard`` of ``dataset`` (pass
    the whole data set) and every process returns the detections of all images; every process
    must call it."""
    process = process or distributed.Process()
    was_training = model.training
    model.eval()
    found = []
    loader = make_loader(distributed.shard(dataset, process), batch_size, train=False, workers=0, seed=0)
    for images, targets in progress(loader, desc="predict", leave=False):
        images, targets = to_device(images, targets, device)
        if outputs is None:
            with torch.no_grad():
                batch = model(images)
        else:
            batch = outputs(images, targets)
        for target, output in zip(targets, batch):
            found.append((int(target["image_id"]), {k: v.detach().cpu() for k, v in output.items()}))
    model.train(was_training)
    # The data set's order, as one process would have it: VOC matching breaks score ties by it.
    return dict(distributed.gather_shards(found, process))


def pgd_outputs(model, attack: AdvPropConfig, bn: str = "main") -> Callable:
    """``outputs(images, targets)`` for :func:`predict`: the detections of input PGD images,
    made against the total training loss (``losses_mode``, as the release's ``eval_PGD``),
    the attack's passes through the main or, with ``bn="aux"``, the auxiliary BN."""
    def outputs(images, targets):
        with losses_mode(model), afan.use_aux_bn(model, enabled=bn == "aux", in_eval=True):
            adversarial = pixel_pgd(model, images, targets, attack)
        with torch.no_grad():
            return model(adversarial)
    return outputs


def feature_outputs(model, attack: FeatureAttack) -> Callable:
    """``outputs(images, targets)`` for :func:`predict`: the detections from the backbone
    feature after ``attack.layer`` perturbed by ``attack`` against the total training loss
    (``losses_mode``), the release's ``eval_sat_layers.py``."""
    at = attack.layer

    def outputs(images, targets):
        with losses_mode(model):
            image_list, scaled = prepare(model, images, targets)
            with torch.no_grad():
                feats = head(model, image_list.tensors, at)
            feature = attack.perturb(feats[at], lambda f: total_loss(tail(model, {**feats, at: f}, at, image_list,
                                                                                 scaled)))
        with torch.no_grad():
            return tail_detections(model, {**feats, at: feature}, at, image_list, [image.shape[-2:] for image in images])
    return outputs


def run_evaluation(model, splits, device, out_dir, *, draw: int = 4, write: bool = True,
                   process: Optional[distributed.Process] = None) -> dict:
    """Predict the test split and score it; returns the scalar metrics. With ``write``, also
    ``per_class_ap.csv``, ``detections.json`` (COCO results format) and ``draw`` pictures of
    predictions with their ground truth in ``out_dir/predictions``.

    Under torchrun (``process`` in a process group) every process predicts its part of the
    split (:func:`predict`), process 0 scores all the detections and writes the files (the
    others write nothing; their ``out_dir`` may be None), and every process returns process 0's
    metrics. Every process must call it."""
    process = process or distributed.Process()
    detections = predict(model, splits.test, device, process=process)
    metrics = None
    if process.is_main:
        metrics = evaluate(splits.eval_info, detections, splits.class_names)
        per_class = metrics.pop("per_class")
        if write:
            out_dir = Path(out_dir)
            save_per_class_csv(per_class, out_dir / "per_class_ap.csv")
            save_coco_json(detections, splits.eval_info, out_dir / "detections.json")
            for index in range(min(draw, len(splits.test))):
                image, target = splits.test[index]
                found = detections[int(target["image_id"])]
                draw_detections(image, found["boxes"], found["labels"], found["scores"], splits.class_names,
                                out_dir / "predictions" / f"{index:03d}.png", ground_truth=target)
    return distributed.broadcast_object(metrics, process)
