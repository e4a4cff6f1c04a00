"""Detection metrics: VOC AP (by hand), VOC matching (by hand), COCO AP (against pycocotools run
directly), and the CSV / PNG outputs."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from Detection.evaluation import (box_iou, coco_eval, detection_figure, draw_detections, save_per_class_csv, voc_ap,
                                  voc_eval)

# --------------------------------------------------------------------------------------------
# voc_ap
#
# 4 positives; ranked detections TP, FP, TP, TP, FP give
#   recall    = 1/4, 1/4, 2/4, 3/4, 3/4
#   precision = 1/1, 1/2, 2/3, 3/4, 3/5
# All-point: the envelope is 1 up to recall 0.25, then max(2/3, 3/4, 3/5) = 0.75 up to 0.5 and
#   0.75 up to 0.75:  0.25 * 1 + 0.25 * 0.75 + 0.25 * 0.75 = 0.625.
# 11-point: t = 0, 0.1, 0.2 -> 1; t = 0.3, 0.4, 0.5 -> 0.75; t = 0.6, 0.7 -> 0.75;
#   t = 0.8, 0.9, 1.0 -> 0 (no recall that high):  (3 + 5 * 0.75) / 11 = 6.75 / 11.
RECALL = [0.25, 0.25, 0.5, 0.75, 0.75]
PRECISION = [1.0, 0.5, 2 / 3, 0.75, 0.6]


def test_voc_ap_all_point_by_hand():
    assert voc_ap(RECALL, PRECISION, use_07_metric=False) == pytest.approx(0.625)


def test_voc_ap_11_point_by_hand():
    assert voc_ap(RECALL, PRECISION, use_07_metric=True) == pytest.approx(6.75 / 11)


def test_voc_ap_perfect_and_empty():
    assert voc_ap([0.5, 1.0], [1.0, 1.0], use_07_metric=False) == pytest.approx(1.0)
    assert voc_ap([0.5, 1.0], [1.0, 1.0], use_07_metric=True) == pytest.approx(1.0)
    assert voc_ap([], [], use_07_metric=True) == 0.0
    assert voc_ap([], [], use_07_metric=False) == 0.0


def matlab_colon(a, d, b):
    """MATLAB's ``a:d:b`` as MathWorks describes its colon operator: the first half is
    ``a + k*d``, the second ``b - k*d`` counted from the end, the middle of an even count
    ``(a + b) / 2``."""
    n = round((b - a) / d)
    out = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        out[k], out[n - k] = a + k * d, b - k * d
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


def eleven_point(recall, precision, thresholds):
    """VOCevaldet.m's loop: add up, over 11, the highest precision at recall >= t of each t."""
    ap = 0.0
    for t in thresholds:
        ap += max([p for r, p in zip(recall, precision) if r >= t], default=0.0) / 11
    return ap


# 10 positives; ranked detections T T T F T T T F T F F T reach recalls of exactly 3/10, 6/10
# and 7/10 (the doubles nearest 0.3, 0.6, 0.7).
HITS = [1, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1]
TP = np.cumsum(HITS)
EXACT_RECALL = TP / 10
EXACT_PRECISION = TP / np.arange(1, len(HITS) + 1)


def test_voc_ap_11_point_uses_the_devkit_thresholds():
    devkit = matlab_colon(0.0, 0.1, 1.0)
    assert devkit[3] == 3 * 0.1 != 0.3 and devkit[6] == 0.6 and devkit[7] == 0.7
    ap = voc_ap(EXACT_RECALL, EXACT_PRECISION, use_07_metric=True)
    assert ap == eleven_point(EXACT_RECALL, EXACT_PRECISION, devkit)
    # By hand: t = 0, 0.1, 0.2 -> 1; t = 0.3 (3 * 0.1, above a recall of exactly 0.3), 0.4,
    # 0.5 and 0.6 (recall 6/10 counts) -> 6/7; t = 0.7 (recall 7/10 counts) -> 7/9; t = 0.8 -> 8/12.
    assert ap == pytest.approx((3 + 4 * 6 / 7 + 7 / 9 + 8 / 12) / 11, rel=1e-15)
    # linspace's 0.6000000000000001 and 0.7000000000000001 skip the recalls 6/10 and 7/10.
    linspace = eleven_point(EXACT_RECALL, EXACT_PRECISION, np.linspace(0, 1, 11))
    assert linspace == pytest.approx((3 + 3 * 6 / 7 + 7 / 9 + 2 * 8 / 12) / 11, rel=1e-15)
    assert ap - linspace == pytest.approx((6 / 7 - 8 / 12) / 11, rel=1e-12)


def test_box_iou_continuous_coordinates():
    # [0, 10) x [0, 10) and [5, 15) x [5, 15): 25 / (100 + 100 - 25), no "+ 1" pixel.
    assert box_iou([[0, 0, 10, 10]], [[5, 5, 15, 15]])[0, 0] == pytest.approx(25 / 175)


