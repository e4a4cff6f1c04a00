"""Two gloo processes on the CPU train as one process does on the same global batches.

Without SyncBatchNorm (CUDA only) each process normalises its own half of the batch, and DDP
keeps process 0's BatchNorm running statistics. The one-process reference therefore runs each
global batch as its two halves, the second inside ``afan.frozen_bn_stats``, and steps on the
mean of the two losses: DDP's averaged gradient.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import default_collate

import afan
from afan_harness import distributed
from afan_harness.checkpoint import load_checkpoint
from afan_harness.config import load_config
from afan_harness.guard import StopRequested
from afan_harness.runtime import seed_everything
from afan_harness.sampler import ResumableSampler
from Classification import train as cls_train
from Classification.config import TrainConfig
from Classification.data import build_datasets
from Detection import train as det_train
from Detection.data import build_datasets as det_datasets
from Detection.data import collate as det_collate
from Segmentation import train as seg_train
from Segmentation.config import TrainConfig as SegConfig
from Segmentation.data import build_datasets as seg_datasets
from Segmentation.data import collate as seg_collate

pytestmark = pytest.mark.slow  # training processes: the quick tier leaves them out

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["data.name=shapes", "data.train_size=24", "data.val_size=4", "data.test_size=4", "data.workers=0",
            "data.augment=false", "model=resnet20", "batch_size=8", "epochs=1", "device=cpu", "deterministic=true",
            "optim.warmup_epochs=0", "optim.lr=0.01"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, task: str, overrides: list[str], resume: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    module, config = {"classification": (cls_train, TrainConfig), "segmentation": (seg_train, SegConfig),
                      "detection": (det_train, det_train.TrainConfig)}[task]
    module.run(load_config(config, overrides=overrides), resume=resume)


def _one_thread(reference, cfg) -> dict:
    """``reference(cfg)`` on one thread, as the workers run: at batches of 4, float sums in
    another order grow into visible differences within a few steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(cfg)
    finally:
        torch.set_num_threads(threads)


def _mean_of_halves(step, halves, rng_states) -> torch.Tensor:
    """DDP's loss on one global batch: the first half as process 0 (its BatchNorm statistics
    are the ones kept), the second as process 1, each drawing (dropout) from its own random
    stream as the processes do; ``rng_states`` holds the two streams between calls."""
    losses = []
    for rank, half in enumerate(halves):
        torch.set_rng_state(rng_states[rank])
        if rank == 0:
            losses.append(step(*half).loss)
        else:
            with afan.frozen_bn_stats(step.model):
                losses.append(step(*half).loss)
        rng_states[rank] = torch.get_rng_state()
    return sum(losses) / 2


class _Step:
    def __init__(self, model, step):
        self.model, self.step = model, step

    def __call__(self, *batch):
        return self.step(self.model, *batch)


def _epoch_reference(cfg: TrainConfig) -> dict:
    """One process on the global batches of the classification trainer (epochs)."""
    seed_everything(cfg.seed, cfg.deterministic)
    splits = build_datasets(cfg.data, seed=cfg.seed)
    model = cls_train.build_model(cfg, splits.num_classes, torch.device("cpu")).train()
    rng_states = [torch.get_rng_state()] * 2  # the processes start from the same seed
    half = cfg.batch_size // 2
    steps = len(splits.train) // cfg.batch_size
    optimizer, scheduler = cls_train.make_optimizer(model, cfg, steps)
    step = _Step(model, lambda m, x, y: cls_train.training_step(m, x, y, cfg))
    for epoch in range(cfg.epochs):
        # Each epoch continues the resumable shuffle at its own start; the last partial batch is dropped.
        stream = iter(ResumableSampler(len(splits.train), cfg.seed, start=epoch * len(splits.train)))
        for _ in range(steps):
            batch = [splits.train[next(stream)] for _ in range(cfg.batch_size)]
            halves = []
            for part in (batch[:half], batch[half:]):
                x, y = default_collate(part)
                halves.append((x.contiguous(memory_format=cls_train.memory_format(cfg)), y))
            optimizer.zero_grad(set_to_none=True)
            _mean_of_halves(step, halves, rng_states).backward()
            optimizer.step()
            scheduler.step()
    return model.state_dict()


