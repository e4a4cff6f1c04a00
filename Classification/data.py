"""Data of the classification experiments: Shapes (built in), CIFAR-10/100 and ImageNet folders.

    splits = build_datasets(DataConfig(name="cifar10", root="data"), seed=0)
    loader = make_loader(splits.train, 128, train=True, workers=2, seed=0)

Every data set yields ``(image, label)`` with ``image`` a float32 tensor [3, H, W] in [0, 1]
and ``label`` an int.  Images are *not* mean/std normalised: the models normalise inside, so
that adversarial perturbations and checkpoints never depend on a data pipeline's constants.

Splits (the paper's protocol):

* CIFAR-10/100: train = the first 45,000 images of the training files, val = the last 5,000
  (with a set of another size, e.g. a test fixture, val = the last tenth), test = the
  official test batch.  Val uses the test transform although it comes from the training files.
* ImageNet-style folders ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``: the
  official validation set is the only labelled held-out set, so it doubles as the test set.
* Shapes: separate, independently rendered train/val/test splits of ``train_size``,
  ``val_size`` and ``test_size`` images (these three sizes apply to Shapes only).

CIFAR files are read by our own reader, not by ``torchvision.datasets.CIFAR10``, for two
reasons: torchvision checks the md5 of every file against the official archive (so no small
test fixture in the real format can pass), and it reads them with a plain ``pickle.load``,
which runs whatever code a tampered file names.  Our reader only unpickles the few numpy
globals an array needs.  torchvision is still used to download and verify the archive.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from afan_harness.loading import DataError, check_images, load_rgb, make_loader
from afan_harness.shapes import MIN_IMAGE_SIZE, ShapesDataset

__all__ = ["DataConfig", "DataError", "Splits", "build_datasets", "make_loader"]

NAMES = ("shapes", "cifar10", "cifar100", "imagenet")


@dataclass
class DataConfig:
    name: Literal["shapes", "cifar10", "cifar100", "imagenet"] = "shapes"
    root: str = "data"  # folder holding the data set (e.g. the one containing cifar-10-batches-py)
    download: bool = False  # CIFAR only: fetch the archive into root if it is not there
    workers: int = 2  # DataLoader worker processes
    image_size: int = 32  # Shapes: image side; ImageNet folders: the training crop size (e.g. 224)
    train_size: int = 5000  # Shapes only
    val_size: int = 1000  # Shapes only
    test_size: int = 1000  # Shapes only
    augment: bool = True  # random crops/flips on the training split

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"data.name={self.name!r} is not valid; choose one of {', '.join(NAMES)}")
        for field_name in ("image_size", "train_size", "val_size", "test_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{field_name}={value!r} is not valid; use an integer >= 1")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise ValueError(f"data.workers={self.workers!r} is not valid; use an integer >= 0 (0 = load in the main process)")
        if self.name == "shapes" and self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"data.image_size={self.image_size} is too small for the Shapes images; use an integer "
                             f">= {MIN_IMAGE_SIZE}")


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    name: str
    classes: tuple[str, ...] = ()


def build_datasets(cfg: DataConfig, seed: int = 0) -> Splits:
    """The train/val/test data sets described by ``cfg`` (see the module docstring for the splits).

    ``seed`` selects the Shapes images; the real data sets do not depend on it.
    """
    if cfg.name == "shapes":
        return _shapes(cfg, seed)
    if cfg.name in _CIFAR:
        return _cifar(cfg)
    return _image_folders(cfg)


# --------------------------------------------------------------------------------------------
# Shapes


def _shapes(cfg: DataConfig, seed: int) -> Splits:
    # The label (dominant shape) does not change under a horizontal flip; crops could cut the
    # dominant shape and change it, so the flip is the only augmentation.
    flip = transforms.RandomHorizontalFlip() if cfg.augment else None

    def split(name: str, size: int, transform) -> ShapesDataset:
        return ShapesDataset(
            "classification", name, size=size, image_size=cfg.image_size, seed=seed, transform=transform,
            cache=True,
        )

    train = split("train", cfg.train_size, flip)
    return Splits(
        train=train,
        val=split("val", cfg.val_size, None),
        test=split("test", cfg.test_size, None),
        num_classes=train.num_classes,
        name="shapes",
        classes=tuple(train.classes),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10/100 (the "python version" of the data set: pickled dicts of numpy arrays)


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    download_class: type  # torchvision class whose url/filename/md5 describe the archive


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch", "batches.meta", "labels", "label_names", 10, datasets.CIFAR10,
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
        "fine_labels", "fine_label_names", 100, datasets.CIFAR100,
    ),
}

_CIFAR_LAYOUT_TEXT = {
    "cifar10": "<root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta",
    "cifar100": "<root>/cifar-100-python/train, test, meta",
}


def _numpy_global(submodule: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; pickles written by either name must load.
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays only; any other global is refused.

    A pickle can name any importable callable (``os.system``...) and have it called on load.
    The CIFAR files need only numpy's array reconstruction and, in pickles of protocol < 3
    written by Python 3, ``_codecs.encode`` (how such pickles store ``bytes``).
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return codecs.encode
        return _numpy_global(module.rsplit(".", 1)[1], name)


def _read_pickle(path: Path) -> dict:
    """The dict stored in a CIFAR file, with str keys (the real files are Python 2 pickles)."""
    try:
        with open(path, "rb") as file:
            # latin1 is how numpy's own docs say to read Python 2 pickles of arrays.
            entry = _ArrayUnpickler(io.BytesIO(file.read()), encoding="latin1").load()
    except Exception as error:
        raise DataError(
            f"cannot read the CIFAR file {path}: it is corrupt or truncated ({type(error).__name__}: "
            f"{error}); delete the data set folder and download it again (data.download=true)"
        ) from error
    if not isinstance(entry, dict):
        raise DataError(f"the CIFAR file {path} holds a {type(entry).__name__}, not a dict; replace the file")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels int64 [N] of one CIFAR file."""
    entry = _read_pickle(path)
    data, labels = entry.get("data"), entry.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"the CIFAR file {path} has no valid 'data' entry (need a uint8 array [N, 3072]); "
            "the file is corrupt: delete the data set folder and download it again"
        )
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes):
        raise DataError(
            f"the CIFAR file {path} has no valid {label_key!r} entry (need {len(data)} labels in "
            f"0..{num_classes - 1}); the file is corrupt: delete the data set folder and download it again"
        )
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _CifarImages(Dataset):
    """CIFAR images held in memory as uint8 HWC, returned through ``transform`` (PIL in)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _cifar_val_size(total: int) -> int:
    """The paper's 5,000 validation images of the 50,000; the last tenth for other set sizes."""
    return 5000 if total == 50000 else max(1, total // 10)


def _cifar(cfg: DataConfig) -> Splits:
    layout = _CIFAR[cfg.name]
    folder = Path(cfg.root) / layout.folder
    files = (*layout.train_files, layout.test_file, layout.meta_file)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing and cfg.download:
        _download_cifar(cfg, layout)
        missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{layout.title} not found: {folder} lacks {', '.join(missing)}. Expected layout: "
            f"{_CIFAR_LAYOUT_TEXT[cfg.name]} (with <root> = data.root = {cfg.root}). "
            f"Pass data.download=true to download it, or data.name=shapes to use the built-in data"
        )

    parts = [_read_batch(folder / name, layout.label_key, layout.num_classes) for name in layout.train_files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    test_images, test_labels = _read_batch(folder / layout.test_file, layout.label_key, layout.num_classes)
    classes = _cifar_class_names(folder / layout.meta_file, layout)
    if len(images) < 2:
        raise DataError(f"{layout.title} in {folder} has {len(images)} training image(s); need at least 2 to split off a validation set")

    plain = transforms.ToTensor()  # uint8 HWC -> float [0, 1] CHW, no normalisation
    augmented = (
        transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), plain])
        if cfg.augment else plain
    )
    # Two views of the same arrays: val comes from the training files but must not be augmented.
    n_train = len(images) - _cifar_val_size(len(images))
    return Splits(
        train=Subset(_CifarImages(images, labels, augmented), range(0, n_train)),
        val=Subset(_CifarImages(images, labels, plain), range(n_train, len(images))),
        test=_CifarImages(test_images, test_labels, plain),
        num_classes=layout.num_classes,
        name=cfg.name,
        classes=classes,
    )


