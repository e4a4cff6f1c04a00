"""Data of the segmentation experiments: Shapes (built in), Pascal VOC 2012 (+ SBD) and Cityscapes.

    splits = build_datasets(DataConfig(name="voc12_aug", root="data", crop_size=513), seed=0)
    loader = make_loader(splits.train, 4, train=True, workers=2, seed=0)
    for images, masks in loader: ...            # [B, 3, H, W] float32, [B, H, W] int64

Every data set yields ``(image, mask)``: ``image`` a float32 tensor [3, H, W] in [0, 1], not
normalised (the model normalises inside), ``mask`` an int64 tensor [H, W] of class ids
``0..C-1`` with 255 for pixels to ignore (VOC's object boundaries, Cityscapes' unlabelled
classes, the padding of training crops).

Validation sets return every image at its own size, untouched (:func:`center_crop_view` gives
the release's ``--crop_val`` view of one).  Training sets apply, to image and mask together, a
random scale by a factor drawn uniformly from ``scale_range`` (``[1, 1]`` turns it off), a
random ``crop_size`` x ``crop_size`` crop (after padding the image with 0 and the mask with 255
where it is smaller; ``crop_size = 0`` turns it off), colour jitter of the image alone
(``color_jitter``, the Cityscapes release's) and a random horizontal flip (``flip``).  All of it
draws from torch's RNG, so the seeded workers of :func:`make_loader` replay the same
augmentations.  Wherever an image is resized it is interpolated bilinearly (antialiased when
shrinking) and its mask by ``NEAREST_EXACT``, the pixel-centre aligned nearest neighbour (like
PIL's ``NEAREST``, which the release used; torch's plain ``NEAREST`` shifts labels by up to one
source pixel at non-integer scales).

Splits:

* ``shapes``: the built-in :mod:`afan_harness.shapes` scenes, ``image_size`` pixels a side, 7 classes
  (background and the six shapes): train = ``train_size`` images of the Shapes "train" stream,
  val = ``val_size`` images of its "val" stream.  The defaults of :class:`DataConfig` are the
  VOC release's; Shapes configs set ``crop_size: 0`` (the images already share one size) and
  ``scale_range: [1.0, 1.0]`` or a mild range such as ``[0.75, 1.25]`` with ``crop_size``
  equal to ``image_size``.
* ``voc12``: VOC2012 ``ImageSets/Segmentation/train.txt`` (1,464 images) / ``val.txt``
  (1,449), masks from ``SegmentationClass`` (21 classes with the background).
* ``voc12_aug``: train = ``train_aug.txt`` (10,582 images of VOC2012 and SBD) with masks from
  ``SegmentationClassAug``, val as ``voc12``.  Images of ``val.txt`` that also appear in
  ``train_aug.txt`` are dropped from training, so that no validation image is trained on.
* ``cityscapes``: the fine annotations, train (2,975 images) / val (500), official label ids
  mapped to the 19 train ids, every other id to 255.

Missing or malformed data stops with :class:`afan_harness.loading.DataError` naming the file and the
expected layout.  The list files and the existence of every listed file are checked when the
data sets are built; a file is read (and its mask checked for unknown values and for the size of
its image) when it is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from afan_harness import loading
from afan_harness.loading import DataError, check_images, load_rgb
from afan_harness.shapes import MIN_IMAGE_SIZE, SHAPE_CLASSES, ShapesDataset

__all__ = [
    "DataConfig", "DataError", "Splits", "SegmentationFiles", "ShapesSegmentation", "RandomScale",
    "resize", "train_transform", "center_crop_view", "load_mask", "voc_dataset", "cityscapes_dataset",
    "build_datasets", "collate",
    "make_loader", "voc_palette", "IGNORE_INDEX", "VOC_CLASSES", "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE", "CITYSCAPES_LABEL_TO_TRAIN",
]

NAMES = ("shapes", "voc12", "voc12_aug", "cityscapes")
IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# (name, official label id, colour) of the 19 Cityscapes training classes, in train-id order.
_CITYSCAPES = (
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)), ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)), ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)), ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in _CITYSCAPES)
# Lookup table: official label id -> train id, 255 for every class not trained on.
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
CITYSCAPES_LABEL_TO_TRAIN[[label for _, label, _ in _CITYSCAPES]] = np.arange(len(_CITYSCAPES))
# Train id -> colour; the rows after the 19 classes (255 = ignore included) are black.
CITYSCAPES_PALETTE = np.zeros((256, 3), dtype=np.uint8)
CITYSCAPES_PALETTE[: len(_CITYSCAPES)] = [colour for _, _, colour in _CITYSCAPES]


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, uint8 [256, 3]: the bits of a class id spread over R, G, B.

    Bit ``3j + c`` of the id becomes bit ``7 - j`` of colour channel ``c`` (the VOC devkit's
    ``labelcolormap``), so 1 = (128, 0, 0) aeroplane, 15 = (192, 128, 128) person and 255 =
    (224, 224, 192), the cream of the object boundaries in VOC's own mask files.
    """
    ids = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for j in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * j + channel)) & 1) << (7 - j)).astype(np.uint8)
    return palette