def _iteration_reference(task: str, cfg) -> dict:
    """One process on the global batches of an iteration-based trainer (segmentation, detection)."""
    module, datasets, collate = {"segmentation": (seg_train, seg_datasets, seg_collate),
                                 "detection": (det_train, det_datasets, det_collate)}[task]
    seed_everything(cfg.seed, cfg.deterministic)
    splits = datasets(cfg.data, seed=cfg.seed)
    model = module.build_model(cfg, splits.num_classes, torch.device("cpu")).train()
    rng_states = [torch.get_rng_state()] * 2  # the processes start from the same seed
    if task == "segmentation":
        optimizer = seg_train.make_optimizer(model, cfg.optim)
        scheduler = seg_train.make_scheduler(optimizer, cfg.iterations, cfg.optim)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                    momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: det_train.lr_factor(it, cfg.optim))
    stream = iter(ResumableSampler(len(splits.train), cfg.seed))
    step = _Step(model, lambda m, images, labels: module.training_step(m, images, labels, cfg))
    half = cfg.batch_size // 2
    for _ in range(cfg.iterations):
        batch = [splits.train[next(stream)] for _ in range(cfg.batch_size)]
        halves = [collate(batch[:half]), collate(batch[half:])]
        optimizer.zero_grad(set_to_none=True)
        _mean_of_halves(step, halves, rng_states).backward()
        optimizer.step()
        scheduler.step()
    return model.state_dict()


def _assert_same_weights(trained: dict, expected: dict, mode: str) -> None:
    assert trained.keys() == expected.keys()
    # A-FAN steps along sign(gradient): an entry whose gradient is within rounding of zero
    # may take the other sign when float sums run in another order (DDP's averaging), which
    # moves the layers after the split point, and most their BN running statistics (up to
    # 4e-4 seen), where a wrong batch split or gradient average would be off by far more.
    atol = 1e-3 if mode == "afan" else 1e-5
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("mode", ["base", "afan"])
def test_two_processes_match_one_process_on_the_same_batches(tmp_path, mode):
    overrides = [*SETTINGS, f"mode={mode}", f"out={tmp_path / 'ddp'}"]
    mp.spawn(_worker, args=(2, _free_port(), "classification", overrides), nprocs=2, join=True)
    trained = load_checkpoint(tmp_path / "ddp" / "last.pth")["model"]
    expected = _one_thread(_epoch_reference, load_config(TrainConfig, overrides=overrides))
    _assert_same_weights(trained, expected, mode)
    assert (tmp_path / "ddp" / "summary.json").is_file()  # process 0 finished the run alone


SEG_SETTINGS = ["model.name=deeplabv3plus_mobilenet", "data.name=shapes", "data.image_size=32", "data.train_size=12",
                "data.val_size=2", "data.crop_size=0", "data.scale_range=[1.0,1.0]", "data.flip=false",
                "data.workers=0", "batch_size=8", "iterations=3", "log_every=1", "device=cpu", "deterministic=true",
                "optim.lr=0.001", "eval.batch_size=2", "eval.save_images=0"]


@pytest.mark.parametrize("mode", ["base", "afan"])
def test_segmentation_two_processes_match_one_process(tmp_path, mode):
    overrides = [*SEG_SETTINGS, f"mode={mode}", f"out={tmp_path / 'ddp'}"]
    mp.spawn(_worker, args=(2, _free_port(), "segmentation", overrides), nprocs=2, join=True)
    trained = load_checkpoint(tmp_path / "ddp" / "last.pth")["model"]
    expected = _one_thread(lambda cfg: _iteration_reference("segmentation", cfg), load_config(SegConfig, overrides=overrides))
    _assert_same_weights(trained, expected, mode)
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]  # logged once, by process 0


def _det_settings(tmp_path) -> list[str]:
    return ["model.name=fasterrcnn_resnet18_c4", "model.min_size=64", "model.max_size=64", "model.roi_batch_size=16",
            "model.anchor_sizes=[16,32,64]",
            "data.name=shapes", "data.image_size=64", "data.train_size=8", "data.val_size=2", "data.flip=false",
            f"data.root={tmp_path / 'data'}", "data.workers=0", "batch_size=4", "iterations=3", "log_every=1",
            "draw_images=0", "device=cpu", "deterministic=true", "afan.n=2", "afan.mask=01", "optim.warmup_iters=1",
            "optim.lr=0.005"]


