"""The example a user copies, run as they would run it: on Shapes and on an ImageFolder."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # training processes: the quick tier leaves them out

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_timm_afan.py"


def run(*args):
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return re.findall(r"epoch (\d+): loss ([\d.]+), training accuracy ([\d.]+)", done.stdout)


def test_the_timm_example_trains_on_shapes():
    epochs = run("--epochs", "2", "--images", "64")
    assert [e[0] for e in epochs] == ["1", "2"] and all(0 <= float(e[2]) <= 1 for e in epochs)


def test_the_timm_example_trains_on_an_image_folder(tmp_path):
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (40, 48), colour).save(tmp_path / name / f"{i}.png")
    epochs = run("--folder", str(tmp_path), "--model", "resnet10t", "--epochs", "1")
    assert len(epochs) == 1 and float(epochs[0][1]) > 0