@dataclass
class DataConfig:
    name: Literal["shapes", "voc12", "voc12_aug", "cityscapes"] = "shapes"
    root: str = "data"  # folder holding VOCdevkit/ or cityscapes/
    train_size: int = 1000  # Shapes only
    val_size: int = 200  # Shapes only
    image_size: int = 64  # Shapes only: image side in pixels
    crop_size: int = 513  # side of the training crops (VOC release; Cityscapes 768); 0: no crop
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale; [1, 1]: none
    flip: bool = True  # random horizontal flip of the training images (and masks)
    # Brightness, contrast and saturation jitter of the training images (torchvision's
    # ColorJitter; the Cityscapes release: 0.5); 0: none.
    color_jitter: float = 0.0
    workers: int = 2  # DataLoader worker processes

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"data.name={self.name!r} is not valid; choose one of {', '.join(NAMES)}")
        if not isinstance(self.root, (str, os.PathLike)) or not str(self.root):
            raise ValueError(f"data.root={self.root!r} is not valid; use a folder path")
        for name, least in (("train_size", 1), ("val_size", 1), ("image_size", MIN_IMAGE_SIZE),
                            ("crop_size", 0), ("workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"data.{name}={value!r} is not valid; use an integer >= {least}")
        if self.name != "shapes" and self.crop_size == 0:
            raise ValueError(
                f"data.crop_size=0 is not valid for data.name={self.name}: its images differ in size, "
                "so training batches need crops; use e.g. 513 (VOC) or 768 (Cityscapes)"
            )
        scales = self.scale_range
        if (not isinstance(scales, (list, tuple)) or len(scales) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales)
                or not 0 < scales[0] <= scales[1]):
            raise ValueError(
                f"data.scale_range={scales!r} is not valid; use [low, high] with 0 < low <= high, "
                "e.g. [0.5, 2.0], or [1.0, 1.0] for no scaling"
            )
        self.scale_range = [float(s) for s in scales]
        if self.crop_size == 0 and self.scale_range != [1.0, 1.0]:
            raise ValueError(
                f"data.scale_range={self.scale_range} with data.crop_size=0 is not valid: scaled images "
                "differ in size and cannot share a batch; set data.scale_range=[1.0, 1.0] or a data.crop_size"
            )
        if not isinstance(self.flip, bool):
            raise ValueError(f"data.flip={self.flip!r} is not valid; use true or false")
        if (not isinstance(self.color_jitter, (int, float)) or isinstance(self.color_jitter, bool)
                or not 0 <= self.color_jitter < 1):
            raise ValueError(f"data.color_jitter={self.color_jitter!r} is not valid; use a number in [0, 1), "
                             "e.g. 0.5 (the Cityscapes release) or 0 for none")


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int  # mask values are 0..num_classes-1, plus 255 = ignore
    class_names: tuple[str, ...]  # index = class id
    name: str
    palette: np.ndarray  # uint8 [256, 3]: class id -> colour, for Segmentation.metrics.colorize


# --------------------------------------------------------------------------------------------
# Joint transforms


def resize(inpt, size: list[int]):
    """``F.resize`` of an image (bilinear, antialiased when shrinking) or of a
    ``tv_tensors.Mask`` (``NEAREST_EXACT``: each output pixel takes the label under its
    centre, like PIL's ``NEAREST``)."""
    exact = isinstance(inpt, tv_tensors.Mask)
    return F.resize(inpt, size, interpolation=InterpolationMode.NEAREST_EXACT if exact else InterpolationMode.BILINEAR)


class RandomScale(v2.Transform):
    """Resize image and mask by one factor drawn uniformly from ``[low, high]`` (torch RNG).

    torchvision's ``v2.RandomResize`` draws a side length, not a factor of the image's own
    size, hence this class; :func:`resize` interpolates.
    """

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list) -> dict:
        return {"factor": self.low + (self.high - self.low) * float(torch.rand(()))}

    def transform(self, inpt, params: dict):
        height, width = inpt.shape[-2:]
        size = [max(1, round(height * params["factor"])), max(1, round(width * params["factor"]))]
        return resize(inpt, size)


