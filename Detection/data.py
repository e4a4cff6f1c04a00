"""Data of the detection experiments: Shapes (built in), Pascal VOC 2007 / 2007+2012 and COCO 2017.

    splits = build_datasets(DataConfig(name="voc07", root="data"), seed=0)
    loader = make_loader(splits.train, 8, train=True, workers=2, seed=0)
    for images, targets in loader: ...          # lists, as torchvision's detectors take them

Every data set yields ``(image, target)``: ``image`` a float32 tensor [3, H, W] in [0, 1] at the
file's own resolution (the detector resizes and normalises inside), ``target`` a dict with

* ``boxes``: float32 [K, 4], ``x1, y1, x2, y2`` in 0-based continuous pixel coordinates
  (pixel ``j`` covers ``[j, j + 1)``),
* ``labels``: int64 [K] in ``1..C`` (0 is the background, as torchvision's detectors expect),
* ``image_id``: int, the key of the image in ``Splits.eval_info``,
* ``iscrowd`` and ``difficult``: bool [K].

Training sets hold only boxes to learn from: crowd (COCO) and difficult (VOC) objects are
removed from the targets, and images left without any box are skipped (as torchvision's
references do).  Evaluation sets keep every image and every object, flagged.  Boxes of zero
width or height are dropped everywhere.  ``DataConfig.flip`` adds a random horizontal flip
(p = 0.5, boxes flipped with the image) to the training set only.

Splits:

* ``shapes``: the built-in :mod:`afan_harness.shapes` detection scenes, written once per setting to
  ``<root>/shapes_detection/{train,val}_<size>x<side>px_seed<seed>`` in COCO format and then
  read back by the same loader as COCO itself: train = ``train_size`` images of the Shapes "train" stream, test =
  ``val_size`` images of its "val" stream, ``image_size`` pixels a side (Shapes only).
* ``voc07``: train = VOC2007 trainval, test = VOC2007 test.
* ``voc0712``: train = VOC2007 trainval + VOC2012 trainval, test = VOC2007 test.
* ``coco``: train = train2017, test = val2017.

Category ids of COCO-format files need not be contiguous (COCO's run 1..90 with gaps): labels
are ``1..C`` in the order of increasing category id, and ``eval_info.label_to_category`` maps
them back for :func:`Detection.evaluation.coco_eval`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from afan_harness.shapes import SHAPE_CLASSES, ShapesDataset
# One error class for the data of every task; the image reader and the worker seeding are the
# classification ones (generic: open as RGB naming a bad file; seed numpy/random per worker).
from afan_harness import loading
from afan_harness.loading import DataError, check_images, load_rgb

__all__ = [
    "DataConfig", "DataError", "Splits", "EvalInfo", "CocoDetection", "VOCDetection",
    "RandomHorizontalFlip", "hflip", "write_shapes_coco", "build_datasets", "collate", "make_loader",
    "VOC_CLASSES", "BACKGROUND",
]

NAMES = ("shapes", "voc07", "voc0712", "coco")
BACKGROUND = "__background__"
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@dataclass
class DataConfig:
    name: Literal["shapes", "voc07", "voc0712", "coco"] = "shapes"
    root: str = "data"  # folder holding VOCdevkit/, or COCO's annotations/ train2017/ val2017/
    train_size: int = 500  # Shapes only
    val_size: int = 100  # Shapes only: the evaluation set
    image_size: int = 128  # Shapes only: image side in pixels
    workers: int = 2  # DataLoader worker processes
    flip: bool = True  # random horizontal flip of the training images (and boxes)

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"data.name={self.name!r} is not valid; choose one of {', '.join(NAMES)}")
        if not isinstance(self.root, (str, os.PathLike)) or not str(self.root):
            raise ValueError(f"data.root={self.root!r} is not valid; use a folder path")
        for name, least in (("train_size", 1), ("val_size", 1), ("image_size", 16), ("workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"data.{name}={value!r} is not valid; use an integer >= {least}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"data.flip={self.flip!r} is not valid; use true or false")


@dataclass
class EvalInfo:
    """What evaluation needs besides the detections; keys are the targets' ``image_id``.

    ``ground_truth``: image_id -> {"boxes" float32 [K, 4], "labels" int64 [K], "difficult"
    bool [K]} for :func:`Detection.evaluation.voc_eval` (for COCO-format data, crowd boxes are
    flagged difficult, i.e. ignored).  ``coco_gt`` (a pycocotools COCO), ``annotation_file`` and
    ``label_to_category`` are set for COCO-format data (Shapes, COCO) and serve ``coco_eval``.
    ``use_07_metric``: the AP flavour the data set's papers report (11-point for VOC).
    """

    kind: Literal["voc", "coco"]
    ground_truth: dict
    use_07_metric: bool
    coco_gt: object = None
    annotation_file: Optional[Path] = None
    label_to_category: dict = field(default_factory=dict)
    image_names: dict = field(default_factory=dict)  # image_id -> file stem or COCO file name


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int  # including the background
    class_names: tuple[str, ...]  # index = label; class_names[0] == "__background__"
    name: str
    eval_info: EvalInfo


# --------------------------------------------------------------------------------------------
# Records and the shared Dataset


@dataclass
class _Record:
    image_id: int
    path: Path
    boxes: np.ndarray  # float32 [K, 4] xyxy, 0-based
    labels: np.ndarray  # int64 [K] in 1..C
    iscrowd: np.ndarray  # bool [K]
    difficult: np.ndarray  # bool [K]
    name: str = ""


def _make_record(image_id, path, boxes, labels, iscrowd, difficult, name="") -> _Record:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    iscrowd = np.asarray(iscrowd, dtype=bool).reshape(-1)
    difficult = np.asarray(difficult, dtype=bool).reshape(-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # degenerate boxes dropped
    return _Record(int(image_id), Path(path), boxes[keep], labels[keep], iscrowd[keep], difficult[keep], name)


class _DetectionDataset(Dataset):
    """Images read on access from a list of records; ``train`` filters targets and images."""

    def __init__(self, records: Sequence[_Record], train: bool, transform: Optional[Callable] = None) -> None:
        self.train = train
        self.transform = transform
        if train:
            records = [self._trainable(r) for r in records]
            records = [r for r in records if len(r.boxes)]
        self.records = list(records)

    @staticmethod
    def _trainable(record: _Record) -> _Record:
        keep = ~(record.iscrowd | record.difficult)
        return _Record(
            record.image_id, record.path, record.boxes[keep], record.labels[keep],
            record.iscrowd[keep], record.difficult[keep], record.name,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        array = np.array(load_rgb(str(record.path)), dtype=np.uint8)  # a writable copy
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0).contiguous()
        target = {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
            "iscrowd": torch.from_numpy(record.iscrowd.copy()),
            "difficult": torch.from_numpy(record.difficult.copy()),
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def ground_truth(self) -> dict:
        """image_id -> boxes/labels/difficult (crowd counts as difficult: ignored by voc_eval)."""
        return {
            r.image_id: {"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult | r.iscrowd}
            for r in self.records
        }


# --------------------------------------------------------------------------------------------
# Transforms


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image [C, H, W] and its boxes: x1' = W - x2, x2' = W - x1."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    return image.flip(-1), target


class RandomHorizontalFlip:
    """Flip image and boxes with probability ``p`` (torch RNG: seeded per DataLoader worker)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        if torch.rand(()) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# --------------------------------------------------------------------------------------------
