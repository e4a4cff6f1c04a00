"""Evaluation sharded over two gloo processes gives the one-process results, and only process 0
writes files.

Each task's model is built once with seeded random weights in the test process, which scores it
alone (the reference) and saves its weights; two spawned processes load them and evaluate the
same data sharded (odd sizes, so the shards differ in length). The reference runs on one
thread, as the workers do, so that an image predicted in the same batch gives the same floats.
"""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset

from afan_harness import distributed
from afan_harness.checkpoint import load_checkpoint
from Classification.data import DataConfig as ClsData
from Classification.data import build_datasets as cls_datasets
from Classification.data import make_loader as cls_loader
from Classification.evaluation import evaluate as cls_evaluate
from Classification.models import create_model as cls_model
from Detection.data import DataConfig as DetData
from Detection.data import build_datasets as det_datasets
from Detection.evaluation import run_evaluation as det_evaluation
from Detection.models import create_model as det_model
from Segmentation.config import EvalConfig
from Segmentation.data import DataConfig as SegData
from Segmentation.data import build_datasets as seg_datasets
from Segmentation.evaluation import run_evaluation as seg_evaluation
from Segmentation.models import create_model as seg_model

pytestmark = pytest.mark.slow  # starts processes: the quick tier leaves them out

WORLD_SIZE = 2
CLS_DATA = ClsData(name="shapes", workers=0, train_size=1, val_size=1, test_size=7, augment=False)
SEG_DATA = SegData(name="shapes", image_size=32, train_size=1, val_size=5, crop_size=0, scale_range=[1.0, 1.0],
                   flip=False, workers=0)
SEG_EVAL = EvalConfig(mode="whole", batch_size=2, save_images=3)  # pictures from both shards
DET_SETTINGS = dict(min_size=64, max_size=64, anchor_sizes=[16, 32, 64], roi_batch_size=16)
DET_DRAW = 3


def _det_data(root) -> DetData:
    return DetData(name="shapes", root=str(root / "data"), image_size=64, train_size=1, val_size=5, flip=False,
                   workers=0)


def _splits(root):
    return cls_datasets(CLS_DATA), seg_datasets(SEG_DATA), det_datasets(_det_data(root))


def _models(cls_splits, seg_splits, det_splits):
    return (cls_model("resnet20", cls_splits.num_classes),
            seg_model("deeplabv3plus_mobilenet", seg_splits.num_classes),
            det_model("fasterrcnn_resnet18_c4", det_splits.num_classes, **DET_SETTINGS))


def _count_images(model, counts: list, name: str) -> None:
    """Add to ``counts`` how many images each call of ``model`` gets (a list of images or a batch)."""
    model.register_forward_pre_hook(lambda module, args: counts.append((name, len(args[0]))))


