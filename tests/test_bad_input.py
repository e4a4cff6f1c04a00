"""Every kind of bad input to the command lines, as a table: one clear message on stderr naming
the problem (and the file, where there is one), a non-zero exit status, and the existing run
folder with its checkpoints left exactly as it was."""
import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from Classification import test as cls_test
from Classification import train as cls_train
from Detection import test as det_test
from Detection import train as det_train
from Segmentation import test as seg_test

TINY = ["model=resnet20", "data.name=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16",
        "data.workers=0", "batch_size=16", "device=cpu", "mode=afan", "epochs=1", "afan.steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny classification run to point bad input at."""
    out = tmp_path_factory.mktemp("existing") / "run"
    assert cls_train.main([*TINY, f"out={out}"]) == 0
    return out


def _image_folder(root: Path, classes, corrupt: bool = False) -> Path:
    """An ImageNet-style folder (train/ and val/, one sub-folder per class) of tiny JPEGs."""
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / split / name / f"{i}.JPEG")
    if corrupt:
        (root / "train" / classes[0] / "0.JPEG").write_bytes(b"\xff\xd8\xff not really a JPEG")
    return root


class _RunsCode:
    """Unpickling this calls ``os.system``: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _booby_trapped(marker: Path) -> bytes:
    """A checkpoint whose loading with plain pickle would create ``marker``."""
    buffer = io.BytesIO()
    torch.save({"model": {}, "epoch": 0, "payload": _RunsCode(marker)}, buffer)
    return buffer.getvalue()


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _damaged_copy(run: Path, tmp_path: Path, content: bytes = None) -> Path:
    """A copy of the run whose last.pth is cut in half (or replaced by ``content``)."""
    copy = tmp_path / "damaged"
    copy.mkdir()
    for name, data in _snapshot(run).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    last = copy / "last.pth"
    last.write_bytes(content if content is not None else last.read_bytes()[: last.stat().st_size // 2])
    return copy


# (id, how to build the arguments from (run folder, tmp_path), what the message must contain)
CASES = [
    ("unknown key", lambda r, t: ["--resume", f"out={r}", "epochz=3"], ["epochz", "epochs"]),
    ("misspelled section key", lambda r, t: ["--resume", f"out={r}", "afan.stepz=2"], ["afan.stepz", "afan.steps"]),
    ("wrong type", lambda r, t: ["--resume", f"out={r}", "epochs=three"], ["epochs", "three"]),
    ("negative steps", lambda r, t: ["--resume", f"out={r}", "afan.steps=-1"], ["afan.steps must be >= 0"]),
    ("negative eps", lambda r, t: ["--resume", f"out={r}", "afan.eps=-2"], ["afan.eps must be >= 0"]),
    ("negative gamma", lambda r, t: ["--resume", f"out={r}", "afan.gamma=-0.5"], ["afan.gamma must be >= 0"]),
    ("mask not of length n", lambda r, t: ["--resume", f"out={r}", "afan.n=3"], ["afan.mask", "3"]),
    ("split layer the model lacks", lambda r, t: ["--resume", f"out={r}", "afan.layer=layer9"],
     ["afan.layer='layer9'", "resnet20"]),
    ("missing data folder", lambda r, t: ["--resume", f"out={r}", "data.name=cifar10", f"data.root={t / 'none'}"],
     ["CIFAR-10 not found", "data.download=true"]),
    ("wrong data layout", lambda r, t: ["--resume", f"out={r}", "data.name=imagenet", f"data.root={t}"],
     ["train does not exist", "Expected layout"]),
    ("class count of data and checkpoint differ",
     lambda r, t: ["--resume", f"out={r}", "data.name=imagenet", f"data.root={_image_folder(t / 'in', ['a', 'b'])}",
                   "data.image_size=8", "batch_size=4"],
     ["last.pth does not fit", "fc.weight (file (6, 64), model (2, 64))", "class count"]),
    ("existing run without --resume", lambda r, t: [*TINY, f"out={r}"], ["already exists", "--resume", "--overwrite"]),
    ("unknown device", lambda r, t: ["--resume", f"out={r}", "device=tpu"], ["unknown device 'tpu'", "'cuda:N'"]),
    ("a GPU this machine lacks", lambda r, t: ["--resume", f"out={r}", "device=cuda:99"],
     ["device=cuda:99 was asked for", "device=auto"]),
    ("unknown model", lambda r, t: [*TINY, f"out={t / 'new'}", "model=resnet9000"], ["resnet9000", "resnet50"]),
    ("negative seed", lambda r, t: ["--resume", f"out={r}", "seed=-1"], ["seed=-1 is not valid", "[0, 2**32)"]),
    ("Shapes images too small", lambda r, t: ["--resume", f"out={r}", "data.image_size=4"],
     ["data.image_size=4", ">= 16"]),
    ("infinite learning rate", lambda r, t: ["--resume", f"out={r}", "optim.lr=.inf"], ["optim.lr", "finite float"]),
    ("not-a-number setting", lambda r, t: ["--resume", f"out={r}", "afan.gamma=.nan"], ["afan.gamma", "finite float"]),
    ("sync_bn without torchrun", lambda r, t: ["--resume", f"out={r}", "sync_bn=true"],
     ["sync_bn=true", "start it with torchrun, or set sync_bn=false"]),
    ("--resume with --overwrite", lambda r, t: ["--resume", "--overwrite", f"out={r}"], ["contradict"]),
    # Beyond the cases users reported:
    ("a config file that is not there", lambda r, t: ["--config", str(t / "nope.yaml"), f"out={t / 'new'}"],
     ["nope.yaml"]),
    ("a config file that is not YAML", lambda r, t: ["--config", str(_write(t / "bad.yaml", "epochs: [1,\n")),
                                                     f"out={t / 'new'}"], ["bad.yaml"]),
    ("a config file that is a list", lambda r, t: ["--config", str(_write(t / "list.yaml", "- 1\n- 2\n")),
                                                   f"out={t / 'new'}"], ["list.yaml", "mapping"]),
    ("an override without a value", lambda r, t: ["--resume", f"out={r}", "epochs"], ["epochs", "KEY=VALUE"]),
    ("a setting given a section", lambda r, t: ["--resume", f"out={r}", "afan=3"], ["afan"]),
    ("zero batch size", lambda r, t: ["--resume", f"out={r}", "batch_size=0"], ["batch_size"]),
    ("negative worker count", lambda r, t: ["--resume", f"out={r}", "data.workers=-1"], ["data.workers"]),
    ("unknown precision", lambda r, t: ["--resume", f"out={r}", "precision=fp8"], ["precision", "bf16"]),
    ("unknown mode", lambda r, t: ["--resume", f"out={r}", "mode=fgsm"], ["mode", "afan"]),
    ("mask of other characters", lambda r, t: ["--resume", f"out={r}", "afan.n=2", "afan.mask=0x"], ["afan.mask"]),
    ("an empty run folder name", lambda r, t: [*TINY, "out="], ["out= is empty", "out=runs/my_run"]),
    ("a run folder that is a file", lambda r, t: [*TINY, f"out={_write(t / 'file', 'x')}"], ["file"]),
    ("--resume of a folder with no run", lambda r, t: ["--resume", f"out={t / 'nothing'}"], ["nothing"]),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_training_input_gets_one_message_and_changes_nothing(run, tmp_path, capsys, make_args, expected):
    before = _snapshot(run)
    capsys.readouterr()
    assert cls_train.main(make_args(run, tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    for text in expected:
        assert text in error
    assert _snapshot(run) == before


@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
    (["--pgd-eps", "-1"], "argument --pgd-eps: '-1' is not a finite number >= 0"),
    (["--pgd-steps", "-2"], "argument --pgd-steps: '-2' is not an integer >= 0"),
    (["--seed", "x"], "argument --seed: 'x' is not an integer >= 0"),
])
def test_bad_test_script_arguments_are_refused(run, capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        cls_test.main(["--checkpoint", str(run / "best.pth"), *argv])
    assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_detection_test_refuses_a_negative_draw_count(capsys):
    with pytest.raises(SystemExit) as stop:
        det_test.main(["--checkpoint", "x.pth", "--draw", "-1"])
    assert stop.value.code == 2 and "'-1' is not an integer >= 0" in capsys.readouterr().err


def test_compare_without_its_data_is_one_message(tmp_path, capsys):
    from Classification import compare
    assert compare.main(["data.name=cifar10", f"data.root={tmp_path / 'none'}", f"--out={tmp_path / 'c'}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: CIFAR-10 not found") and "Traceback" not in error


def _failing_writes(monkeypatch, failure, after=0):
    """Every file ``afan_harness.checkpoint`` opens for writing fails with ``failure`` (an OSError)
    once ``after`` writes have succeeded, as on a full disk or a read-only folder; removing
    files fails too, as it does in a read-only folder."""
    import afan_harness.checkpoint
    calls = [0]

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            calls[0] += 1
            if calls[0] > after:
                raise failure
        return open(path, mode, *args, **kwargs)

    def fake_unlink(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(afan_harness.checkpoint, "open", fake_open, raising=False)
    monkeypatch.setattr(afan_harness.checkpoint.os, "unlink", fake_unlink)


def test_a_full_disk_is_one_message_that_keeps_the_last_checkpoint(run, tmp_path, capsys, monkeypatch):
    """The disk fills up while the second epoch's checkpoints are written: the first epoch's
    last.pth stays intact and the message says how to go on from it."""
    out = tmp_path / "run"
    assert cls_train.main([*TINY, f"out={out}"]) == 0  # one finished epoch
    capsys.readouterr()
    before = _snapshot(out)
    _failing_writes(monkeypatch, OSError(28, "No space left on device"), after=1)  # config.yaml still fits
    assert cls_train.main(["--resume", f"out={out}", "epochs=2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: [Errno 28] No space left on device: cannot write {out}") and "Traceback" not in error
    assert ".pth; the file there before (if any) is intact" in error
    assert f"make room (or choose a writable out=), then continue from the last checkpoint: " \
           f"python -m Classification.train --resume out={out}" in error
    assert (out / "last.pth").read_bytes() == before[Path("last.pth")]


def test_a_read_only_run_folder_is_one_message_naming_the_first_failure(tmp_path, capsys, monkeypatch):
    out = tmp_path / "read-only"
    out.mkdir()
    _failing_writes(monkeypatch, PermissionError(13, "Permission denied"))
    assert cls_train.main([*TINY, f"out={out}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: [Errno 13] Permission denied: cannot write {out / 'config.yaml'}")
    assert error.count("error:") == 1 and "then start the run again" in error
    assert not any(out.iterdir())


@pytest.mark.parametrize("content, expected", [
    (None, "the file may be truncated"),  # cut in half
    (b"not a checkpoint at all", "not a PyTorch checkpoint"),
    ("booby-trapped", "would execute code from the file (it asks for posix.system)"),
])
def test_a_damaged_last_checkpoint_is_named_and_kept(run, tmp_path, capsys, content, expected):
    marker = tmp_path / "code-ran"
    if content == "booby-trapped":
        content = _booby_trapped(marker)
    damaged = _damaged_copy(run, tmp_path, content)
    before = _snapshot(damaged)
    assert cls_train.main(["--resume", f"out={damaged}"]) == 2
    error = capsys.readouterr().err
    assert f"{damaged / 'last.pth'}" in error and expected in error
    assert _snapshot(damaged) == before
    assert not marker.exists()


def test_a_corrupt_image_is_named(tmp_path, capsys):
    root = _image_folder(tmp_path / "in", ["a", "b"], corrupt=True)
    settings = ["model=resnet20", "data.name=imagenet", f"data.root={root}", "data.image_size=8", "data.workers=0",
                "batch_size=4", "device=cpu", "epochs=1", f"out={tmp_path / 'run'}"]
    assert cls_train.main(settings) == 2
    error = capsys.readouterr().err
    assert f"cannot read image {root / 'train' / 'a' / '0.JPEG'}" in error and "replace this file" in error


def test_overwrite_with_a_corrupt_image_keeps_the_old_run(run, tmp_path, capsys):
    """The data are checked before --overwrite deletes anything."""
    copy = _damaged_copy(run, tmp_path, (run / "last.pth").read_bytes())  # an intact copy
    before = _snapshot(copy)
    root = _image_folder(tmp_path / "in", ["a", "b"], corrupt=True)
    assert cls_train.main([*TINY, "data.name=imagenet", f"data.root={root}", "data.image_size=8", "batch_size=4",
                           f"out={copy}", "--overwrite"]) == 2
    assert f"cannot read image {root / 'train' / 'a' / '0.JPEG'}" in capsys.readouterr().err
    assert _snapshot(copy) == before


def test_a_malformed_annotation_file_is_named(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "val2017").mkdir()
    bad = root / "annotations" / "instances_train2017.json"
    bad.write_text('{"images": [')
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    assert det_train.main(["data.name=coco", f"data.root={root}", "device=cpu", f"out={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert f"the annotation file {bad} is not valid JSON" in error
    assert not (tmp_path / "run").exists()


def test_detection_settings_out_of_range(tmp_path, capsys):
    for setting, text in [("afan.se_layer=layer7", "afan.se_layer"), ("afan.n=2", "afan.mask"),
                          ("afan.gamma_sd=-1", "afan.gamma_sd must be >= 0"), ("eval_every=-1", "eval_every must be >= 0"),
                          (f"model.backbone_weights={tmp_path / 'none.pth'}", "none.pth"),
                          ("model.name=fasterrcnn_resnet34_fpn", "fasterrcnn_resnet50_c4")]:
        assert det_train.main(["--config", "Detection/configs/shapes_afan.yaml", setting,
                               f"out={tmp_path / 'run'}"]) == 2
        assert text in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tester", [cls_test, det_test, seg_test], ids=["classification", "detection", "segmentation"])
@pytest.mark.parametrize("kind", ["truncated", "not a checkpoint", "another architecture", "booby-trapped"])
def test_every_test_script_names_a_bad_checkpoint_file(run, tmp_path, capsys, tester, kind):
    path = tmp_path / "model.pth"
    if kind == "truncated":
        data = (run / "best.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not a checkpoint":
        path.write_text("weights: none\n")
    elif kind == "another architecture":  # a plain state dict of a small conv net, for every task's model
        torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "head.weight": torch.zeros(2, 4)}, path)
    else:
        path.write_bytes(_booby_trapped(tmp_path / "code-ran"))
    model = {cls_test: "resnet56", det_test: "fasterrcnn_resnet18_fpn", seg_test: "deeplabv3plus_mobilenet"}[tester]
    assert tester.main(["--checkpoint", str(path), "--model", model, "--device", "cpu", "data.name=shapes"]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "Traceback" not in error
    expected = {"truncated": "truncated", "not a checkpoint": "not a PyTorch checkpoint",
                "another architecture": "missing keys", "booby-trapped": "would execute code"}[kind]
    assert expected in error
    if kind == "another architecture":
        assert "unexpected keys (2): conv.weight, head.weight" in error
    assert not (tmp_path / "code-ran").exists()
