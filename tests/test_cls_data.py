"""Classification data: Shapes, CIFAR-10/100 and ImageNet-style folders (tiny fixtures in the
real on-disk formats), errors that say what to fix, and reproducible loaders."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from Classification.data import DataConfig, DataError, build_datasets, make_loader


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [("train_size", 0), ("val_size", -1), ("test_size", 0), ("image_size", 0), ("workers", -1)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


def test_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="cifar10"):
        DataConfig(name="mnist")


# --------------------------------------------------------------------------------------------
# Shapes


def shapes(**kwargs):
    cfg = DataConfig(name="shapes", train_size=8, val_size=5, test_size=3, **kwargs)
    return build_datasets(cfg, seed=0)


def test_shapes_sizes_range_and_labels():
    splits = shapes()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 5, 3)
    assert splits.num_classes == 6 and splits.name == "shapes" and len(splits.classes) == 6
    for dataset in (splits.train, splits.val, splits.test):
        image, label = dataset[0]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert 0 <= image.min() and image.max() <= 1
        assert type(label) is int and 0 <= label < 6


def test_shapes_deterministic_and_splits_differ():
    a, b = shapes(), shapes()
    assert torch.equal(a.val[1][0], b.val[1][0]) and torch.equal(a.test[2][0], b.test[2][0])
    assert not torch.equal(a.val[0][0], a.test[0][0])


def test_shapes_augments_train_only():
    splits = shapes()
    torch.manual_seed(0)
    reads = [splits.train[0][0] for _ in range(12)]
    plain = shapes(augment=False).train[0][0]
    # Every read is the image or its mirror, and both occur.
    assert all(torch.equal(r, plain) or torch.equal(r, plain.flip(-1)) for r in reads)
    assert any(torch.equal(r, plain) for r in reads) and any(not torch.equal(r, plain) for r in reads)
    assert all(torch.equal(splits.val[0][0], splits.val[0][0]) for _ in range(5))


# --------------------------------------------------------------------------------------------
# CIFAR fixtures: pickled dicts exactly like the python version of the official archives.


def cifar_images(start, n):
    """Red channel = global index, green = 100, blue = row: checks channel and row order."""
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (start + np.arange(n))[:, None, None]
    images[:, 1] = 100
    images[:, 2] = np.arange(32)[:, None]
    return images.reshape(n, 3072)


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as file:
        pickle.dump(obj, file, protocol=protocol)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(5):  # 10 images per batch: 50 training images, global indices 0..49
        idx = list(range(10 * b, 10 * b + 10))
        dump(folder / f"data_batch_{b + 1}", {b"batch_label": b"training batch", b"data": cifar_images(10 * b, 10),
                                                b"labels": [i % 10 for i in idx], b"filenames": [b"x.png"] * 10})
    dump(folder / "test_batch", {b"data": cifar_images(200, 7), b"labels": [(200 + i) % 10 for i in range(7)]})
    dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    return tmp_path


def test_cifar10_split_labels_and_pixels(cifar10_root):
    splits = build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 7)  # val = last tenth
    assert splits.num_classes == 10 and splits.classes == tuple(f"c{i}" for i in range(10))
    for dataset, first in ((splits.val, 45), (splits.test, 200)):
        for k in range(len(dataset)):
            image, label = dataset[k]
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
            assert type(label) is int and label == (first + k) % 10
            assert torch.allclose(image[0], torch.full((32, 32), (first + k) / 255))
            assert torch.allclose(image[1], torch.full((32, 32), 100 / 255))
            assert torch.allclose(image[2], (torch.arange(32.0) / 255)[:, None].expand(32, 32))
    assert [splits.train[i][1] for i in range(45)] == [i % 10 for i in range(45)]


def test_cifar_train_is_augmented_and_val_is_not(cifar10_root):
    splits = build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))
    torch.manual_seed(0)
    reads = [splits.train[3][0] for _ in range(10)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    assert all(torch.equal(splits.val[0][0], splits.val[0][0]) for _ in range(5))
    plain = build_datasets(DataConfig(name="cifar10", root=str(cifar10_root), augment=False))
    assert torch.equal(plain.train[3][0], plain.train[3][0])


def test_cifar_present_with_download_true_does_not_download(cifar10_root):
    # No network here: reaching the downloader would fail.
    splits = build_datasets(DataConfig(name="cifar10", root=str(cifar10_root), download=True))
    assert len(splits.train) == 45


def test_cifar100_fine_labels_and_python2_style_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    # Protocol 2, as the official (Python 2) files use.
    dump(folder / "train", {b"data": cifar_images(0, 20), b"fine_labels": [i * 5 for i in range(20)],
                            b"coarse_labels": [0] * 20}, protocol=2)
    dump(folder / "test", {b"data": cifar_images(0, 4), b"fine_labels": [99, 98, 97, 96]}, protocol=2)
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, protocol=2)
    splits = build_datasets(DataConfig(name="cifar100", root=str(tmp_path)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 4)
    assert splits.num_classes == 100 and splits.classes[99] == "f99"
    assert [splits.val[i][1] for i in range(2)] == [90, 95]
    assert [splits.test[i][1] for i in range(4)] == [99, 98, 97, 96]


def python2_pickle(data, labels):
    """The bytes cPickle (Python 2, protocol 2) writes for {'data': array, 'labels': list}:
    str as BINSTRING, the array via numpy.core.multiarray._reconstruct, as in the real files."""
    def short(b):
        return b"U" + bytes([len(b)]) + b

    def integer(n):
        return b"J" + struct.pack("<i", n)

    dtype = b"cnumpy\ndtype\n" + short(b"u1") + integer(0) + integer(1) + b"\x87R(" + integer(3) + short(b"|")
    dtype += b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + short(b"b")
    array += b"\x87R(" + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + b"\x86" + dtype
    array += b"\x89T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb"
    items = b"".join(integer(label) for label in labels)
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + b"](" + items + b"eu."


def test_cifar_reads_python2_pickles_like_the_official_files(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(python2_pickle(cifar_images(200, 3), [4, 5, 6]))
    splits = build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))
    assert [splits.test[i][1] for i in range(3)] == [4, 5, 6]
    assert torch.allclose(splits.test[2][0][0], torch.full((32, 32), 202 / 255))


@pytest.mark.parametrize("name, layout", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder_says_how_to_fix(tmp_path, name, layout):
    with pytest.raises(DataError) as error:
        build_datasets(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    message = str(error.value)
    assert layout in message and "data.download=true" in message and "data.name=shapes" in message


def test_cifar_incomplete_folder_names_missing_files(cifar10_root):
    os.remove(cifar10_root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3.*download"):
        build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))


def test_cifar_truncated_file_is_named(cifar10_root):
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_2"):
        build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_pickle_with_foreign_code_is_refused(cifar10_root):
    dump(cifar10_root / "cifar-10-batches-py" / "test_batch", {b"data": _Exploit(), b"labels": []})
    with pytest.raises(DataError, match=r"test_batch.*refusing to load (posix|os|nt)\.system"):
        build_datasets(DataConfig(name="cifar10", root=str(cifar10_root)))


# --------------------------------------------------------------------------------------------
# ImageNet-style folders


@pytest.fixture
def folder_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"img{i}.JPEG")
    return tmp_path


def test_image_folders_load(folder_root):
    splits = build_datasets(DataConfig(name="imagenet", root=str(folder_root), image_size=32))
    assert (len(splits.train), len(splits.val)) == (6, 4) and splits.test is splits.val
    assert splits.num_classes == 2 and splits.classes == ("n01", "n02")
    for dataset in (splits.train, splits.val):
        image, label = dataset[len(dataset) - 1]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert 0 <= image.min() and image.max() <= 1 and label == 1
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_image_folders_missing_val(folder_root):
    import shutil

    shutil.rmtree(folder_root / "val")
    with pytest.raises(DataError, match=r"val.*root/train/<class>/\*\.JPEG"):
        build_datasets(DataConfig(name="imagenet", root=str(folder_root)))


def test_image_folders_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"root/train/<class>/\*\.JPEG"):
        build_datasets(DataConfig(name="imagenet", root=str(tmp_path)))


def test_image_folders_class_mismatch_names_classes(folder_root):
    (folder_root / "val" / "n02").rename(folder_root / "val" / "n03")
    with pytest.raises(DataError, match=r"only in train: n02; only in val: n03"):
        build_datasets(DataConfig(name="imagenet", root=str(folder_root)))


def test_image_folders_corrupt_image_named_before_training(folder_root):
    bad = folder_root / "val" / "n01" / "img0.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(good[:100])  # truncated JPEG
    with pytest.raises(DataError, match=r"val/n01/img0\.JPEG"):
        build_datasets(DataConfig(name="imagenet", root=str(folder_root), image_size=32))
    bad.write_bytes(good)
    (folder_root / "train" / "n01" / "img0.JPEG").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"train/n01/img0\.JPEG"):
        build_datasets(DataConfig(name="imagenet", root=str(folder_root), image_size=32))


# --------------------------------------------------------------------------------------------
# Loaders


def order(seed, workers=0):
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    loader = make_loader(dataset, 8, train=True, workers=workers, seed=seed)
    return [int(i) for (batch,) in loader for i in batch]


def test_loader_order_is_reproducible():
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(40))


def test_loader_eval_keeps_order_and_last_batch():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = make_loader(dataset, 4, train=False, workers=0, seed=0)
    assert [int(i) for (batch,) in loader for i in batch] == list(range(10))
    assert len(make_loader(dataset, 4, train=True, workers=0, seed=0)) == 2  # partial batch dropped


def test_loader_with_sampler_and_workers():
    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    sampler = torch.utils.data.SequentialSampler(dataset)
    loader = make_loader(dataset, 4, train=True, workers=1, seed=0, sampler=sampler)
    assert [int(i) for (batch,) in loader for i in batch] == list(range(12))
    assert order(3, workers=1) == order(3)
