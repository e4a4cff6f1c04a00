import numpy as np
import pytest
import torch
from PIL import Image

from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from afan_harness.shapes import SHAPE_CLASSES, ShapesDataset
from Segmentation.config import EvalConfig
from Segmentation.data import (
    CITYSCAPES_CLASSES, VOC_CLASSES, DataConfig, DataError, RandomScale, SegmentationFiles, build_datasets,
    center_crop_view, collate, make_loader, train_transform, voc_palette,
)
from Segmentation.evaluation import evaluate

# --------------------------------------------------------------------------------------------
# Fixtures in the real on-disk formats.  The grey level of an image pixel encodes the class of
# its mask pixel (LEVELS[c]), so that alignment after the transforms can be read off the image.

LEVELS = 30 + 10 * np.arange(21)  # 30..230: never 0, the padding value


def scene(height, width, seed, classes=21):
    """A mask of 8x8 class blocks with a 1-pixel 255 border, and the grey image encoding it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, size=(-(-height // 8), -(-width // 8)))
    mask = np.kron(blocks, np.ones((8, 8), np.int64))[:height, :width]
    image = np.repeat(LEVELS[mask][..., None], 3, axis=2).astype(np.uint8)
    mask[[0, -1], :] = 255
    mask[:, [0, -1]] = 255
    return image, mask.astype(np.uint8)


def save_palette_png(mask, path):
    image = Image.fromarray(mask)
    image.putpalette(voc_palette().ravel().tolist())  # "L" -> "P": the values stay the indices
    image.save(path)


VOC_TRAIN = ["2007_000001", "2007_000002", "2007_000003"]
VOC_VAL = ["2007_000010", "2007_000011"]
VOC_SIZES = {"2007_000011": (32, 48)}  # (height, width); the others are 40x48


def make_voc(root, aug=True):
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    aug_ids = VOC_TRAIN + ["2008_000100", VOC_VAL[0]]  # an SBD-only image, and a val image to drop
    for number, stem in enumerate(dict.fromkeys(VOC_TRAIN + VOC_VAL + aug_ids)):
        image, mask = scene(*VOC_SIZES.get(stem, (40, 48)), seed=number)
        Image.fromarray(image).save(base / "JPEGImages" / f"{stem}.jpg", quality=100)
        save_palette_png(mask, base / "SegmentationClass" / f"{stem}.png")
        if aug:
            Image.fromarray(mask).save(base / "SegmentationClassAug" / f"{stem}.png")  # grey "L"
    lists = {"train": VOC_TRAIN, "val": VOC_VAL, "train_aug": aug_ids}
    for name, stems in lists.items():
        (base / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(stems) + "\n")
    return base


# Official label ids: 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 24 person -> 11; 0, 1, 4,
# 5 (unlabelled, ego vehicle, static, dynamic), 29 (caravan) and 34 (licence plate) -> 255.
CITY_IDS = np.array([[7, 26, 33, 0], [1, 4, 24, 5], [29, 34, 7, 7]], np.uint8)
CITY_TRAIN_IDS = np.array([[0, 13, 18, 255], [255, 255, 11, 255], [255, 255, 0, 0]])


def make_cityscapes(root):
    base = root / "cityscapes"
    files = {"train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"),
                       ("bochum", "bochum_000000_000313")],
             "val": [("frankfurt", "frankfurt_000000_000294")]}
    for split, names in files.items():
        for city, name in names:
            for folder in ("leftImg8bit", "gtFine"):
                (base / folder / split / city).mkdir(parents=True, exist_ok=True)
            ids = np.kron(CITY_IDS, np.ones((5, 6), np.uint8))  # 15x24
            Image.fromarray(np.full((15, 24, 3), 100, np.uint8)).save(
                base / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(ids).save(base / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
            # The other gtFine files must not be mistaken for masks.
            Image.fromarray(np.zeros((15, 24), np.uint8)).save(
                base / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png")
    return base


def decode(image):
    """The class encoded by the grey level of image [3, H, W] (see LEVELS)."""
    return ((image[0] * 255 - 30) / 10).round().long()


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [
    ("train_size", 0), ("val_size", -1), ("image_size", 8), ("crop_size", -1), ("workers", -1),
    ("flip", "yes"), ("scale_range", [2.0, 1.0]), ("scale_range", [0.0, 1.0]), ("scale_range", [1.0]),
    ("scale_range", "big"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"data.{field}=.* is not valid; use"):
        DataConfig(**{field: value})


def test_config_rejects_unknown_name_and_uncropped_real_data():
    with pytest.raises(ValueError, match="data.name.*voc12_aug"):
        DataConfig(name="ade20k")
    with pytest.raises(ValueError, match="data.crop_size=0 is not valid for data.name=cityscapes.*768"):
        DataConfig(name="cityscapes", crop_size=0)
    assert DataConfig(name="shapes", crop_size=0, scale_range=[1, 1]).scale_range == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"data.scale_range=\[0.5, 2.0\] with data.crop_size=0.*\[1.0, 1.0\]"):
        DataConfig(name="shapes", crop_size=0)


# --------------------------------------------------------------------------------------------
# Pascal VOC 2012


def test_voc12_items(tmp_path):
    make_voc(tmp_path)
    splits = build_datasets(DataConfig(name="voc12", root=str(tmp_path), crop_size=32), seed=0)
    assert (len(splits.train), len(splits.val)) == (3, 2)
    assert splits.num_classes == 21 and splits.class_names == VOC_CLASSES and splits.name == "voc12"
    assert splits.palette.shape == (256, 3) and splits.palette.dtype == np.uint8
    assert Image.open(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000010.png").mode == "P"

    for index, (height, width) in enumerate([(40, 48), (32, 48)]):  # validation: full size, untouched
        image, mask = splits.val[index]
        assert image.dtype == torch.float32 and image.shape == (3, height, width)
        assert 0 <= image.min() <= image.max() <= 1
        assert mask.dtype == torch.int64 and mask.shape == (height, width)
        _, expected = scene(height, width, seed=3 + index)
        assert torch.equal(mask, torch.from_numpy(expected).long())  # ids and the 255 border kept
        inside = mask != 255
        assert torch.equal(decode(image)[inside], mask[inside])  # JPEG quality 100: levels survive

    image, mask = splits.train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}


def test_voc12_aug_uses_sbd_masks_and_drops_val_images(tmp_path):
    base = make_voc(tmp_path)
    splits = build_datasets(DataConfig(name="voc12_aug", root=str(tmp_path)), seed=0)
    names = [image.stem for image, _ in splits.train.pairs]
    assert names == VOC_TRAIN + ["2008_000100"]  # 2007_000010 is in val.txt
    assert all(mask.parent.name == "SegmentationClassAug" for _, mask in splits.train.pairs)
    assert [mask.parent.name for _, mask in splits.val.pairs] == ["SegmentationClass"] * 2
    assert Image.open(base / "SegmentationClassAug" / "2008_000100.png").mode == "L"


def test_training_transform_keeps_image_and_mask_aligned(tmp_path):
    make_voc(tmp_path)
    cfg = DataConfig(name="voc12", root=str(tmp_path), crop_size=36, scale_range=[0.5, 2.0])
    train = build_datasets(cfg).train
    torch.manual_seed(0)
    checked = 0
    for _ in range(6):
        for index in range(len(train)):
            image, mask = train[index]
            assert image.shape == (3, 36, 36) and mask.shape == (36, 36)
            pad = (image == 0).all(0)
            assert (mask[pad] == 255).all()  # the padding: image 0, mask 255
            # Away from class boundaries (every pixel of the 5x5 neighbourhood in one class),
            # the image's grey level still names the mask's class.
            window = torch.nn.functional.pad(mask[None, None].float(), (2, 2, 2, 2), value=255)
            patches = window.unfold(2, 5, 1).unfold(3, 5, 1)[0, 0]
            interior = (patches == mask[..., None, None]).all(-1).all(-1) & (mask != 255)
            assert torch.equal(decode(image)[interior], mask[interior])
            checked += int(interior.sum())
    assert checked > 1000


def test_training_transform_without_scale_is_a_flipped_crop(tmp_path):
    make_voc(tmp_path)
    cfg = DataConfig(name="voc12", root=str(tmp_path), crop_size=44, scale_range=[1.0, 1.0])
    train = build_datasets(cfg).train
    _, original = scene(40, 48, seed=0)
    torch.manual_seed(1)
    flips = set()
    for _ in range(8):
        image, mask = train[0]
        rows = torch.nonzero((image != 0).any(0).any(1)).squeeze(1)  # 40 real rows, 4 padded
        assert len(rows) == 40 and (mask[~(image != 0).any(0)] == 255).all()
        real = mask[rows]  # 40 x 44: a window of 44 of the 48 columns, maybe mirrored
        windows = [torch.from_numpy(original).long()[:, left:left + 44] for left in range(5)]
        flipped = [w.flip(1) for w in windows]
        assert any(torch.equal(real, w) for w in windows + flipped)
        flips.add(any(torch.equal(real, w) for w in flipped))
    assert flips == {True, False}


def test_training_is_reproducible_with_the_torch_seed(tmp_path):
    make_voc(tmp_path)
    train = build_datasets(DataConfig(name="voc12", root=str(tmp_path), crop_size=32)).train
    torch.manual_seed(5)
    first = [train[i] for i in range(3)]
    torch.manual_seed(5)
    again = [train[i] for i in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    torch.manual_seed(6)
    other = [train[i] for i in range(3)]
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))

    def batch():
        return next(iter(make_loader(train, 2, train=True, workers=0, seed=3)))

    torch.manual_seed(0)  # with workers=0 the transforms draw from the global RNG
    images, masks = batch()
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    torch.manual_seed(0)
    assert torch.equal(batch()[1], masks)
    # A worker process draws from a torch RNG seeded by the loader's seed alone.
    masks = [next(iter(make_loader(train, 2, train=True, workers=1, seed=3)))[1] for _ in range(2)]
    assert torch.equal(masks[0], masks[1])


def test_collate_stacks_equal_sizes_and_lists_the_rest(tmp_path):
    make_voc(tmp_path)
    val = build_datasets(DataConfig(name="voc12", root=str(tmp_path))).val
    images, masks = next(iter(make_loader(val, 2, train=False, workers=0, seed=0)))
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 40, 48), (3, 32, 48)]
    assert [tuple(m.shape) for m in masks] == [(40, 48), (32, 48)]
    images, masks = collate([val[0], val[0]])
    assert images.shape == (2, 3, 40, 48) and masks.shape == (2, 40, 48)


# --------------------------------------------------------------------------------------------
# Cityscapes


def test_cityscapes_label_ids_mapped_to_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    splits = build_datasets(DataConfig(name="cityscapes", root=str(tmp_path), crop_size=16, flip=False,
                                       scale_range=[1.0, 1.0]))
    assert (len(splits.train), len(splits.val)) == (3, 1)
    assert splits.num_classes == 19 and len(splits.class_names) == 19 and splits.class_names == CITYSCAPES_CLASSES
    assert splits.class_names[13] == "car" and tuple(splits.palette[13]) == (0, 0, 142)
    assert [image.parent.name for image, _ in splits.train.pairs] == ["aachen", "aachen", "bochum"]
    image, mask = splits.val[0]
    assert image.shape == (3, 15, 24) and mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(np.kron(CITY_TRAIN_IDS, np.ones((5, 6), np.int64))))
    image, mask = splits.train[0]
    assert image.shape == (3, 16, 16) and set(mask.unique().tolist()) <= {0, 11, 13, 18, 255}


def test_cityscapes_missing_data_named(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(name="cityscapes", root=str(tmp_path)))
    message = str(error.value)
    assert "cityscapes/leftImg8bit/train" in message and "_gtFine_labelIds.png" in message
    assert "data.name=shapes" in message

    base = make_cityscapes(tmp_path)
    missing = base / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(DataError, match=f"the mask {missing} of the image .*frankfurt_000000_000294_leftImg8bit.png does not exist"):
        build_datasets(DataConfig(name="cityscapes", root=str(tmp_path)))
    for path in (base / "leftImg8bit" / "val" / "frankfurt").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="leftImg8bit/val holds no <city>/\\*_leftImg8bit.png image"):
        build_datasets(DataConfig(name="cityscapes", root=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# VOC errors


def test_voc_missing_shows_layout_and_shapes(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(name="voc12", root=str(tmp_path)))
    message = str(error.value)
    assert f"the folder {tmp_path}/VOCdevkit/VOC2012 does not exist" in message
    assert "SegmentationClass/<id>.png" in message and "ImageSets/Segmentation/{train,val}.txt" in message
    assert "data.name=shapes" in message and "cannot be downloaded automatically" in message


def test_voc_aug_folder_missing(tmp_path):
    make_voc(tmp_path, aug=False)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClassAug").rmdir()
    with pytest.raises(DataError, match="SegmentationClassAug does not exist.*train_aug.txt"):
        build_datasets(DataConfig(name="voc12_aug", root=str(tmp_path)))
    assert len(build_datasets(DataConfig(name="voc12", root=str(tmp_path))).train) == 3  # voc12 needs none


@pytest.mark.parametrize("remove, message", [
    ("ImageSets/Segmentation/val.txt", "val.txt does not exist"),
    ("JPEGImages/2007_000002.jpg", "2007_000002.jpg does not exist, but .*train.txt lists the id 2007_000002"),
    ("SegmentationClass/2007_000011.png", "SegmentationClass/2007_000011.png does not exist, but .*val.txt lists"),
])
def test_voc_missing_file_named(tmp_path, remove, message):
    base = make_voc(tmp_path)
    (base / remove).unlink()
    with pytest.raises(DataError, match=message) as error:
        build_datasets(DataConfig(name="voc12", root=str(tmp_path)))
    assert "Expected layout" in str(error.value)


def test_voc_empty_lists(tmp_path):
    base = make_voc(tmp_path)
    (base / "ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(DataError, match="train.txt names no image"):
        build_datasets(DataConfig(name="voc12", root=str(tmp_path)))
    (base / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(VOC_VAL))
    with pytest.raises(DataError, match="train_aug.txt names no image outside the validation set"):
        build_datasets(DataConfig(name="voc12_aug", root=str(tmp_path)))


def test_bad_masks_named_when_read(tmp_path):
    base = make_voc(tmp_path)
    val = build_datasets(DataConfig(name="voc12", root=str(tmp_path))).val
    image_path, mask_path = val.pairs[0]
    save_palette_png(np.zeros((40, 40), np.uint8), mask_path)
    with pytest.raises(DataError, match=f"the image {image_path} is 48x40 pixels but its mask {mask_path} is 40x40"):
        val[0]
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(mask_path)
    with pytest.raises(DataError, match=f"the mask {mask_path} has the image mode RGB; masks must be palette"):
        val[0]
    bad = np.zeros((40, 48), np.uint8)
    bad[3, 4], bad[5, 6] = 30, 21
    save_palette_png(bad, mask_path)
    with pytest.raises(DataError, match=r"holds the values \[21, 30\], which are neither class ids \(0..20\) nor 255"):
        val[0]
    mask_path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot read mask {mask_path}"):
        val[0]
    (base / "JPEGImages" / "2007_000011.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DataError, match="2007_000011.jpg"):
        val[1]


def test_files_dataset_with_lookup(tmp_path):
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.array([[1, 2, 3], [3, 2, 1]], np.uint8)).save(tmp_path / "mask.png")
    lookup = np.full(256, 255, np.uint8)
    lookup[[1, 2]] = [0, 1]
    _, mask = SegmentationFiles([(tmp_path / "image.png", tmp_path / "mask.png")], 2, lookup=lookup)[0]
    assert mask.tolist() == [[0, 1, 255], [255, 1, 0]]


# --------------------------------------------------------------------------------------------
# Shapes


def test_shapes_splits(tmp_path):
    cfg = DataConfig(name="shapes", root=str(tmp_path), train_size=6, val_size=4, image_size=32,
                     crop_size=24, scale_range=[0.75, 1.25])
    splits = build_datasets(cfg, seed=2)
    assert (len(splits.train), len(splits.val)) == (6, 4)
    assert splits.num_classes == 7 and splits.class_names == ("background", *SHAPE_CLASSES)
    assert np.array_equal(splits.palette, voc_palette())
    image, mask = splits.val[1]
    expected_image, expected_mask = ShapesDataset("segmentation", "val", size=4, image_size=32, seed=2)[1]
    assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= set(range(7))
    torch.manual_seed(0)
    image, mask = splits.train[0]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.int64
    images, masks = next(iter(make_loader(splits.train, 3, train=True, workers=0, seed=0)))
    assert images.shape == (3, 3, 24, 24) and masks.shape == (3, 24, 24)

    plain = build_datasets(DataConfig(name="shapes", train_size=2, val_size=1, image_size=32, crop_size=0,
                                      scale_range=[1.0, 1.0], flip=False), seed=2)
    assert plain.train.transform is None
    assert plain.train[0][0].shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------
# Resizing masks, colour jitter, the release's crop_val


def exact_nearest(source: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel-centre aligned nearest neighbour, from its definition: output pixel (i, j) takes
    the source pixel under its centre, ((i + 0.5) * H / height, (j + 0.5) * W / width)."""
    rows = np.floor((np.arange(height) + 0.5) * source.shape[0] / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * source.shape[1] / width).astype(int)
    return source[rows][:, cols]