def _cifar_class_names(path: Path, layout: _CifarLayout) -> tuple[str, ...]:
    names = _read_pickle(path).get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise DataError(
            f"the CIFAR file {path} has no valid {layout.names_key!r} entry ({layout.num_classes} "
            "class names); the file is corrupt: delete the data set folder and download it again"
        )
    return tuple(name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names)


def _download_cifar(cfg: DataConfig, layout: _CifarLayout) -> None:
    source = layout.download_class
    try:
        # Checks the archive's md5 before extracting it.
        datasets.utils.download_and_extract_archive(source.url, cfg.root, filename=source.filename, md5=source.tgz_md5)
    except Exception as error:
        raise DataError(
            f"could not download {layout.title} from {source.url} ({type(error).__name__}: {error}). "
            f"Without internet access, fetch {source.filename} elsewhere and extract it into "
            f"data.root={cfg.root}, or use data.name=shapes for the built-in data"
        ) from error


# --------------------------------------------------------------------------------------------
# ImageNet-style folders

_FOLDER_LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"


def _image_folder(root: Path, split: str, transform: Callable) -> datasets.ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"ImageNet-style data set: the folder {folder} does not exist. Expected layout: "
            f"{_FOLDER_LAYOUT} (with root = data.root = {root}); ImageNet cannot be downloaded "
            "automatically. Or use data.name=shapes for the built-in data"
        )
    try:
        images = datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise DataError(
            f"ImageNet-style data set: {str(error).rstrip('.')}. Expected layout: {_FOLDER_LAYOUT} "
            f"(with root = data.root = {root}), one sub-folder of images per class"
        ) from error
    check_images([path for path, _ in images.samples], f"{split} images")
    return images


def _image_folders(cfg: DataConfig) -> Splits:
    size = cfg.image_size
    plain = transforms.Compose(
        [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor()]
    )
    augmented = (
        transforms.Compose(
            [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
        if cfg.augment else plain
    )
    root = Path(cfg.root)
    train = _image_folder(root, "train", augmented)
    val = _image_folder(root, "val", plain)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"the class folders of {root / 'train'} and {root / 'val'} differ: only in train: "
            f"{_short_list(only_train)}; only in val: {_short_list(only_val)}. Both need the same "
            "class sub-folders, or the label ids would not match"
        )
    # The official validation set is the only labelled held-out set: it is also the test set.
    return Splits(train=train, val=val, test=val, num_classes=len(train.classes), name=cfg.name, classes=tuple(train.classes))


def _short_list(names: Sequence[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
