import os
from collections import OrderedDict

import pytest
import torch

from afan_harness.checkpoint import (CheckpointError, atomic_open, load_checkpoint, resolve_architecture, resolve_num_classes,
                             save_checkpoint)


def plant_marker(path):
    """What the malicious checkpoint tries to run while being unpickled."""
    with open(path, "w") as file:
        file.write("code ran")


class Malicious:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (plant_marker, (self.marker,))


@pytest.fixture
def checkpoint():
    return {
        "model": OrderedDict(weight=torch.randn(4, 3), bias=torch.zeros(4)),
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 7,
        "best_acc": 93.5,
        "name": "afan",
    }


def test_round_trip(tmp_path, checkpoint):
    path = tmp_path / "deep" / "folder" / "last.pth"  # parents are created
    save_checkpoint(checkpoint, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 7 and loaded["best_acc"] == 93.5 and loaded["name"] == "afan"
    assert torch.equal(loaded["model"]["weight"], checkpoint["model"]["weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2))
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert os.listdir(path.parent) == ["last.pth"]


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2


def test_crash_while_writing_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def crash_midway(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]  # no temporary file left behind


def test_crash_at_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]


def test_atomic_open_text(tmp_path):
    path = tmp_path / "notes.txt"
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write("hello")
    assert path.read_text() == "hello"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope.pth")
    assert "nope.pth" in str(info.value)
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, checkpoint, legacy):
    path = tmp_path / "last.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"epoch: 3\nthis is not a checkpoint\n", bytes(range(256))])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_saved_object_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(path)


def test_legacy_format_loads(tmp_path, checkpoint):
    # The original 2021 release saved with PyTorch < 1.6, i.e. the non-zip format.
    path = tmp_path / "old.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["epoch"] == 7


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_file_is_refused_without_running_code(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"epoch": 1, "payload": Malicious(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "execute code" in message and "not loaded" in message
    assert "plant_marker" in message
    assert not marker.exists()
    # The file really is malicious: an unsafe load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def _known(name):
    if name not in ("small", "large"):
        raise ValueError(f"unknown model {name!r}; choose small or large")


def test_resolve_architecture_agrees_with_the_file_or_says_what_to_pass():
    assert resolve_architecture("f.pth", None, "small", _known, ["small", "large"]) == "small"
    assert resolve_architecture("f.pth", "large", None, _known, ["small", "large"]) == "large"
    with pytest.raises(CheckpointError, match="f.pth holds a small model, not the requested large"):
        resolve_architecture("f.pth", "large", "small", _known, ["small", "large"])
    with pytest.raises(CheckpointError, match=r"f.pth does not say which architecture.*--model NAME on the command line, name= in Python; one of small, large\)"):
        resolve_architecture("f.pth", None, None, _known, ["small", "large"])
    with pytest.raises(CheckpointError, match="f.pth: unknown model 'tiny'"):
        resolve_architecture("f.pth", None, "tiny", _known, ["small", "large"])


def test_resolve_num_classes_reads_the_classifier_and_checks_the_request():
    weight = torch.zeros(7, 16)
    assert resolve_num_classes("f.pth", None, None, weight) == 7
    assert resolve_num_classes("f.pth", None, 5, weight) == 5  # what the file declares wins
    assert resolve_num_classes("f.pth", 3, None, None) == 3
    assert resolve_num_classes("f.pth", None, None, None) is None
    with pytest.raises(CheckpointError, match="f.pth holds a model for 7 classes, but num_classes=3 was asked for"):
        resolve_num_classes("f.pth", 3, None, weight)