# COCO-format files (COCO 2017 and the written Shapes)


def _read_json(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"the annotation file {path} is not valid JSON ({error}); replace the file") from error
    except OSError as error:
        raise DataError(f"cannot read the annotation file {path} ({error})") from error
    if not isinstance(data, dict):
        raise DataError(f"the annotation file {path} holds a {type(data).__name__}, not a COCO dict; replace the file")
    return data


def _checked_coco(data: dict, path: Path) -> dict:
    """Check the COCO structure we rely on; fill the fields COCOeval needs (area, iscrowd)."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"the annotation file {path} has no {key!r} list; a COCO instances file needs "
                "'images', 'annotations' and 'categories'"
            )
    try:
        image_ids = {int(image["id"]) for image in data["images"]}
        category_ids = {int(category["id"]) for category in data["categories"]}
        for ann in data["annotations"]:
            box = ann["bbox"]
            if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
                raise ValueError(f"annotation {ann.get('id')} has bbox {box!r}, not [x, y, w, h]")
            if int(ann["image_id"]) not in image_ids:
                raise ValueError(f"annotation {ann.get('id')} names the unknown image_id {ann['image_id']}")
            if int(ann["category_id"]) not in category_ids:
                raise ValueError(f"annotation {ann.get('id')} names the unknown category_id {ann['category_id']}")
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(box[2]) * float(box[3]))
    except (KeyError, TypeError, ValueError) as error:
        what = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise DataError(f"the annotation file {path} is not a valid COCO instances file: {what}") from error
    return data


def _coco_api(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class CocoDetection(_DetectionDataset):
    """A COCO instances file plus its image folder (see the module docstring for the targets).

    ``coco`` is the pycocotools COCO object of the file (ground truth for ``coco_eval``),
    ``label_to_category`` / ``category_to_label`` the contiguous-label mapping, ``class_names``
    the category names with the background first.
    """

    def __init__(self, images: str | Path, annotation_file: str | Path, train: bool, transform: Optional[Callable] = None):
        self.images = Path(images)
        self.annotation_file = Path(annotation_file)
        data = _checked_coco(_read_json(self.annotation_file), self.annotation_file)
        self.coco = _coco_api(data)
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.label_to_category = {label: int(c["id"]) for label, c in enumerate(categories, start=1)}
        self.category_to_label = {cat: label for label, cat in self.label_to_category.items()}
        self.class_names = (BACKGROUND, *(str(c.get("name", c["id"])) for c in categories))

        records = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            anns = self.coco.imgToAnns.get(image_id, [])
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            if "width" in info and "height" in info:  # clip to the image, as torchvision's references do
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, float(info["width"]))
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, float(info["height"]))
            labels = [self.category_to_label[int(a["category_id"])] for a in anns]
            crowd = [bool(a.get("iscrowd", 0)) for a in anns]
            records.append(
                _make_record(image_id, self.images / info["file_name"], boxes, labels, crowd, [False] * len(anns), info["file_name"])
            )
        super().__init__(records, train, transform)


# --------------------------------------------------------------------------------------------
# Shapes, written in COCO format

_SHAPES_FORMAT = 1  # bump when the written files change, so that old folders are rewritten


def write_shapes_coco(folder: str | Path, split: str, size: int, image_size: int, seed: int) -> Path:
    """Render ``size`` Shapes detection scenes of ``split`` into ``folder`` as COCO files.

    Each setting has its own sub-folder, ``<split>_<size>x<image_size>px_seed<seed>``, so a run
    with other sizes never rewrites the images a running job reads. It holds
    ``images/000000.png ...`` and ``instances.json``, written last (a folder with the JSON is
    complete); every file is written to a temporary name and renamed, so two jobs writing the
    same folder at once leave whole files. Returns the JSON path; nothing is written when the
    JSON already records the same parameters in its ``info``. Category ids are ``1..6`` in the
    order of :data:`afan_harness.shapes.SHAPE_CLASSES`; annotation ids start at 1.
    """
    out = Path(folder) / f"{split}_{int(size)}x{int(image_size)}px_seed{int(seed)}"
    path = out / "instances.json"
    params = {"generator": "afan_harness.shapes", "format": _SHAPES_FORMAT, "split": split, "size": int(size),
              "image_size": int(image_size), "seed": int(seed), "max_shapes": 3}
    if path.is_file():
        try:
            with open(path, "r", encoding="utf-8") as file:
                if json.load(file).get("info", {}).get("params") == params:
                    return path
        except (OSError, ValueError, AttributeError):
            pass  # unreadable or foreign: write it again
    try:
        dataset = ShapesDataset("detection", split, size=size, image_size=image_size, seed=seed, max_shapes=3)
    except ValueError as error:
        raise DataError(f"cannot render the Shapes data: {error}") from error

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(size):
        sample = dataset.sample(index)
        file_name = f"{index:06d}.png"
        pixels = np.round(sample.image.transpose(1, 2, 0) * 255.0).astype(np.uint8)
        temporary = images_dir / f".{file_name}.{os.getpid()}.tmp"
        Image.fromarray(pixels).save(temporary, format="PNG")
        os.replace(temporary, images_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for box, cls in zip(sample.boxes.tolist(), sample.labels.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": int(cls) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    data = {
        "info": {"description": "afan Shapes detection scenes", "params": params},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES)],
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file)
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------
# Pascal VOC

_VOC_LAYOUT = (
    "<root>/VOCdevkit/VOC2007/Annotations/*.xml, <root>/VOCdevkit/VOC2007/JPEGImages/*.jpg, "
    "<root>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt (and the same under VOC2012 for voc0712)"
)
_VOC_HINT = (
    "VOC cannot be downloaded automatically here: get VOCtrainval_06-Nov-2007.tar and "
    "VOCtest_06-Nov-2007.tar (plus VOCtrainval_11-May-2012.tar for voc0712) from the PASCAL VOC "
    "website and extract them into data.root, or use data.name=shapes for the built-in data"
)
_FORBIDDEN_XML = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _parse_voc_xml(path: Path) -> ET.Element:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read the VOC annotation {path} ({error}); {_VOC_HINT}") from error
    if _FORBIDDEN_XML.search(raw):
        # Entity declarations can expand to gigabytes ("billion laughs"); VOC files have none.
        raise DataError(f"the VOC annotation {path} contains a DOCTYPE/ENTITY declaration, which is refused; replace the file")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as error:
        raise DataError(f"the VOC annotation {path} is not valid XML ({error}); replace the file") from error


def _voc_objects(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (0-based xyxy), labels 1..20 and difficult flags of one annotation file."""
    root = _parse_voc_xml(path)
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"the VOC annotation {path} has an object of unknown class {name!r}; the 20 VOC classes are {', '.join(VOC_CLASSES)}")
        box = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as error:
            raise DataError(f"the VOC annotation {path} has an object without a valid bndbox (xmin, ymin, xmax, ymax)") from error
        # VOC pixels are 1-based and inclusive: pixel columns x1..x2 span [x1 - 1, x2) in 0-based
        # continuous coordinates (the conversion torchvision's references make).
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append(int((obj.findtext("difficult") or "0").strip() or 0) == 1)
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64), np.array(difficult, dtype=bool)


