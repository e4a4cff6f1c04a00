"""Runs hit by real signals (tests/fault_runner.py): SIGKILL between steps and in the middle of
a checkpoint write, SIGTERM and SIGINT as a polite stop, and non-finite losses. A resumed run
must end bit-identical to one that was never interrupted, and no checkpoint may ever be half
written."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afan_harness.checkpoint import load_checkpoint
from afan_harness.rundir import MetricsLog
from Classification import train as cls_train
from Segmentation import train as seg_train

pytestmark = pytest.mark.slow  # training processes: the quick tier leaves them out

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fault_runner.py"
MODULES = {"classification": "Classification.train", "segmentation": "Segmentation.train"}
# 48 images in batches of 16: three steps an epoch, nine in all; A-FAN with two strengths.
CLS = ["model=resnet20", "data.name=shapes", "data.train_size=48", "data.val_size=16", "data.test_size=16",
       "data.workers=0", "batch_size=16", "device=cpu", "mode=afan", "epochs=3", "deterministic=true",
       "afan.steps=1", "afan.n=2", "afan.mask=01"]
SEG = ["model.name=deeplabv3plus_mobilenet", "data.name=shapes", "data.image_size=32", "data.train_size=8",
       "data.val_size=2", "data.crop_size=0", "data.scale_range=[1.0,1.0]", "data.workers=0", "batch_size=2",
       "log_every=1", "device=cpu", "eval.batch_size=2", "eval.save_images=0", "mode=afan", "iterations=4",
       "checkpoint_every=2", "deterministic=true"]
SETTINGS = {"classification": CLS, "segmentation": SEG}


def _env():
    # The same thread count in every process, so float sums run in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(task, *args):
    """``python -m <task>.train args`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", MODULES[task], *args], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def train_with_fault(task, fault, at, *args):
    return subprocess.run([sys.executable, str(RUNNER), task, fault, str(at), *args], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each task's run done in one go: its final training state and logged rows."""
    results = {}

    def get(task):
        if task not in results:
            out = tmp_path_factory.mktemp(task) / "whole"
            done = train(task, *SETTINGS[task], f"out={out}")
            assert done.returncode == 0, done.stderr
            results[task] = (load_checkpoint(out / "last.pth"), _rows(out))
        return results[task]
    return get


def _rows(out):
    """The metrics log without its timings, which differ from run to run."""
    return [{k: v for k, v in row.items() if k not in ("time", "sec_per_iter")}
            for row in MetricsLog(out / "metrics.csv").rows()]


def _assert_identical(a, b, where):
    """Equal bit for bit, through nested dicts and lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_same_run(out, expected):
    state, rows = expected
    resumed = load_checkpoint(out / "last.pth")
    for part in ("model", "optimizer", "scheduler", "rng"):
        _assert_identical(resumed[part], state[part], part)
    assert _rows(out) == rows
    assert not list(out.glob("*.tmp-*"))  # every partial write was cleaned up


@pytest.mark.parametrize("task, fault, at, saved", [
    ("classification", "kill-step", 5, {"iteration": 3}),  # second step of the second epoch
    ("classification", "kill-save", 2, {"iteration": 3}),  # while writing the end of the second epoch
    ("segmentation", "kill-save", 2, {"iteration": 2}),  # while writing iteration 4's state
])
def test_sigkill_keeps_the_last_checkpoint_and_resuming_ends_bit_identical(tmp_path, uninterrupted, task, fault,
                                                                           at, saved):
    out = tmp_path / "run"
    done = train_with_fault(task, fault, at, *SETTINGS[task], f"out={out}")
    assert done.returncode == -signal.SIGKILL, done.stderr
    last = load_checkpoint(out / "last.pth")  # intact and loadable
    assert {k: last[k] for k in saved} == saved
    partial = list(out.glob("last.pth.tmp-*"))
    assert len(partial) == (fault == "kill-save")
    if partial:  # the cut-off write went to its own file, never to last.pth
        assert 0 < partial[0].stat().st_size < (out / "last.pth").stat().st_size

    done = train(task, "--resume", f"out={out}")
    assert done.returncode == 0, done.stderr
    _assert_same_run(out, uninterrupted(task))


def test_sigkill_during_the_first_checkpoint_leaves_nothing_to_resume_from(tmp_path):
    out = tmp_path / "run"
    assert train_with_fault("classification", "kill-save", 1, *CLS, f"out={out}").returncode == -signal.SIGKILL
    assert not (out / "last.pth").exists()
    done = train("classification", "--resume", f"out={out}")
    assert done.returncode == 2
    assert "has no last.pth" in done.stderr and "--overwrite" in done.stderr


@pytest.mark.parametrize("task, fault, at, position", [
    ("classification", "term-step", 5, "step 2 of 3 in epoch 1"),  # inside an epoch
    ("classification", "int-step", 6, "epoch 1"),  # at an epoch's last step
    ("segmentation", "term-step", 3, "iteration 3"),  # between checkpoints
])
def test_a_signal_stops_politely_with_a_checkpoint_and_the_resume_command(tmp_path, uninterrupted, task, fault,
                                                                          at, position):
    out = tmp_path / "run"
    done = train_with_fault(task, fault, at, *SETTINGS[task], f"out={out}")
    signum = signal.SIGTERM if fault == "term-step" else signal.SIGINT
    assert done.returncode == 128 + signum, done.stderr
    assert f"stopped by {signal.Signals(signum).name} after {position}" in done.stderr
    assert f"python -m {MODULES[task]} --resume out={out}" in done.stderr
    assert "Traceback" not in done.stderr

    done = train(task, "--resume", f"out={out}")
    assert done.returncode == 0, done.stderr
    _assert_same_run(out, uninterrupted(task))


def test_a_second_ctrl_c_quits_at_once_with_one_message(tmp_path):
    out = tmp_path / "run"
    done = train_with_fault("classification", "int-twice", 5, *SETTINGS["classification"], f"out={out}")
    assert done.returncode == 130, done.stderr
    assert "stopped at once by a second Ctrl-C" in done.stderr and "Traceback" not in done.stderr
    assert f"python -m Classification.train --resume out={out}" in done.stderr
    # The epoch-end checkpoint before it is intact: the run continues from it.
    assert train("classification", "--resume", f"out={out}").returncode == 0


def _nan_at(module, monkeypatch, call):
    """Make the ``call``-th training step's loss NaN (its backward gives NaN gradients)."""
    real_step, calls = module.training_step, []

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            result.loss = result.loss * float("nan")
        return result
    monkeypatch.setattr(module, "training_step", step)


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_at(seg_train, monkeypatch, 3)
    assert seg_train.main([*SEG, f"out={out}"]) == 1
    error = capsys.readouterr().err
    assert "non-finite loss at iteration 3 (loss nan; loss_0 " in error
    assert f"the last good state is {out / 'last.pth'}" in error and "on_nonfinite=skip" in error
    assert load_checkpoint(out / "last.pth")["iteration"] == 2


def test_skipping_non_finite_steps_counts_them_and_keeps_the_weights_finite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_at(cls_train, monkeypatch, 2)
    assert cls_train.main([*CLS, "epochs=1", "on_nonfinite=skip", f"out={out}"]) == 0
    state = load_checkpoint(out / "last.pth")
    assert state["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert MetricsLog(out / "metrics.csv").rows()[0]["skipped_steps"] == 1
    assert '"skipped_steps": 1' in capsys.readouterr().out