# --------------------------------------------------------------------------------------------
# voc_eval on a hand-made set: labels 1 = cat, 2 = dog (num_classes = 3 with the background)
#
# image 1: cat A [0,0,10,10]; cat B [20,20,30,30] difficult; dog C [0,20,10,30]
# image 2: cat D [5,5,15,15]; dog E [20,0,30,10]
#
# cat (2 positives: A, D; B is difficult), by score:
#   .9 img1 [0,0,10,10]   IoU 1 with A               -> TP
#   .8 img1 [0,0,10,9]    IoU 0.9 with A, matched     -> FP (duplicate)
#   .7 img1 [20,20,30,30] matches difficult B         -> ignored (neither TP nor FP)
#   .6 img2 [10,10,20,20] IoU 25/175 = 0.14 with D    -> FP (low IoU)
#   .5 img2 [5,5,15,15]   IoU 1 with D                -> TP
#   recall    .5, .5, .5, .5, 1     precision 1, 1/2, 1/2, 1/3, 1/2 (the ignored rank repeats a point)
#   all-point: .5 * 1 + .5 * .5 = 0.75
#   11-point: t = 0 .. 0.5 (6 points) -> 1; t = 0.6 .. 1 (5 points) -> 0.5: (6 + 2.5) / 11 = 8.5 / 11
# dog (2 positives: C, E), by score:
#   .99 img1 [40,40,50,50] no overlap                  -> FP
#   .95 img2 [20,0,30,10]  IoU 1 with E                -> TP
#   .4  img1 [0,22,10,30]  IoU 80/100 = 0.8 with C     -> TP
#   recall 0, .5, 1   precision 0, 1/2, 2/3: the envelope is 2/3 everywhere
#   all-point = 11-point = 2/3
CAT_AP = {False: 0.75, True: 8.5 / 11}
DOG_AP = 2 / 3

GROUND_TRUTH = {
    1: {"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 20, 10, 30]], dtype=torch.float32),
        "labels": torch.tensor([1, 1, 2]), "difficult": torch.tensor([False, True, False])},
    2: {"boxes": np.array([[5, 5, 15, 15], [20, 0, 30, 10]], dtype=np.float32), "labels": np.array([1, 2])},
}
DETECTIONS = {
    1: {"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [40, 40, 50, 50], [0, 22, 10, 30]], dtype=torch.float32),
        "labels": torch.tensor([1, 1, 1, 2, 2]), "scores": torch.tensor([0.9, 0.8, 0.7, 0.99, 0.4])},
    2: {"boxes": [[10, 10, 20, 20], [5, 5, 15, 15], [20, 0, 30, 10]], "labels": [1, 1, 2], "scores": [0.6, 0.5, 0.95]},
}


@pytest.mark.parametrize("use_07_metric", [False, True])
def test_voc_eval_by_hand(use_07_metric):
    result = voc_eval(DETECTIONS, GROUND_TRUTH, num_classes=3, use_07_metric=use_07_metric,
                      class_names=("__background__", "cat", "dog"))
    assert set(result["per_class"]) == {"cat", "dog"}
    assert result["per_class"]["cat"] == pytest.approx(CAT_AP[use_07_metric])
    assert result["per_class"]["dog"] == pytest.approx(DOG_AP)
    assert result["mAP"] == pytest.approx((CAT_AP[use_07_metric] + DOG_AP) / 2)


def test_voc_eval_difficult_only_class_is_nan_and_left_out_of_the_mean():
    gt = {1: {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [1, 2], "difficult": [False, True]}}
    det = {1: {"boxes": [[0, 0, 10, 10]], "labels": [1], "scores": [0.5]}}
    result = voc_eval(det, gt, num_classes=3)
    assert result["per_class"]["1"] == pytest.approx(1.0)
    assert math.isnan(result["per_class"]["2"])
    assert result["mAP"] == pytest.approx(1.0)


def test_voc_eval_no_detections_gives_zero():
    result = voc_eval({1: {"boxes": np.zeros((0, 4)), "labels": [], "scores": []}}, GROUND_TRUTH, num_classes=3)
    assert result["mAP"] == 0.0


# --------------------------------------------------------------------------------------------
# coco_eval against pycocotools run directly


