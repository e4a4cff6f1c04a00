"""Detection training and testing on tiny Shapes data: every mode, resume, test.py, configs."""
import json
from pathlib import Path

import pytest

from afan.config import ConfigError, load_config
from Detection import test as det_test
from Detection import train as det_train
from Detection.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "Detection" / "configs"


@pytest.fixture
def tiny(tmp_path):
    return ["model.name=fasterrcnn_resnet18_fpn", "model.min_size=64", "model.max_size=64",
            "model.roi_batch_size=16", "data.name=shapes", "data.image_size=64", "data.train_size=8",
            "data.val_size=4", f"data.root={tmp_path / 'data'}", "data.workers=0", "batch_size=2",
            "log_every=1", "draw_images=1", "device=cpu", "afan.n=2", "afan.mask=01", "optim.warmup_iters=1"]


@pytest.mark.parametrize("mode", ["base", "afan", "advprop"])
def test_a_few_iterations_of_each_mode(tmp_path, tiny, mode, capsys):
    extra = ["model.norm=bn"] if mode == "advprop" else []
    cfg = load_config(TrainConfig, overrides=[*tiny, f"mode={mode}", "iterations=2", f"out={tmp_path / 'run'}", *extra])
    summary = det_train.run(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pth", "final.pth", "summary.json",
                 "per_class_ap.csv", "predictions/000.png"):
        assert (out / name).is_file(), name
    assert json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1]) == summary
    assert 0 <= summary["mAP"] <= 1 and "AP50" in summary
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "loss_classifier" in rows[0]
    if mode == "afan":
        assert "se_linf" in rows[0] and "sd_linf" in rows[0] and "loss_sd" in rows[0]


def test_resume_equals_an_uninterrupted_run(tiny, check_resume):
    settings = [*tiny, "mode=afan", "iterations=4", "checkpoint_every=2", "deterministic=true"]
    check_resume(det_train, settings)


def test_test_script_reproduces_the_training_evaluation(tmp_path, tiny, capsys):
    summary = det_train.run(load_config(TrainConfig, overrides=[*tiny, "iterations=2", f"out={tmp_path / 'run'}"]))
    capsys.readouterr()
    data = [o for o in tiny if o.startswith("data.")]
    assert det_test.main(["--checkpoint", str(tmp_path / "run" / "final.pth"), "--device", "cpu",
                          "--out", str(tmp_path / "eval"), *data]) == 0
    result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert result["mAP"] == pytest.approx(summary["mAP"]) and result["AP"] == pytest.approx(summary["AP"])
    assert (tmp_path / "eval" / "per_class_ap.csv").is_file()


def test_configs_match_the_released_settings():
    voc = load_config(TrainConfig, CONFIGS / "voc07_resnet50_afan.yaml")
    assert (voc.batch_size, voc.optim.lr, voc.optim.steps, voc.iterations) == (8, 0.008, [6250, 8750], 11250)
    a = voc.afan
    assert (a.se_layer, a.se_steps, a.gamma_se, a.n, a.mask, a.sd, a.gamma_sd, a.w, a.only_roi) == \
        ("layer2", 1, 1.0, 4, "0011", True, 0.1, 0.3, True)
    coco = load_config(TrainConfig, CONFIGS / "coco_resnet50_afan.yaml")
    assert (coco.model.min_size, coco.model.max_size, coco.model.anchor_sizes) == (800, 1333, [64, 128, 256, 512])
    assert (coco.optim.lr, coco.optim.weight_decay, coco.optim.steps, coco.iterations) == \
        (0.01, 1e-4, [120000, 160000], 180000)
    assert coco.afan.gamma_se == 0.1
    for path in CONFIGS.glob("*.yaml"):
        assert load_config(TrainConfig, path).out.endswith(path.stem.replace("shapes", "shapes_det")), path


def test_bad_settings_are_refused(tmp_path, tiny, capsys):
    with pytest.raises(ConfigError, match="model.norm=bn"):
        load_config(TrainConfig, overrides=["mode=advprop"])
    assert det_train.main([*tiny, "data.name=voc07", f"data.root={tmp_path / 'none'}", f"out={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "VOCdevkit" in err and "shapes_base.yaml" in err
    assert not (tmp_path / "r").exists()