@pytest.mark.parametrize("factor", [1.5, 0.75])
def test_random_scale_keeps_mask_labels_under_their_pixel_centres(factor):
    """At a non-integer scale, torch's plain NEAREST takes the source pixel at the output
    pixel's corner: labels shift by up to one source pixel (e.g. 1.5x: output column 1 reads
    column 0). The masks are resized by NEAREST_EXACT, which reads under the centre."""
    ids = np.add.outer(np.arange(8) * 10, np.arange(12)).astype(np.int64)  # every pixel its own label
    mask = tv_tensors.Mask(torch.from_numpy(ids))
    image = tv_tensors.Image(torch.rand(3, 8, 12))
    scaled_image, scaled = RandomScale(factor, factor)(image, mask)
    height, width = round(8 * factor), round(12 * factor)
    assert scaled.shape == (height, width) and scaled_image.shape == (3, height, width)
    assert np.array_equal(scaled.numpy(), exact_nearest(ids, height, width))
    corner = F.resize(mask, [height, width], interpolation=InterpolationMode.NEAREST)
    assert not torch.equal(corner, scaled)  # what the masks were resized by before


def test_colour_jitter_changes_the_image_only():
    cfg = DataConfig(name="shapes", crop_size=0, scale_range=[1.0, 1.0], flip=False, color_jitter=0.5)
    image, mask = torch.rand(3, 16, 16) * 0.5 + 0.25, torch.randint(0, 7, (16, 16))
    torch.manual_seed(0)
    jittered, same = train_transform(cfg)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert torch.equal(same, mask) and not torch.allclose(jittered, image)
    assert 0 <= jittered.min() <= jittered.max() <= 1
    assert train_transform(DataConfig(name="shapes", crop_size=0, scale_range=[1.0, 1.0], flip=False)) is None
    with pytest.raises(ValueError, match=r"data.color_jitter=1.5 is not valid; use a number in \[0, 1\)"):
        DataConfig(color_jitter=1.5)