def _gt_json(path):
    # Category ids 1 and 3 (a gap, as in COCO): labels 1 and 2.
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
              {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}]
    boxes = [(1, 1, [10, 10, 30, 20]), (1, 3, [50, 40, 40, 30]), (2, 3, [5, 5, 8, 8]), (2, 1, [60, 10, 30, 60])]
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for k, (i, c, b) in enumerate(boxes)]
    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _coco(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


COCO_DETECTIONS = {
    1: {"boxes": torch.tensor([[11.0, 10, 40, 31], [52, 41, 90, 70], [0, 0, 20, 20]]),
        "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.9, 0.8, 0.3])},
    2: {"boxes": torch.tensor([[5.0, 5, 12, 13], [60, 15, 90, 70]]),
        "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.6, 0.7])},
}


def test_coco_eval_equals_pycocotools(tmp_path):
    from pycocotools.cocoeval import COCOeval

    gt_path = _gt_json(tmp_path / "gt.json")
    result = coco_eval(COCO_DETECTIONS, _coco(gt_path), {1: 1, 2: 3})

    # The same detections by hand: xywh, category ids 1 and 3.
    category = {1: 1, 2: 3}
    direct = []
    for image_id, det in COCO_DETECTIONS.items():
        for (x1, y1, x2, y2), label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            direct.append({"image_id": image_id, "category_id": category[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    gt = _coco(gt_path)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(direct), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], evaluator.stats[:6]))
    assert set(result) == set(expected)
    for key in expected:
        assert result[key] == pytest.approx(expected[key]), key
    assert 0 < result["AP"] < 1


def test_coco_eval_perfect_detections(tmp_path):
    gt = _coco(_gt_json(tmp_path / "gt.json"))
    label = {1: 1, 3: 2}
    detections = {}
    for image_id in (1, 2):
        anns = gt.imgToAnns[image_id]
        detections[image_id] = {
            "boxes": [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            "labels": [label[a["category_id"]] for a in anns], "scores": [0.9] * len(anns),
        }
    assert coco_eval(detections, gt, {1: 1, 2: 3})["AP"] == pytest.approx(1.0)


def test_coco_eval_rejects_unknown_images_and_labels(tmp_path):
    gt = _coco(_gt_json(tmp_path / "gt.json"))
    with pytest.raises(ValueError, match="image ids"):
        coco_eval({7: COCO_DETECTIONS[1]}, gt, {1: 1, 2: 3})
    with pytest.raises(ValueError, match="label 2"):
        coco_eval(COCO_DETECTIONS, gt, {1: 1})


# --------------------------------------------------------------------------------------------
# Outputs


def test_save_per_class_csv(tmp_path):
    path = save_per_class_csv({"cat": 0.75, "dog": 2 / 3, "cow": float("nan")}, tmp_path / "out" / "ap.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "class,AP"
    assert lines[1] == "cat,0.750000"
    assert lines[2] == "dog,0.666667"
    assert lines[3] == "cow,nan"


def test_draw_detections_writes_png(tmp_path):
    image = torch.rand(3, 40, 60)
    path = draw_detections(
        image, torch.tensor([[5.0, 5, 30, 30], [10, 10, 50, 35]]), torch.tensor([1, 2]), torch.tensor([0.9, 0.2]),
        ("__background__", "cat", "dog"), tmp_path / "figs" / "det.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Ground truth (no scores) and an empty set draw too.
    draw_detections(image, [[5, 5, 30, 30]], [1], None, ("__background__", "cat"), tmp_path / "gt.png")
    draw_detections(image.numpy(), np.zeros((0, 4)), [], [], ("__background__",), tmp_path / "none.png")
    assert (tmp_path / "gt.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "none.png").is_file()


def _drawn(figure):
    """(solid rectangles, dashed rectangles, captions, legend texts, legend title) of a figure."""
    from matplotlib.patches import Rectangle

    axes = figure.axes[0]
    boxes = [p for p in axes.patches if isinstance(p, Rectangle)]
    solid = [p for p in boxes if p.get_linestyle() in ("-", "solid")]
    dashed = [p for p in boxes if p.get_linestyle() in ("--", "dashed")]
    legend = figure.legends[0]
    return solid, dashed, [t.get_text() for t in axes.texts], [t.get_text() for t in legend.get_texts()], \
        legend.get_title().get_text()


def test_detection_pictures_show_ground_truth_dashed_and_a_legend():
    names = ("__background__", "cat", "dog", "cow")
    figure = detection_figure(torch.rand(3, 40, 60), [[5.0, 5, 30, 30], [10, 10, 50, 35]], [1, 2], [0.9, 0.2], names,
                              ground_truth={"boxes": [[4.0, 6, 31, 29], [0, 0, 10, 10]], "labels": [1, 3]})
    solid, dashed, captions, legend, title = _drawn(figure)
    assert [p.get_xy() for p in solid] == [(5.0, 5.0)] and captions == ["cat 0.90"]  # 0.2 < 0.5 is left out
    assert sorted(p.get_xy() for p in dashed) == [(0.0, 0.0), (4.0, 6.0)]
    assert legend == ["cat", "cow", "prediction", "ground truth"] and title == ""


def test_detection_pictures_of_a_short_run_show_the_best_boxes_and_say_so():
    scores = [0.1, 0.3, 0.05, 0.2]
    figure = detection_figure(np.zeros((20, 20, 3), np.uint8), [[0, 0, 5, 5]] * 4, [1, 1, 2, 2], scores,
                              ("__background__", "a", "b"), score_threshold=0.5)
    solid, dashed, captions, legend, title = _drawn(figure)
    assert captions == ["a 0.30", "b 0.20", "a 0.10"] and not dashed
    assert title == "no score >= 0.5: the 3 best shown" and legend[:2] == ["a", "b"]
