"""Segmentation training and testing on tiny Shapes data: every mode, resume, evaluation during
training, sliding-window inference, test.py (also on a DeepLabV3Plus-Pytorch file), configs."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from afan.checkpoint import load_checkpoint
from afan.config import load_config
from Segmentation import test as seg_test
from Segmentation import train as seg_train
from Segmentation.config import EvalConfig, TrainConfig
from Segmentation.evaluation import predict, window_starts
from Segmentation.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "Segmentation" / "configs"
TINY = ["model.name=deeplabv3plus_mobilenet", "data.name=shapes", "data.image_size=32", "data.train_size=8",
        "data.val_size=4", "data.crop_size=0", "data.scale_range=[1.0,1.0]", "data.workers=0", "batch_size=2", "log_every=1", "device=cpu",
        "eval.batch_size=2", "eval.save_images=1"]


@pytest.mark.parametrize("mode,extra", [("base", []), ("afan", []), ("afan", ["afan.aux_bn=true"]), ("advprop", [])])
def test_a_few_iterations_of_each_mode(tmp_path, mode, extra, capsys):
    cfg = load_config(TrainConfig, overrides=[*TINY, f"mode={mode}", "iterations=2", f"out={tmp_path}/run", *extra])
    summary = seg_train.run(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pth", "final.pth", "summary.json",
                 "per_class_iou.csv", "pred_0.png"):
        assert (out / name).is_file(), name
    assert json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1]) == summary
    assert 0 <= summary["miou"] <= 1 and 0 <= summary["pixel_acc"] <= 1
    with Image.open(out / "pred_0.png") as picture:
        assert picture.size == (3 * 32, 32)  # image | ground truth | prediction
    header = (out / "metrics.csv").read_text().splitlines()[0]
    if mode == "afan":
        assert all(k in header for k in ("loss_1", "loss_2", "loss_sd", "se_linf", "sd_linf"))
    if mode == "advprop":
        assert "pixel_linf" in header and "loss_adv" in header
    final = load_checkpoint(out / "final.pth")["model"]
    assert not any(".aux_bn." in k for k in final)  # deployable: plain BatchNorm


def test_resume_equals_an_uninterrupted_run(check_resume):
    settings = [*TINY, "mode=afan", "iterations=4", "checkpoint_every=2", "deterministic=true"]
    check_resume(seg_train, settings)


def test_evaluation_during_training_keeps_the_best_model(tmp_path):
    cfg = load_config(TrainConfig, overrides=[*TINY, "iterations=4", "eval_every=2", f"out={tmp_path}/run"])
    summary = seg_train.run(cfg)
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("val_miou")
    logged = [float(r[column]) for r in rows[1:] if r[column]]
    assert len(logged) == 2
    best = load_checkpoint(tmp_path / "run" / "best.pth")
    assert best["miou"] == pytest.approx(max(logged)) and summary["best_miou"] >= max(logged)


def test_lr_follows_the_poly_schedule_with_a_slower_backbone():
    cfg = load_config(TrainConfig, overrides=["optim.lr=0.1", "optim.backbone_lr_factor=0.1", "optim.power=0.9"])
    model = create_model("deeplabv3plus_mobilenet", 3)
    optimizer = seg_train.make_optimizer(model, cfg.optim)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.1])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert seg_train.lr_factor(500, 1000, cfg.optim) == pytest.approx(0.5 ** 0.9)


def test_sliding_windows_cover_the_image_and_agree_with_whole_for_a_pointwise_model():
    assert window_starts(10, 16, 8) == [0]
    assert window_starts(40, 16, 10) == [0, 10, 20, 24]
    model = nn.Conv2d(3, 5, 1)  # every pixel on its own: windows cannot change the logits
    images = torch.rand(2, 3, 37, 50)
    whole = predict(model, images, 5, EvalConfig(mode="whole"))
    sliding = predict(model, images, 5, EvalConfig(mode="sliding", crop=16, stride=11))
    assert torch.equal(whole, sliding)


def test_test_script_reproduces_the_training_evaluation(tmp_path, capsys):
    summary = seg_train.run(load_config(TrainConfig, overrides=[*TINY, "iterations=2", f"out={tmp_path}/run"]))
    capsys.readouterr()
    settings = [o for o in TINY if o.startswith(("data.", "eval."))]
    assert seg_test.main(["--checkpoint", str(tmp_path / "run" / "final.pth"), "--device", "cpu",
                          "--out", str(tmp_path / "eval"), *settings]) == 0
    result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert result["miou"] == pytest.approx(summary["miou"]) and result["pixel_acc"] == pytest.approx(summary["pixel_acc"])
    assert (tmp_path / "eval" / "per_class_iou.csv").read_text().count("\n") == 8  # header + 7 classes


def test_test_script_reads_deeplabv3plus_pytorch_files_and_reports_bad_input(tmp_path, capsys):
    model = create_model("deeplabv3plus_mobilenet", 7)
    torch.save({"model_state": model.state_dict(), "cur_itrs": 10}, tmp_path / "vainf.pth")
    settings = [o for o in TINY if o.startswith(("data.", "eval."))]
    assert seg_test.main(["--checkpoint", str(tmp_path / "vainf.pth"), "--device", "cpu", *settings]) == 0
    assert seg_test.main(["--checkpoint", str(tmp_path / "vainf.pth"), "data.name=voc12",
                          f"data.root={tmp_path}/nothing"]) == 2
    assert "VOC" in capsys.readouterr().err
    assert seg_test.main(["--checkpoint", str(tmp_path / "vainf.pth"), "iterations=3"]) == 2
    assert "only data.KEY=VALUE and eval.KEY=VALUE" in capsys.readouterr().err


def test_missing_data_names_the_shapes_command(tmp_path, capsys):
    assert seg_train.main(["--config", str(CONFIGS / "voc12_resnet50_afan.yaml"), f"data.root={tmp_path}",
                           f"out={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "VOCdevkit" in err and "shapes_afan.yaml" in err


def test_configs_match_the_released_settings():
    voc = load_config(TrainConfig, CONFIGS / "voc12_resnet50_afan.yaml")
    assert (voc.mode, voc.model.name, voc.model.output_stride, voc.batch_size) == ("afan", "deeplabv3plus_resnet50", 16, 4)
    assert (voc.data.name, voc.data.crop_size, voc.data.scale_range) == ("voc12", 513, [0.5, 2.0])
    a = voc.afan
    assert (a.se_layer, a.gamma_se, a.n, a.mask, a.sd, a.gamma_sd, a.w) == ("layer3", 0.01, 2, "11", True, 0.4, 0.3)
    base = load_config(TrainConfig, CONFIGS / "voc12_resnet50_base.yaml")
    assert base.mode == "base" and base.optim == voc.optim and base.iterations == voc.iterations == 30000
    city = load_config(TrainConfig, CONFIGS / "cityscapes_resnet50_afan.yaml")
    assert (city.data.name, city.data.crop_size, city.batch_size) == ("cityscapes", 768, 16)
    for mode in ("base", "afan", "advprop"):
        shapes = load_config(TrainConfig, CONFIGS / f"shapes_{mode}.yaml")
        assert shapes.mode == mode and shapes.data.name == "shapes"
