"""Detection data: Shapes written to and read from COCO format, the flip, tiny VOC and COCO
fixtures in the real on-disk formats, and errors that say what to fix."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from afan_harness.shapes import SHAPE_CLASSES, render_sample
from Detection.data import (
    VOC_CLASSES, CocoDetection, DataConfig, DataError, RandomHorizontalFlip, build_datasets, collate,
    hflip, make_loader, write_shapes_coco,
)

# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [("train_size", 0), ("val_size", -1), ("image_size", 8), ("workers", -1), ("flip", "yes")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="data.name.*voc07"):
        DataConfig(name="kitti")


# --------------------------------------------------------------------------------------------
# Shapes in COCO format


def test_shapes_written_as_coco_read_back_like_render_sample(tmp_path):
    path = write_shapes_coco(tmp_path, "train", size=5, image_size=48, seed=3)
    folder = tmp_path / "train_5x48px_seed3"
    assert path == folder / "instances.json"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    data = CocoDetection(folder / "images", path, train=False)
    assert data.class_names == ("__background__", *SHAPE_CLASSES)
    assert len(data) == 5
    for index in range(5):
        sample = render_sample(3, "train", index, image_size=48)
        image, target = data[index]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
        assert torch.allclose(image, torch.from_numpy(sample.image), atol=0.5 / 255 + 1e-6)  # PNG rounding only
        assert torch.equal(target["boxes"], torch.from_numpy(sample.boxes))
        # Category ids 1..6 follow SHAPE_CLASSES, so the contiguous labels are the classes + 1.
        assert torch.equal(target["labels"], torch.from_numpy(sample.labels) + 1)
        assert [data.label_to_category[int(label)] for label in target["labels"]] == (sample.labels + 1).tolist()
        assert target["image_id"] == index + 1


def test_shapes_reused_when_parameters_match_and_never_rewritten_for_others(tmp_path):
    """A run with other sizes (e.g. a test at another image size) writes its own folder: the
    images a running job reads stay as they are."""
    path = write_shapes_coco(tmp_path, "val", size=3, image_size=32, seed=0)
    png = path.parent / "images" / "000000.png"
    stamps = (path.stat().st_mtime_ns, png.stat().st_mtime_ns)
    assert write_shapes_coco(tmp_path, "val", size=3, image_size=32, seed=0) == path
    assert (path.stat().st_mtime_ns, png.stat().st_mtime_ns) == stamps
    other = write_shapes_coco(tmp_path, "val", size=2, image_size=48, seed=1)
    assert other.parent.name == "val_2x48px_seed1" and len(json.loads(other.read_text())["images"]) == 2
    assert (path.stat().st_mtime_ns, png.stat().st_mtime_ns) == stamps
    assert not list(tmp_path.rglob("*.tmp"))  # every file was renamed into place


def test_build_shapes_splits_and_loader(tmp_path):
    cfg = DataConfig(name="shapes", root=str(tmp_path), train_size=6, val_size=4, image_size=32, workers=0)
    splits = build_datasets(cfg, seed=0)
    assert splits.num_classes == 7 and splits.class_names[1:] == SHAPE_CLASSES
    assert len(splits.test) == 4 and 1 <= len(splits.train) <= 6
    info = splits.eval_info
    assert info.kind == "coco" and info.label_to_category == {k: k for k in range(1, 7)}
    assert sorted(info.ground_truth) == sorted(info.coco_gt.getImgIds()) == [1, 2, 3, 4]
    torch.manual_seed(0)  # with workers=0 the flips draw from the global RNG; workers are seeded by the loader
    images, targets = next(iter(make_loader(splits.train, 4, train=True, workers=0, seed=0)))
    assert isinstance(images, list) and len(images) == 4 and images[0].shape == (3, 32, 32)
    assert all(t["labels"].min() >= 1 and t["boxes"].shape[1] == 4 for t in targets)
    # Reproducible order and flips.
    torch.manual_seed(0)
    again = next(iter(make_loader(splits.train, 4, train=True, workers=0, seed=0)))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, again[1]))
    assert collate([(1, "a"), (2, "b")]) == ([1, 2], ["a", "b"])


# --------------------------------------------------------------------------------------------
# Flip


def test_hflip_moves_boxes_with_the_pixels():
    image = torch.zeros(3, 8, 10)
    image[:, 2:6, 1:4] = 1.0  # pixels x 1..3 -> box [1, 2, 4, 6]
    target = {"boxes": torch.tensor([[1.0, 2, 4, 6]]), "labels": torch.tensor([1])}
    flipped, new = hflip(image, target)
    assert torch.equal(new["boxes"], torch.tensor([[6.0, 2, 9, 6]]))
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (6, 2, 9, 6)
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2, 4, 6]]))  # input untouched
    assert torch.equal(hflip(*hflip(image, target))[1]["boxes"], target["boxes"])
    assert torch.equal(RandomHorizontalFlip(1.0)(image, target)[1]["boxes"], new["boxes"])
    assert RandomHorizontalFlip(0.0)(image, target)[1]["boxes"] is target["boxes"]


# --------------------------------------------------------------------------------------------
# Pascal VOC fixture

OBJECT = """<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>
<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"""

VOC_IMAGES = {  # stem: [(class, difficult, 1-based inclusive box)]
    "000001": [("dog", 0, (1, 1, 10, 8)), ("person", 1, (5, 5, 15, 12))],
    "000002": [("cat", 0, (3, 2, 20, 16))],
    "000003": [("car", 0, (2, 3, 12, 9)), ("person", 1, (4, 4, 8, 8))],
    "000004": [("bird", 1, (2, 2, 6, 6))],  # only difficult: skipped for training
}


def make_voc(root, year="VOC2007", sets=None):
    base = root / "VOCdevkit" / year
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for stem, objects in VOC_IMAGES.items():
        Image.fromarray(np.full((16, 20, 3), 90, np.uint8)).save(base / "JPEGImages" / f"{stem}.jpg")
        body = "".join(OBJECT.format(name=n, difficult=d, box=b) for n, d, b in objects)
        (base / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>{year}</folder><filename>{stem}.jpg</filename>"
            f"<size><width>20</width><height>16</height><depth>3</depth></size>{body}</annotation>"
        )
    sets = sets or {"trainval": ["000001", "000002", "000004"], "test": ["000003"]}
    for name, stems in sets.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(stems) + "\n")
    return base


def test_voc_boxes_labels_and_difficult(tmp_path):
    make_voc(tmp_path)
    splits = build_datasets(DataConfig(name="voc07", root=str(tmp_path), flip=False), seed=0)
    assert splits.num_classes == 21 and splits.class_names[1:] == VOC_CLASSES
    assert len(splits.train) == 2  # 000004 has only a difficult object
    image, target = splits.train[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    # 1-based inclusive (1, 1, 10, 8) -> 0-based continuous (0, 0, 10, 8); the difficult person is gone.
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0, 10, 8]]))
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1] == [12]
    assert torch.equal(splits.train[1][1]["boxes"], torch.tensor([[2.0, 1, 20, 16]]))
    assert splits.train[1][1]["labels"].tolist() == [8]  # cat

    _, test_target = splits.test[0]
    assert torch.equal(test_target["boxes"], torch.tensor([[1.0, 2, 12, 9], [3, 3, 8, 8]]))
    assert test_target["labels"].tolist() == [7, 15]  # car, person
    assert test_target["difficult"].tolist() == [False, True]
    info = splits.eval_info
    assert info.kind == "voc" and info.use_07_metric and info.image_names == {0: "VOC2007/000003"}
    assert info.ground_truth[0]["difficult"].tolist() == [False, True]


def test_voc0712_adds_voc2012_trainval(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DataError, match="VOC2012"):
        build_datasets(DataConfig(name="voc0712", root=str(tmp_path)))
    make_voc(tmp_path, "VOC2012", {"trainval": ["000001", "000002"]})
    splits = build_datasets(DataConfig(name="voc0712", root=str(tmp_path)))
    assert len(splits.train) == 4 and len(splits.test) == 1


def test_voc_missing_shows_layout_and_shapes(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))
    message = str(error.value)
    assert "VOCdevkit/VOC2007" in message and "ImageSets/Main" in message
    assert "data.name=shapes" in message and "cannot be downloaded automatically" in message


def test_voc_malformed_xml_names_the_file(tmp_path):
    base = make_voc(tmp_path)
    bad = base / "Annotations" / "000002.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DataError, match="000002.xml.*not valid XML"):
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))


def test_voc_doctype_refused(tmp_path):
    base = make_voc(tmp_path)
    bad = base / "Annotations" / "000001.xml"
    bad.write_text('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
                   "<annotation><filename>&lol2;</filename></annotation>")
    with pytest.raises(DataError, match="000001.xml.*DOCTYPE"):
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))


def test_voc_unknown_class_names_the_file(tmp_path):
    base = make_voc(tmp_path)
    (base / "Annotations" / "000003.xml").write_text(
        "<annotation>" + OBJECT.format(name="unicorn", difficult=0, box=(1, 1, 5, 5)) + "</annotation>")
    with pytest.raises(DataError, match="000003.xml.*unicorn"):
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))


def test_corrupt_image_named_before_anything_starts(tmp_path):
    """Every image's structure is checked when the data set is built, before a run folder is
    touched: a file that is no image, or one cut in half."""
    base = make_voc(tmp_path)
    good = (base / "JPEGImages" / "000001.jpg").read_bytes()
    (base / "JPEGImages" / "000001.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*000001\.jpg .*replace this file"):
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))
    (base / "JPEGImages" / "000001.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"000001\.jpg \(Truncated File Read\)"):
        build_datasets(DataConfig(name="voc07", root=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# COCO fixture


def make_coco(root):
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]  # a gap, as in COCO
    for split in ("train", "val"):
        folder = root / f"{split}2017"
        folder.mkdir()
        images = []
        for image_id in (1, 2, 3):
            name = f"{image_id:012d}.jpg"
            Image.fromarray(np.full((24, 32, 3), 40 * image_id, np.uint8)).save(folder / name)
            images.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 6], "area": 48, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},  # degenerate
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [20, 10, 20, 20], "iscrowd": 0},  # clipped, no area
            # image 3: no annotation at all
        ]
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_coco_contiguous_labels_crowd_and_empty_images(tmp_path):
    make_coco(tmp_path)
    splits = build_datasets(DataConfig(name="coco", root=str(tmp_path), flip=False))
    assert splits.num_classes == 3 and splits.class_names == ("__background__", "person", "car")
    assert splits.eval_info.label_to_category == {1: 1, 2: 3}
    assert len(splits.train) == 2  # image 3 has no annotation: skipped for training
    _, first = splits.train[0]
    assert first["image_id"] == 1
    assert torch.equal(first["boxes"], torch.tensor([[2.0, 3, 12, 8]]))  # xywh -> xyxy; crowd removed
    assert first["labels"].tolist() == [2]  # category 3 -> label 2
    _, second = splits.train[1]
    assert torch.equal(second["boxes"], torch.tensor([[4.0, 4, 12, 10], [20, 10, 32, 24]]))  # degenerate dropped, clipped
    assert second["labels"].tolist() == [1, 2]

    assert len(splits.test) == 3  # evaluation keeps every image, and crowd boxes flagged
    image, first_test = splits.test[0]
    assert image.shape == (3, 24, 32)
    assert first_test["iscrowd"].tolist() == [False, True] and first_test["labels"].tolist() == [2, 1]
    assert splits.test[2][1]["boxes"].shape == (0, 4)
    gt = splits.eval_info.ground_truth
    assert gt[1]["difficult"].tolist() == [False, True] and len(gt[3]["labels"]) == 0


def test_coco_missing_shows_layout_and_shapes(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(name="coco", root=str(tmp_path)))
    message = str(error.value)
    assert "annotations/instances_{train,val}2017.json" in message and "{train,val}2017/*.jpg" in message
    assert "data.name=shapes" in message and "cannot be downloaded automatically" in message


def test_coco_malformed_json_names_the_file(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(DataError, match="instances_val2017.json.*not valid JSON"):
        build_datasets(DataConfig(name="coco", root=str(tmp_path)))
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="instances_val2017.json.*'annotations'"):
        build_datasets(DataConfig(name="coco", root=str(tmp_path)))