@pytest.mark.parametrize("mode", ["base", "afan"])
def test_detection_two_processes_match_one_process(tmp_path, mode):
    overrides = [*_det_settings(tmp_path), f"mode={mode}", f"out={tmp_path / 'ddp'}"]
    mp.spawn(_worker, args=(2, _free_port(), "detection", overrides), nprocs=2, join=True)
    trained = load_checkpoint(tmp_path / "ddp" / "last.pth")["model"]
    expected = _one_thread(lambda cfg: _iteration_reference("detection", cfg),
                           load_config(det_train.TrainConfig, overrides=overrides))
    _assert_same_weights(trained, expected, mode)


def test_one_process_under_torchrun_trains_as_a_plain_run(tmp_path):
    """Alone in its process group, a process takes the DDP path and ends with the plain run's weights."""
    overrides = [*SEG_SETTINGS, "mode=afan", "iterations=2"]
    mp.spawn(_worker, args=(1, _free_port(), "segmentation", [*overrides, f"out={tmp_path / 'ddp'}"]), nprocs=1,
             join=True)
    _one_thread(seg_train.run, load_config(SegConfig, overrides=[*overrides, f"out={tmp_path / 'plain'}"]))
    ddp, plain = (load_checkpoint(tmp_path / name / "last.pth")["model"] for name in ("ddp", "plain"))
    for key, value in plain.items():
        assert torch.equal(ddp[key], value), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchrun_on_cuda_trains_with_nccl_and_sync_bn(tmp_path):
    """The README's torchrun command on one GPU: NCCL, DDP and SyncBatchNorm, then evaluation."""
    settings = [s for s in SEG_SETTINGS if s not in ("device=cpu", "deterministic=true")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(_free_port()), "-m", "Segmentation.train", *settings, "device=cuda", "sync_bn=true", "mode=afan",
               f"out={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 3 and 0 <= summary["miou"] <= 1


def test_batch_must_split_over_the_processes():
    assert distributed.local_batch_size(8, distributed.Process(0, 2, 0)) == 4
    with pytest.raises(ValueError, match="batch_size=6 does not split over 4 processes; use a multiple of 4"):
        distributed.local_batch_size(6, distributed.Process(0, 4, 0))


def test_a_single_process_runs_the_step_directly():
    process, device = distributed.start("cpu")
    assert process == distributed.Process() and process.is_main and not process.distributed
    run = distributed.step_runner(torch.nn.Identity(), lambda model, x: model(x) + 1, process, device)
    assert torch.equal(run(torch.zeros(2)), torch.ones(2))
    assert distributed.sum_over_processes([1.0, 2.5], device) == [1.0, 2.5]


def _worker_signalled(rank: int, world_size: int, port: int, overrides: list[str], signalled_rank: int, step: int,
                      report) -> None:
    """``_worker`` for detection, where process ``signalled_rank`` gets SIGTERM during its
    ``step``-th step; each process reports where it stopped to the folder ``report``."""
    real_step, calls = det_train.training_step, []

    def step_with_signal(*args, **kwargs):
        calls.append(1)
        if rank == signalled_rank and len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    det_train.training_step = step_with_signal
    try:
        _worker(rank, world_size, port, "detection", overrides)
        stopped = "not stopped"
    except StopRequested as stop:
        stopped = stop.position
    (Path(report) / f"rank{rank}").write_text(stopped)


def test_a_signal_to_one_process_stops_all_and_the_resumed_run_is_exact(tmp_path):
    """SIGTERM to process 1 stops both after the same step; the resumed run ends with the
    weights of an uninterrupted one: each process gets back its own RNG state (they differ: the
    RPN and RoI samplers draw as many numbers as their images have candidate boxes)."""
    settings = [*_det_settings(tmp_path), "mode=base", "iterations=4", "checkpoint_every=4"]
    stopped = [*settings, f"out={tmp_path / 'ddp'}"]
    mp.spawn(_worker_signalled, args=(2, _free_port(), stopped, 1, 2, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["iteration 2", "iteration 2"]
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert state["iteration"] == 2  # written by process 0 at the stop
    assert not torch.equal(state["rng_by_process"][0]["torch"], state["rng_by_process"][1]["torch"])
    mp.spawn(_worker, args=(2, _free_port(), "detection", stopped, True), nprocs=2, join=True)
    resumed = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert resumed["iteration"] == 4
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    mp.spawn(_worker, args=(2, _free_port(), "detection", [*settings, f"out={tmp_path / 'whole'}"]), nprocs=2,
             join=True)
    whole = load_checkpoint(tmp_path / "whole" / "last.pth")["model"]
    for key, value in whole.items():
        assert torch.equal(resumed["model"][key], value), key
