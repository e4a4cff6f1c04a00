"""Every command in the READMEs' code blocks, run as a user would: from the folder it names,
in a copy of the repository, with its output checked.

A block after "Run from this folder" runs in its task folder, every other block in the
repository root. Commands that train on the built-in data get small sizes appended (the
READMEs say extra arguments pass through), so the whole file takes a few minutes; commands
for data sets, weights or GPUs this machine lacks must end with one ``error:`` line and exit
status 2. The few that cannot run here (downloads, several GPUs or machines, minutes-long
timing runs) are listed with the reason, and a README command missing from this file fails
the test, so a new command cannot go untested.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # training processes: the quick tier leaves them out

ROOT = Path(__file__).resolve().parents[1]

CLS_TINY = "epochs=1 data.train_size=64 data.val_size=32 data.test_size=32 batch_size=32 afan.steps=1"
DET_TINY = ("iterations=2 eval_every=0 data.train_size=4 data.val_size=2 data.image_size=64 model.min_size=64 "
            "model.max_size=64 batch_size=2 draw_images=1")
SEG_TINY = ("iterations=2 eval_every=0 data.train_size=4 data.val_size=2 data.image_size=32 data.crop_size=0 "
            "batch_size=2 eval.save_images=1")

MISSING = ("missing", None)  # exit status 2 with one error: line (data, file or run not here)
DONE = ("done", None)  # exit status 0

# README -> {command: (what is appended, expectation)}; expectation is MISSING, DONE, or a
# ("skip", reason).
COMMANDS = {
    "README.md": {
        "make test": ("", ("skip", "it is this test suite")),
        "make demo": ("", ("skip", "python -m Classification.compare, run below with small sizes")),
        "torchrun --nproc_per_node 4 -m Segmentation.train --config Segmentation/configs/voc12_resnet50_afan.yaml":
            ("", ("skip", "needs 4 GPUs")),
        "torchrun --nnodes 2 --node_rank 0 --master_addr HOST0 --master_port 29500 --nproc_per_node 8 "
        "-m Detection.train --config Detection/configs/coco_resnet50_afan.yaml": ("", ("skip", "needs 2 machines")),
        "torchrun --nproc_per_node 2 -m Classification.train --config Classification/configs/shapes_afan.yaml device=cpu":
            (CLS_TINY + " out=runs/torchrun_shapes", DONE),
        "python -m bench": ("", ("skip", "times every task at full size for many minutes")),
        "python -m bench --device cpu --tasks classification --repeats 10": ("", ("skip", "a timing run of minutes")),
        "python -m bench --tiny": ("--tasks classification --warmup 0 --repeats 1", DONE),
        "python -m bench --precision bf16": ("", ("skip", "times every task at full size for many minutes")),
    },
    "Classification/README.md": {
        "bash cmd/run_base.sh": ("", MISSING),
        "bash cmd/run_perturb.sh": ("", MISSING),
        "bash cmd/run_perturb.sh data.download=true": ("", ("skip", "downloads CIFAR-10")),
        "bash cmd/run_perturb.sh --config configs/shapes_afan.yaml": (CLS_TINY, DONE),
        "bash cmd/run_test.sh --checkpoint AFAN_resnet56.pth.tar": ("", MISSING),
        "bash cmd/run_test.sh --checkpoint runs/shapes_afan/best.pth --pgd-eps 2": ("", DONE),
        "python -m Classification.train --resume out=runs/cifar10_resnet56_afan": ("", MISSING),
        "python -m Classification.compare": (CLS_TINY, DONE),
    },
    "Detection/README.md": {
        "bash cmd/run_base.sh": ("", MISSING),
        "bash cmd/run_perturb.sh": ("", MISSING),
        "bash cmd/run_perturb.sh --config configs/voc07_resnet50_afan_setting3.yaml": ("", MISSING),
        "bash cmd/run_perturb.sh --config configs/coco_resnet50_afan.yaml": ("", MISSING),
        "bash cmd/run_perturb.sh --config configs/shapes_afan.yaml": (DET_TINY, DONE),
        "bash cmd/run_test.sh --checkpoint runs/voc07_resnet50_afan/final.pth": ("", MISSING),
        "python -m Detection.train --resume out=runs/voc07_resnet50_afan": ("", MISSING),
        "python -m Detection.train --config Detection/configs/shapes_base.yaml": (DET_TINY, DONE),
        "python -m Detection.train --config Detection/configs/shapes_afan.yaml": (DET_TINY, DONE),
    },
    "Segmentation/README.md": {
        "mkdir -p weights": ("", ("skip", "prepares the download below")),
        "curl -L -o weights/resnet50-0676ba61.pth https://download.pytorch.org/models/resnet50-0676ba61.pth":
            ("", ("skip", "a download")),
        "curl -L -o weights/resnet101-63fe2227.pth https://download.pytorch.org/models/resnet101-63fe2227.pth":
            ("", ("skip", "a download")),
        "bash cmd/run_base.sh": ("", MISSING),
        "bash cmd/run_perturb.sh": ("", MISSING),
        "bash cmd/run_perturb.sh --config configs/cityscapes_resnet50_afan.yaml": ("", MISSING),
        "bash cmd/run_perturb.sh --config configs/shapes_afan.yaml": (SEG_TINY, DONE),
        "bash cmd/run_test.sh --checkpoint runs/voc12_resnet50_afan/final.pth": ("", MISSING),
        "bash cmd/run_test.sh --checkpoint best_deeplabv3plus_resnet50_voc_os16.pth data.name=voc12 eval.mode=sliding":
            ("", MISSING),
        "python -m Segmentation.train --resume out=runs/voc12_resnet50_afan": ("", MISSING),
        "python -m Segmentation.train --config Segmentation/configs/shapes_base.yaml": (SEG_TINY, DONE),
        "python -m Segmentation.train --config Segmentation/configs/shapes_afan.yaml": (SEG_TINY, DONE),
    },
}


def readme_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """``(folder, commands)`` of each ```bash block: the task folder for a block after "Run
    from this folder", else the repository root; continuation lines joined, comments dropped."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        before = text[:match.start()].strip().rsplit("\n\n", 1)[-1]  # the paragraph above
        folder = path.parent if "Run from this folder" in before else ROOT
        joined = match.group(1).replace("\\\n", " ")
        commands = [" ".join(line.split("#", 1)[0].split()) for line in joined.splitlines()]
        blocks.append((folder, [c for c in commands if c]))
    return blocks


def test_every_readme_command_is_listed_here():
    for readme, expected in COMMANDS.items():
        found = [c for _, commands in readme_blocks(ROOT / readme) for c in commands]
        assert sorted(set(found)) == sorted(expected), readme


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the repository's files (no .venv, runs or data), as on a fresh clone."""
    copy = tmp_path_factory.mktemp("clone") / "afan"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "weights",
                                                               "__pycache__", "*.egg-info", ".pytest_cache"))
    return copy


def run_readme(readme: str, checkout: Path):
    """Run ``readme``'s commands in order in ``checkout`` and check each one's outcome."""
    env = {**os.environ, "PYTHON": sys.executable, "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for folder, commands in readme_blocks(ROOT / readme):
        cwd = checkout / folder.relative_to(ROOT)
        for command in commands:
            extra, (outcome, reason) = COMMANDS[readme][command]
            if outcome == "skip":
                continue
            line = command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ", 1)
            line = re.sub(r"^python ", f"{sys.executable} ", line)
            done = subprocess.run(f"{line} {extra}", shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=600)
            where = f"{command!r} in {cwd.relative_to(checkout) or '.'}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, where
            if outcome == "done":
                assert done.returncode == 0, where
            else:
                assert done.returncode == 2, where
                errors = [text for text in done.stderr.splitlines() if text.startswith("error:")]
                assert len(errors) == 1, where
            yield command, done


def summary(done) -> dict:
    return json.loads(done.stdout.split("SUMMARY ", 1)[1].splitlines()[0])


def test_classification_readme(checkout):
    results = dict(run_readme("Classification/README.md", checkout))
    assert "data.download=true" in results["bash cmd/run_base.sh"].stderr
    tested = summary(results["bash cmd/run_test.sh --checkpoint runs/shapes_afan/best.pth --pgd-eps 2"])
    trained = json.loads((checkout / "Classification/runs/shapes_afan/summary.json").read_text())
    assert tested["top1"] == pytest.approx(trained["test_acc"])  # its run's test set, no extra arguments
    assert 0 <= tested["pgd_top1"] <= tested["top1"]
    assert (checkout / "Classification/runs/compare/base_vs_afan.png").is_file()


def test_detection_readme(checkout):
    results = dict(run_readme("Detection/README.md", checkout))
    assert "VOCdevkit" in results["bash cmd/run_base.sh"].stderr
    assert "instances_train2017.json" in results["bash cmd/run_perturb.sh --config configs/coco_resnet50_afan.yaml"].stderr
    for run in ("Detection/runs/shapes_det_afan", "runs/shapes_det_base", "runs/shapes_det_afan"):
        assert (checkout / run / "detections.json").is_file(), run


def test_segmentation_readme(checkout):
    results = dict(run_readme("Segmentation/README.md", checkout))
    assert "VOCdevkit/VOC2012" in results["bash cmd/run_base.sh"].stderr
    for run in ("Segmentation/runs/shapes_seg_afan", "runs/shapes_seg_base", "runs/shapes_seg_afan"):
        assert (checkout / run / "final.pth").is_file(), run


def test_top_level_readme(checkout):
    results = dict(run_readme("README.md", checkout))
    assert "classification" in results["python -m bench --tiny"].stdout
    assert (checkout / "runs/torchrun_shapes/best.pth").is_file()


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    """The ```python blocks of the READMEs, run in order in one namespace, as a reader would
    paste them, and what they build checked. The file the segmentation snippet loads is a
    DeepLabV3Plus-Pytorch checkpoint (``{"model_state": ...}``) of random weights."""
    import torch
    from Segmentation.models import create_model

    monkeypatch.chdir(tmp_path)
    torch.save({"model_state": create_model("deeplabv3plus_resnet50", num_classes=21, output_stride=16).state_dict()},
               "best_deeplabv3plus_resnet50_voc_os16.pth")
    namespaces = {readme: {} for readme in COMMANDS}  # one per README: each reads on its own
    for readme, namespace in namespaces.items():
        text = (ROOT / readme).read_text(encoding="utf-8")
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            exec(compile(block, readme, "exec"), namespace)
    import afan

    assert not namespaces["Segmentation/README.md"]["model"].training
    namespace = namespaces["README.md"]

    assert torch.isfinite(namespace["loss"]) and namespace["loss"].requires_grad
    assert not any(isinstance(m, afan.AuxBatchNorm2d) for m in namespace["deployable"].modules())
    assert namespace["deployable"].state_dict().keys() == namespace["model"].state_dict().keys()
    assert torch.equal(namespace["tail"](namespace["head"](namespace["x"])), namespace["model"](namespace["x"]))