def _voc_ids(year_dir: Path, image_set: str) -> list[str]:
    path = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise DataError(f"Pascal VOC not found: {path} does not exist. Expected layout: {_VOC_LAYOUT}. {_VOC_HINT}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOCDetection(_DetectionDataset):
    """Pascal VOC image sets, e.g. ``[("VOC2007", "trainval"), ("VOC2012", "trainval")]``.

    ``image_id`` is the position of the image in the concatenated sets; ``names`` maps it back
    to ``"VOC2007/000005"``.  All annotations are parsed here, so errors show at once.
    """

    def __init__(self, root: str | Path, image_sets: Sequence[tuple[str, str]], train: bool, transform: Optional[Callable] = None):
        devkit = Path(root) / "VOCdevkit"
        records = []
        for year, image_set in image_sets:
            year_dir = devkit / year
            if not year_dir.is_dir():
                raise DataError(f"Pascal VOC not found: the folder {year_dir} does not exist. Expected layout: {_VOC_LAYOUT}. {_VOC_HINT}")
            for stem in _voc_ids(year_dir, image_set):
                boxes, labels, difficult = _voc_objects(year_dir / "Annotations" / f"{stem}.xml")
                records.append(_make_record(
                    len(records), year_dir / "JPEGImages" / f"{stem}.jpg", boxes, labels,
                    np.zeros(len(labels), bool), difficult, f"{year}/{stem}",
                ))
        self.class_names = (BACKGROUND, *VOC_CLASSES)
        super().__init__(records, train, transform)


# --------------------------------------------------------------------------------------------
# Building the splits

_COCO_LAYOUT = "<root>/annotations/instances_{train,val}2017.json and <root>/{train,val}2017/*.jpg"
_COCO_HINT = (
    "COCO cannot be downloaded automatically here: get train2017.zip, val2017.zip and "
    "annotations_trainval2017.zip from the COCO website (cocodataset.org) and unzip them into "
    "data.root, or use data.name=shapes for the built-in data"
)


def _coco_split(root: Path, split: str, train: bool, transform) -> CocoDetection:
    annotation = root / "annotations" / f"instances_{split}2017.json"
    images = root / f"{split}2017"
    for path, is_there in ((annotation, annotation.is_file()), (images, images.is_dir())):
        if not is_there:
            raise DataError(f"COCO not found: {path} does not exist. Expected layout: {_COCO_LAYOUT} (with <root> = data.root = {root}). {_COCO_HINT}")
    return CocoDetection(images, annotation, train=train, transform=transform)


def _coco_eval_info(test: CocoDetection, use_07_metric: bool = False) -> EvalInfo:
    return EvalInfo(
        kind="coco", ground_truth=test.ground_truth(), use_07_metric=use_07_metric, coco_gt=test.coco,
        annotation_file=test.annotation_file, label_to_category=dict(test.label_to_category),
        image_names={r.image_id: r.name for r in test.records},
    )


def build_datasets(cfg: DataConfig, seed: int = 0) -> Splits:
    """The train/test data sets described by ``cfg`` (see the module docstring for the splits).

    ``seed`` selects the Shapes scenes; the real data sets do not depend on it.
    """
    flip = RandomHorizontalFlip(0.5) if cfg.flip else None
    root = Path(cfg.root)
    if cfg.name in ("shapes", "coco"):
        if cfg.name == "shapes":
            folder = root / "shapes_detection"
            train_json = write_shapes_coco(folder, "train", cfg.train_size, cfg.image_size, seed)
            test_json = write_shapes_coco(folder, "val", cfg.val_size, cfg.image_size, seed)
            train = CocoDetection(train_json.parent / "images", train_json, train=True, transform=flip)
            test = CocoDetection(test_json.parent / "images", test_json, train=False)
        else:
            train = _coco_split(root, "train", True, flip)
            test = _coco_split(root, "val", False, None)
            check_images([r.path for r in train.records + test.records], "COCO images")
        if train.label_to_category != test.label_to_category:
            raise DataError(
                f"the categories of {train.annotation_file} and {test.annotation_file} differ; both "
                "files need the same category ids, or the labels would not match"
            )
        if not len(train):
            raise DataError(f"{train.annotation_file} has no image with a usable (non-crowd, non-empty) box to train on")
        return Splits(train, test, len(test.class_names), test.class_names, cfg.name, _coco_eval_info(test))

    train_sets = [("VOC2007", "trainval")] + ([("VOC2012", "trainval")] if cfg.name == "voc0712" else [])
    train = VOCDetection(root, train_sets, train=True, transform=flip)
    test = VOCDetection(root, [("VOC2007", "test")], train=False)
    check_images([r.path for r in train.records + test.records], "VOC images")
    info = EvalInfo(kind="voc", ground_truth=test.ground_truth(), use_07_metric=True,
                    image_names={r.image_id: r.name for r in test.records})
    return Splits(train, test, len(test.class_names), test.class_names, cfg.name, info)


# --------------------------------------------------------------------------------------------
# Loaders


def collate(batch):
    """[(image, target), ...] -> (list of images, list of targets): images differ in size."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


def to_device(images, targets, device) -> tuple[list, list]:
    """A collated batch on ``device`` (the targets' tensors; their other entries as they are)."""
    return ([image.to(device) for image in images],
            [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets])


def make_loader(dataset: Dataset, batch_size: int, **kwargs) -> DataLoader:
    """``afan_harness.loading.make_loader`` for detection: batches are lists (images differ in size)."""
    return loading.make_loader(dataset, batch_size, collate_fn=collate, **kwargs)
