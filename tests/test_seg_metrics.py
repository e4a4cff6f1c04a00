import csv
import math

import numpy as np
import pytest
import torch

from Segmentation.data import CITYSCAPES_PALETTE, voc_palette
from Segmentation.metrics import SegmentationMetric, colorize, confusion_matrix, scores, write_per_class_csv

# A 3-class 2x4 example; the pixel at row 1, column 2 is ignored (255).
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
# Counted by hand: rows = ground truth, columns = prediction.
MATRIX = [[1, 1, 0],
          [0, 3, 0],
          [1, 0, 1]]


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix(PRED, TARGET, 3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == MATRIX


def test_scores_by_hand():
    result = scores(torch.tensor(MATRIX))
    assert result["pixel_acc"] == pytest.approx(5 / 7)  # 5 of the 7 counted pixels are right
    assert result["mean_acc"] == pytest.approx((1 / 2 + 3 / 3 + 1 / 2) / 3)
    # IoU = TP / (row sum + column sum - TP): 1/(2+2-1), 3/(3+4-3), 1/(2+1-1).
    assert result["per_class_iou"] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert result["miou"] == pytest.approx(19 / 36)
    assert result["fwiou"] == pytest.approx(2 / 7 * 1 / 3 + 3 / 7 * 3 / 4 + 2 / 7 * 1 / 2)  # 47/84
    assert all(type(result[key]) is float for key in ("pixel_acc", "mean_acc", "miou", "fwiou"))


def test_ignored_pixels_do_not_count():
    for value in (0, 1, 2):
        pred = PRED.clone()
        pred[1, 2] = value
        assert confusion_matrix(pred, TARGET, 3).tolist() == MATRIX
    # Another ignore index: pixels of the new index are skipped, and 255 is then a bad label.
    target = TARGET.clone()
    target[0, 0] = -1
    with pytest.raises(ValueError, match="target holds the class id 255"):
        confusion_matrix(PRED, target, 3, ignore_index=-1)
    target[1, 2] = 2
    assert confusion_matrix(PRED, target, 3, ignore_index=-1).sum() == 7


def test_accumulation_equals_one_matrix():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (5, 6, 7), generator=generator)
    targets = torch.randint(0, 4, (5, 6, 7), generator=generator)
    targets[targets == 3] = 255  # some ignored pixels
    metric = SegmentationMetric(4)
    for batch in range(0, 5, 2):  # uneven batches: 2, 2, 1
        metric.update(preds[batch:batch + 2], targets[batch:batch + 2])
    whole = confusion_matrix(preds, targets, 4)
    assert torch.equal(metric.matrix, whole)
    assert metric.matrix.dtype == torch.int64
    assert metric.compute() == scores(whole)
    metric.reset()
    assert metric.matrix.sum() == 0


def test_absent_class_is_nan_and_left_out_of_the_means():
    result = scores(torch.tensor([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]))
    assert math.isnan(result["per_class_iou"][3])
    assert result["miou"] == pytest.approx(19 / 36)
    assert result["mean_acc"] == pytest.approx(2 / 3)


def test_class_only_predicted_counts_as_zero_iou():
    matrix = torch.tensor([[2, 0, 1], [0, 2, 0], [0, 0, 0]])  # class 2 predicted once, never true
    result = scores(matrix)
    assert result["per_class_iou"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert result["miou"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert result["mean_acc"] == pytest.approx((2 / 3 + 1) / 2)  # class 2 has no pixel to be right on


def test_empty_matrix_gives_nan():
    result = scores(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(result[key]) for key in ("pixel_acc", "mean_acc", "miou", "fwiou"))


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_bad_label_raises_naming_it(bad):
    target = TARGET.clone()
    target[0, 1] = bad
    with pytest.raises(ValueError, match=f"target holds the class id {bad}"):
        confusion_matrix(PRED, target, 3)


def test_bad_prediction_shape_or_dtype_raises():
    with pytest.raises(ValueError, match="pred holds the class id 5"):
        confusion_matrix(torch.full_like(TARGET, 5), TARGET, 3)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(PRED.float(), TARGET, 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:1], TARGET, 3)


def test_per_class_csv_round_trip(tmp_path):
    path = tmp_path / "per_class_iou.csv"
    ious = [1 / 3, float("nan"), 0.75]
    write_per_class_csv(path, ("background", "traffic light", "car"), ious)
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["class", "iou"]
    assert [row[0] for row in rows[1:]] == ["background", "traffic light", "car"]
    assert rows[2][1] == "nan"
    back = [float(row[1]) for row in rows[1:]]
    assert back[0] == 1 / 3 and math.isnan(back[1]) and back[2] == 0.75  # exact
    with pytest.raises(ValueError, match="one IoU per class"):
        write_per_class_csv(path, ("a", "b"), [0.5])


def test_colorize_maps_ids_to_palette_colours():
    palette = voc_palette()
    mask = torch.tensor([[0, 1, 15], [255, 2, 0]])
    image = np.array(colorize(mask, palette))
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert image[0].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128]]  # background, aeroplane, person
    assert image[1].tolist() == [[224, 224, 192], [0, 128, 0], [0, 0, 0]]  # VOC's boundary colour for 255
    city = np.array(colorize(np.array([[0, 13, 255]]), CITYSCAPES_PALETTE))
    assert city[0].tolist() == [[128, 64, 128], [0, 0, 142], [0, 0, 0]]  # road, car, ignore black
    with pytest.raises(ValueError, match="palette has 19 colours"):
        colorize(np.array([[0, 19]]), CITYSCAPES_PALETTE[:19])