def _evaluate_all(root, process, models, splits, out_name: str) -> dict:
    cls, seg, det = models
    cls_splits, seg_splits, det_splits = splits
    device = torch.device("cpu")
    loader = cls_loader(distributed.shard(cls_splits.test, process), 4, train=False, workers=0, seed=0)
    results = {"classification": cls_evaluate(cls, loader, device, process=process),
               "segmentation": seg_evaluation(seg, seg_splits, device, root / f"seg_{out_name}", SEG_EVAL,
                                              process=process),
               "detection": det_evaluation(det, det_splits, device, root / f"det_{out_name}", draw=DET_DRAW,
                                           process=process)}
    # The scores take every process's counts: an empty shard (process 1's here) is fine, an
    # empty data set is not.
    one_image = Subset(cls_splits.test, [0])
    loader = cls_loader(distributed.shard(one_image, process), 4, train=False, workers=0, seed=0)
    results["one_image"] = cls_evaluate(cls, loader, device, process=process)
    empty = cls_loader(distributed.shard(Subset(one_image, []), process), 4, train=False, workers=0, seed=0)
    with pytest.raises(ValueError, match="evaluation data set is empty"):
        cls_evaluate(cls, empty, device, process=process)
    return results


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    root = Path(root)
    process, device = distributed.start("cpu")
    try:
        splits = _splits(root)
        models = _models(*splits)
        for name, model in zip(("classification", "segmentation", "detection"), models):
            model.load_state_dict(torch.load(root / f"{name}.pth", weights_only=True))
        counts = []
        _count_images(models[1], counts, "segmentation")
        _count_images(models[2], counts, "detection")
        results = _evaluate_all(root, process, models, splits, f"rank{rank}")
        results["images"] = {name: sum(n for key, n in counts if key == name) for name in ("segmentation", "detection")}
        torch.save(results, root / f"results_rank{rank}.pt")
    finally:
        distributed.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the one-process results, each process's results, the folder everything is in)."""
    root = tmp_path_factory.mktemp("sharded")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        splits = _splits(root)  # writes the detection images the workers read
        models = _models(*splits)
        for name, model in zip(("classification", "segmentation", "detection"), models):
            torch.save(model.state_dict(), root / f"{name}.pth")
        reference = _evaluate_all(root, distributed.Process(), models, splits, "one")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(root)), nprocs=WORLD_SIZE, join=True)
    sharded = [load_checkpoint(root / f"results_rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return reference, sharded, root


def test_classification_sharded_equals_one_process(runs):
    reference, sharded, _ = runs
    expected = reference["classification"]
    for result in sharded:
        for got, want in ((result["classification"], expected), (result["one_image"], reference["one_image"])):
            assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)


def test_segmentation_sharded_equals_one_process(runs):
    reference, sharded, root = runs
    for result in sharded:
        torch.testing.assert_close(result["segmentation"], reference["segmentation"], rtol=0, atol=0, equal_nan=True)
    # Process 0 predicted its 3 images and the 3 pictured ones again; process 1 its 2 images.
    assert [result["images"]["segmentation"] for result in sharded] == [6, 2]
    one, rank0 = root / "seg_one", root / "seg_rank0"
    names = ["per_class_iou.csv", *(f"pred_{k}.png" for k in range(SEG_EVAL.save_images))]
    assert sorted(p.name for p in rank0.iterdir()) == sorted(names)
    for name in names:  # the same confusion matrix, and pictures of the split's first images
        assert (rank0 / name).read_bytes() == (one / name).read_bytes(), name
    assert not (root / "seg_rank1").exists()


def test_detection_sharded_equals_one_process(runs):
    reference, sharded, root = runs
    for result in sharded:
        torch.testing.assert_close(result["detection"], reference["detection"], rtol=0, atol=0, equal_nan=True)
    assert [result["images"]["detection"] for result in sharded] == [3, 2]
    one, rank0 = root / "det_one", root / "det_rank0"
    assert (rank0 / "per_class_ap.csv").read_text() == (one / "per_class_ap.csv").read_text()
    assert sorted(p.name for p in (rank0 / "predictions").iterdir()) == [f"{k:03d}.png" for k in range(DET_DRAW)]
    # Every image's detections, in the data set's order. An image predicted in another batch
    # (one process batches images 0-3, process 0 images 0, 2, 4) gets boxes and scores that can
    # differ in the last bits of float32.
    found, expected = (json.loads((folder / "detections.json").read_text()) for folder in (rank0, one))
    ids = lambda results: [(r["image_id"], r["category_id"], r["file_name"]) for r in results]
    assert expected and ids(found) == ids(expected)
    for key in ("bbox", "score"):
        torch.testing.assert_close(torch.tensor([r[key] for r in found]), torch.tensor([r[key] for r in expected]),
                                   rtol=1e-6, atol=1e-4)
    assert not (root / "det_rank1").exists()


def test_shards_are_disjoint_and_cover_the_data_set(monkeypatch):
    items = list(range(7))
    assert distributed.shard(items, distributed.Process()) is items
    shards = [distributed.shard(items, distributed.Process(rank, 3, rank, distributed=True)) for rank in range(3)]
    assert [list(s) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    # gather_shards puts the shards' results back in the data set's order.
    monkeypatch.setattr(distributed, "gather", lambda values, process: [[f"r{i}" for i in s] for s in shards])
    assert distributed.gather_shards([], distributed.Process(0, 3, 0, distributed=True)) == [f"r{i}" for i in items]