class ShorterSide(v2.Transform):
    """Resize image and mask so that their shorter side is ``size`` pixels (:func:`resize`)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def transform(self, inpt, params: dict):
        return resize(inpt, [self.size])  # one number: the shorter side, as torchvision reads it


def train_transform(cfg: DataConfig) -> Optional[v2.Compose]:
    """The joint training transform of ``cfg`` (see the module docstring); None if it does nothing."""
    steps = []
    if cfg.scale_range != [1.0, 1.0]:
        steps.append(RandomScale(*cfg.scale_range))
    if cfg.crop_size > 0:
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        steps.append(v2.RandomCrop(cfg.crop_size, pad_if_needed=True, fill=fill))
    if cfg.color_jitter:
        strength = cfg.color_jitter  # masks pass ColorJitter untouched
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


class _Transformed(Dataset):
    """The items of ``dataset`` through a further joint transform."""

    def __init__(self, dataset: Dataset, transform: v2.Compose) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return _apply(self.transform, *self.dataset[index])


def center_crop_view(dataset: Dataset, size: int) -> Dataset:
    """``dataset`` as the release's ``--crop_val`` validates on it: every image and mask
    resized so that the shorter side is ``size`` pixels, then their centre ``size`` x ``size``."""
    return _Transformed(dataset, v2.Compose([ShorterSide(size), v2.CenterCrop(size)]))


def _apply(transform: Optional[v2.Compose], image: torch.Tensor, mask: torch.Tensor):
    """Run ``transform`` on image [3, H, W] and mask [H, W]; plain float32 and int64 tensors out."""
    if transform is not None:
        image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor).float(), mask.as_subclass(torch.Tensor).long()


# --------------------------------------------------------------------------------------------
# Data sets


def load_mask(path: str | Path) -> np.ndarray:
    """The class ids of a palette (``P``) or grey-scale (``L``) PNG as uint8 [H, W].

    A palette image is read as its indices, never converted to RGB: VOC's masks store the
    class id as the index and show it through the VOC colour map.
    """
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read mask {path} ({error}); delete or replace this file") from error
    if image.mode not in ("P", "L"):
        raise DataError(
            f"the mask {path} has the image mode {image.mode}; masks must be palette (P) or grey-scale (L) "
            "PNGs whose pixel values are class ids, not colour renderings"
        )
    return np.array(image, dtype=np.uint8)


class SegmentationFiles(Dataset):
    """Image/mask file pairs read on access (see the module docstring for what items are).

    ``lookup`` (uint8 [256]), if given, translates the mask values, e.g. Cityscapes label ids
    to train ids.  Mask values must then be below ``num_classes`` or 255; any other value (an
    RGB mask saved as grey, a wrong data set) stops with a DataError naming the file.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int,
                 transform: Optional[v2.Compose] = None, lookup: Optional[np.ndarray] = None) -> None:
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.transform = transform
        self.lookup = lookup

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        rgb = load_rgb(str(image_path))
        ids = load_mask(mask_path)
        if ids.shape != (rgb.height, rgb.width):
            raise DataError(
                f"the image {image_path} is {rgb.width}x{rgb.height} pixels but its mask {mask_path} is "
                f"{ids.shape[1]}x{ids.shape[0]}; an image and its mask must have the same size, replace one of them"
            )
        if self.lookup is not None:
            ids = self.lookup[ids]
        bad = np.unique(ids[(ids >= self.num_classes) & (ids != IGNORE_INDEX)])
        if bad.size:
            raise DataError(
                f"the mask {mask_path} holds the values {bad[:10].tolist()}, which are neither class ids "
                f"(0..{self.num_classes - 1}) nor {IGNORE_INDEX} (ignore); replace the file"
            )
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return _apply(self.transform, image.contiguous(), torch.from_numpy(ids))