def test_center_crop_view_is_the_releases_crop_val(tmp_path):
    """Shorter side resized to the crop size (40x48 -> 24x28, 32x48 -> 24x36: the longer side
    rounded down, as torchvision does), then the centre crop; masks by pixel centres."""
    make_voc(tmp_path)
    val = build_datasets(DataConfig(name="voc12", root=str(tmp_path))).val
    cropped = center_crop_view(val, 24)
    assert len(cropped) == len(val)
    for index, (height, width, left) in enumerate([(24, 28, 2), (24, 36, 6)]):
        image, mask = cropped[index]
        assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.int64
        original = val[index][1].numpy()
        expected = exact_nearest(original, height, width)[:, left:left + 24]
        assert np.array_equal(mask.numpy(), expected)
        # The image went through the same resize and crop: away from class boundaries (the
        # 3x3 neighbourhood in one class) its grey level still names the mask's class.
        window = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), value=255)
        patches = window.unfold(2, 3, 1).unfold(3, 3, 1)[0, 0]
        interior = (patches == mask[..., None, None]).all(-1).all(-1) & (mask != 255)
        assert interior.sum() > 100, interior.sum()
        assert torch.equal(decode(image)[interior], mask[interior])


def test_crop_evaluation_scores_the_centre_crops_in_batches(tmp_path):
    make_voc(tmp_path)
    val = build_datasets(DataConfig(name="voc12", root=str(tmp_path))).val
    seen = []

    class Background(torch.nn.Module):
        """Predicts the background everywhere and records the batches it gets."""

        def forward(self, images):
            seen.append(tuple(images.shape))
            logits = torch.zeros(len(images), 21, *images.shape[-2:])
            logits[:, 0] = 1
            return logits

    scores = evaluate(Background(), val, "cpu", 21, EvalConfig(mode="crop", crop=24, batch_size=2))
    assert seen == [(2, 3, 24, 24)]  # equal sizes: one stacked batch
    masks = torch.stack([mask for _, mask in center_crop_view(val, 24)])
    valid = masks != 255
    assert scores["pixel_acc"] == pytest.approx(((masks == 0) & valid).sum().item() / valid.sum().item())
    whole = evaluate(Background(), val, "cpu", 21, EvalConfig(mode="whole"))
    assert seen[1:] == [(1, 3, 40, 48), (1, 3, 32, 48)] and whole["pixel_acc"] != scores["pixel_acc"]
    with pytest.raises(ValueError, match="eval.mode='centre' is not valid; use whole, crop or sliding"):
        EvalConfig(mode="centre")
