"""The built-in Shapes data: determinism, consistency of the three tasks' labels, errors."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from afan_harness.shapes import NUM_CLASSES, SHAPE_CLASSES, ShapesDataset, ShapesStyle, render_sample


def test_at_least_six_classes():
    assert NUM_CLASSES == len(SHAPE_CLASSES) >= 6


def test_samples_are_deterministic_and_streams_differ():
    a = render_sample(0, "train", 5, image_size=32)
    b = render_sample(0, "train", 5, image_size=32)
    for field in ("image", "boxes", "labels", "mask"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    for other in (render_sample(0, "train", 6), render_sample(0, "val", 5), render_sample(1, "train", 5)):
        assert not np.array_equal(a.image, other.image)
    # Random access does not depend on order: a data set gives the same item either way.
    ds = ShapesDataset("classification", size=10)
    forward = [ds[i][0] for i in range(10)]
    assert all(torch.equal(ds[i][0], forward[i]) for i in reversed(range(10)))


@pytest.mark.parametrize("size", [32, 64])
def test_annotations_agree_with_the_mask(size):
    for index in range(40):
        s = render_sample(3, "train", index, image_size=size, max_shapes=4)
        assert s.image.dtype == np.float32 and s.image.shape == (3, size, size)
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert s.mask.shape == (size, size) and s.mask.dtype == np.int64
        assert 0 <= s.mask.min() and s.mask.max() <= NUM_CLASSES
        # The label is the class with the largest visible area, computed from the mask here.
        area = np.bincount(s.mask.ravel(), minlength=NUM_CLASSES + 1)[1:]
        assert area[s.label] == area.max() > 0
        assert len(s.boxes) == len(s.labels) >= 1
        covered = np.zeros_like(s.mask, dtype=bool)
        for (x1, y1, x2, y2), cls in zip(s.boxes.astype(int), s.labels):
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            inside = s.mask[y1:y2, x1:x2] == cls + 1
            assert inside.any()  # every box holds pixels of its class
            # and is tight: all four border lines touch its class
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            box = np.zeros_like(covered)
            box[y1:y2, x1:x2] = s.mask[y1:y2, x1:x2] == cls + 1
            covered |= box
        assert np.array_equal(covered, s.mask > 0)  # every shape pixel lies in a box of its class


def test_dominant_labels_cover_all_classes():
    labels = [render_sample(0, "train", i).label for i in range(300)]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    assert (counts > 300 / NUM_CLASSES / 3).all(), counts


def test_dataset_outputs_for_each_task():
    image, label = ShapesDataset("classification", size=4)[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    image, target = ShapesDataset("detection", size=4, image_size=48)[1]
    assert image.shape == (3, 48, 48)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and (target["labels"] >= 1).all()
    assert (target["labels"] <= NUM_CLASSES).all()
    image, mask = ShapesDataset("segmentation", size=4, image_size=40)[2]
    assert mask.shape == (40, 40) and mask.dtype == torch.int64


def test_dataloader_batches_and_transform():
    ds = ShapesDataset("segmentation", size=6, image_size=32, transform=lambda t: 1 - t)
    raw = ShapesDataset("segmentation", size=6, image_size=32)
    images, masks = next(iter(DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
    torch.testing.assert_close(images[0], 1 - raw[0][0])
    assert torch.equal(masks[0], raw[0][1])  # targets are untouched by the transform
    images, labels = next(iter(DataLoader(ShapesDataset("classification", size=8), batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="depth"), "task='depth' is not valid; choose one of"),
        (dict(task="classification", split="holdout"), "split='holdout' is not valid"),
        (dict(task="classification", size=0), "size=0 is not valid"),
        (dict(task="classification", image_size=8), "image_size=8 is too small"),
        (dict(task="detection", max_shapes=0), "max_shapes=0 is not valid"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**kwargs)
    with pytest.raises(IndexError):
        ShapesDataset("classification", size=3)[3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_std=-0.1), "noise_std=-0.1 is not valid"),
        (dict(size_range=(0.3, 0.2)), "size_range=.* is not valid"),
        (dict(distractor_scale=(0.5,)), "distractor_scale=.* is not valid"),
        (dict(min_visible=1.0), "min_visible=1.0 is not valid"),
        (dict(supersample=0), "supersample=0 is not valid"),
    ],
)
def test_bad_style_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesStyle(**kwargs)


def test_style_changes_the_images():
    plain = render_sample(0, "train", 0, style=ShapesStyle(noise_std=0.0, texture=0.0))
    noisy = render_sample(0, "train", 0, style=ShapesStyle(noise_std=0.2))
    assert np.array_equal(plain.mask, noisy.mask)  # same scene
    assert np.abs(plain.image - noisy.image).mean() > 0.05


def test_cache_returns_the_same_samples_without_rendering_again(monkeypatch):
    cached = ShapesDataset("classification", size=4, cache=True)
    first = [cached[i][0] for i in range(4)]
    import afan_harness.shapes as shapes_module
    monkeypatch.setattr(shapes_module, "render_sample", lambda *a, **k: pytest.fail("rendered again"))
    assert all(torch.equal(cached[i][0], first[i]) for i in range(4))
    assert torch.equal(cached[-1][0], first[3])


def test_dataset_exposes_classes_and_defaults():
    ds = ShapesDataset("detection", split="val")
    assert ds.classes == SHAPE_CLASSES and ds.num_classes == NUM_CLASSES == 6
    assert len(ds) == 1000 and ds.image_size == 64
    assert len(ShapesDataset("classification")) == 5000
    assert "task='detection'" in repr(ds) and "split='val'" in repr(ds)


def test_splits_are_disjoint_streams():
    def fingerprints(split):
        return {render_sample(0, split, i).image.tobytes() for i in range(50)}

    train, val, test = fingerprints("train"), fingerprints("val"), fingerprints("test")
    assert len(train) == len(val) == len(test) == 50
    assert not (train & val or train & test or val & test)


def test_same_scene_at_another_resolution():
    # Scene parameters are drawn in relative units, so only the pixel grid changes.
    agree = 0
    for index in range(20):
        small = render_sample(2, "train", index, image_size=32)
        large = render_sample(2, "train", index, image_size=96)
        agree += small.label == large.label
        if np.array_equal(np.sort(small.labels), np.sort(large.labels)):
            # The boxes scale with the image (within 1.5 pixels of the small grid per side:
            # an occluded edge follows the occluder, which the small grid also rounds).
            order_s, order_l = np.argsort(small.labels, kind="stable"), np.argsort(large.labels, kind="stable")
            np.testing.assert_allclose(small.boxes[order_s] * 3, large.boxes[order_l], atol=4.5)
    assert agree >= 19


def test_worker_count_does_not_change_the_data():
    ds = ShapesDataset("classification", size=8)
    serial = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
    parallel = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


def test_detection_batches_with_a_list_collate():
    ds = ShapesDataset("detection", size=4, image_size=64, max_shapes=5)
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=lambda b: tuple(zip(*b)))))
    assert len(images) == len(targets) == 4
    for i, target in enumerate(targets):
        mask = ShapesDataset("segmentation", size=4, image_size=64, max_shapes=5)[i][1]
        # Detection labels (1..C) are exactly the segmentation classes present in the mask.
        assert set(target["labels"].tolist()) == set(mask.unique().tolist()) - {0}