class ShapesSegmentation(Dataset):
    """A Shapes segmentation set (masks 0 = background, 1..6 the shapes) with a joint transform."""

    def __init__(self, shapes: ShapesDataset, transform: Optional[v2.Compose] = None) -> None:
        self.shapes = shapes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int):
        image, mask = self.shapes[index]
        return _apply(self.transform, image, mask)


# Pascal VOC 2012

_VOC_LAYOUT = (
    "<root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg, <root>/VOCdevkit/VOC2012/SegmentationClass/<id>.png "
    "(palette PNGs of class ids, 255 = ignore) and <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/"
    "{train,val}.txt; voc12_aug also needs SegmentationClassAug/<id>.png (grey-scale PNGs of class ids) "
    "and ImageSets/Segmentation/train_aug.txt"
)
_VOC_HINT = (
    "VOC cannot be downloaded automatically here: get VOCtrainval_11-May-2012.tar from the PASCAL VOC "
    "website and extract it into data.root (for voc12_aug add SegmentationClassAug and train_aug.txt, "
    "made from the SBD data set as DeepLabV3Plus-Pytorch describes), or use data.name=shapes for the "
    "built-in data"
)


def _voc_error(message: str) -> DataError:
    return DataError(f"{message}. Expected layout: {_VOC_LAYOUT}. {_VOC_HINT}")


def _voc_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise _voc_error(f"Pascal VOC not found: {path} does not exist")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise _voc_error(f"the list {path} names no image; it needs one image id per line")
    return ids


def voc_dataset(root: str | Path, image_set: str, mask_folder: str = "SegmentationClass",
                transform: Optional[v2.Compose] = None, exclude: Sequence[str] = ()) -> SegmentationFiles:
    """VOC2012 images of ``ImageSets/Segmentation/<image_set>.txt`` with masks from ``mask_folder``.

    Ids in ``exclude`` are left out.  Every listed image and mask must exist.
    """
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in (base, base / "JPEGImages", base / mask_folder):
        if not folder.is_dir():
            raise _voc_error(f"Pascal VOC not found: the folder {folder} does not exist")
    list_file = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    excluded = set(exclude)
    ids = [i for i in _voc_ids(list_file) if i not in excluded]
    if not ids:
        raise _voc_error(f"the list {list_file} names no image outside the validation set")
    pairs = [(base / "JPEGImages" / f"{i}.jpg", base / mask_folder / f"{i}.png") for i in ids]
    for pair in pairs:
        for path in pair:
            if not path.is_file():
                raise _voc_error(f"{path} does not exist, but {list_file} lists the id {path.stem}")
    return SegmentationFiles(pairs, len(VOC_CLASSES), transform)


# Cityscapes

_CITYSCAPES_LAYOUT = (
    "<root>/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
    "<root>/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png"
)
_CITYSCAPES_HINT = (
    "Cityscapes cannot be downloaded automatically here: register at cityscapes-dataset.com, get "
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip and unzip both into <root>/cityscapes, "
    "or use data.name=shapes for the built-in data"
)


def _cityscapes_error(message: str) -> DataError:
    return DataError(f"{message}. Expected layout: {_CITYSCAPES_LAYOUT}. {_CITYSCAPES_HINT}")


def cityscapes_dataset(root: str | Path, split: str, transform: Optional[v2.Compose] = None) -> SegmentationFiles:
    """The finely annotated Cityscapes images of ``split`` ("train" or "val"), 19 train ids."""
    base = Path(root) / "cityscapes"
    images_dir = base / "leftImg8bit" / split
    masks_dir = base / "gtFine" / split
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise _cityscapes_error(f"Cityscapes not found: the folder {folder} does not exist")
    suffix = "_leftImg8bit.png"
    images = sorted(images_dir.glob(f"*/*{suffix}"))
    if not images:
        raise _cityscapes_error(f"the folder {images_dir} holds no <city>/*{suffix} image")
    pairs = []
    for image in images:
        mask = masks_dir / image.parent.name / (image.name[: -len(suffix)] + "_gtFine_labelIds.png")
        if not mask.is_file():
            raise _cityscapes_error(f"the mask {mask} of the image {image} does not exist")
        pairs.append((image, mask))
    return SegmentationFiles(pairs, len(CITYSCAPES_CLASSES), transform, lookup=CITYSCAPES_LABEL_TO_TRAIN)


# --------------------------------------------------------------------------------------------
# Building the splits


def build_datasets(cfg: DataConfig, seed: int = 0) -> Splits:
    """The train/val data sets described by ``cfg`` (see the module docstring for the splits).

    ``seed`` selects the Shapes scenes; the real data sets do not depend on it.
    """
    transform = train_transform(cfg)
    root = Path(cfg.root)
    if cfg.name == "shapes":
        def shapes(split: str, size: int) -> ShapesDataset:
            return ShapesDataset("segmentation", split, size=size, image_size=cfg.image_size, seed=seed, cache=True)

        train = ShapesSegmentation(shapes("train", cfg.train_size), transform)
        val = ShapesSegmentation(shapes("val", cfg.val_size))
        return Splits(train, val, 1 + len(SHAPE_CLASSES), ("background", *SHAPE_CLASSES), cfg.name, voc_palette())
    if cfg.name == "cityscapes":
        train = cityscapes_dataset(root, "train", transform)
        val = cityscapes_dataset(root, "val")
        check_images([path for data in (train, val) for pair in data.pairs for path in pair], "Cityscapes images and masks")
        return Splits(train, val, len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES, cfg.name, CITYSCAPES_PALETTE.copy())
    val = voc_dataset(root, "val")
    if cfg.name == "voc12":
        train = voc_dataset(root, "train", transform=transform)
    else:
        val_ids = [image.stem for image, _ in val.pairs]
        train = voc_dataset(root, "train_aug", "SegmentationClassAug", transform, exclude=val_ids)
    check_images([path for data in (train, val) for pair in data.pairs for path in pair], "VOC images and masks")
    return Splits(train, val, len(VOC_CLASSES), VOC_CLASSES, cfg.name, voc_palette())


# --------------------------------------------------------------------------------------------
# Loaders


def collate(batch):
    """Stack ``[(image, mask), ...]`` into [B, 3, H, W] and [B, H, W] when all sizes agree.

    Training crops always agree; the full-size validation images of VOC differ, and their
    batches come back as two lists (images, masks) instead, to be evaluated image by image.
    """
    images, masks = zip(*batch)
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images), torch.stack(masks)
    return list(images), list(masks)


def make_loader(dataset: Dataset, batch_size: int, **kwargs) -> DataLoader:
    """``afan_harness.loading.make_loader`` (seeded order and augmentations) with :func:`collate`."""
    return loading.make_loader(dataset, batch_size, collate_fn=collate, **kwargs)
