"""Segmentation training and testing on tiny Shapes data: every mode, resume, evaluation during
training, the poly schedule and its floor, sliding-window inference, test.py (also on a
DeepLabV3Plus-Pytorch file), bad backbone weights, the released configs end to end on tiny
fixtures."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import mobilenet_v2

from afan_harness.checkpoint import load_checkpoint
from afan_harness.config import load_config
from Segmentation import test as seg_test
from Segmentation import train as seg_train
from Segmentation.config import EvalConfig, OptimConfig, TrainConfig
from Segmentation.evaluation import predict, window_starts
from Segmentation.models import create_model
from test_seg_data import make_cityscapes, make_voc  # the on-disk fixtures

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
        assert picture.width >= 3 * 256 and picture.width > 2 * picture.height  # enlarged, three panels
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


def test_lr_is_the_poly_schedule_with_a_floor_and_a_slower_backbone():
    """DeepLabV3Plus-Pytorch's PolyLR: each group at max(base * (1 - it / its) ** 0.9, min_lr)."""
    assert OptimConfig().min_lr == 1e-6
    cfg = load_config(TrainConfig, overrides=["optim.lr=0.1", "optim.backbone_lr_factor=0.1", "optim.power=0.9",
                                              "optim.min_lr=1e-4"])
    model = create_model("deeplabv3plus_mobilenet", 3)
    optimizer = seg_train.make_optimizer(model, cfg.optim)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.1])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = seg_train.make_scheduler(optimizer, 1000, cfg.optim)
    rates = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(1000):  # a run of 1000 iterations steps the schedule 1000 times
        optimizer.step()
        scheduler.step()
        rates.append([g["lr"] for g in optimizer.param_groups])
    assert rates[500] == pytest.approx([0.01 * 0.5 ** 0.9, 0.1 * 0.5 ** 0.9])
    assert rates[990] == pytest.approx([0.01 * 0.01 ** 0.9, 0.1 * 0.01 ** 0.9])
    assert rates[999] == pytest.approx([1e-4, 0.1 * 0.001 ** 0.9])  # the backbone's is floored first
    assert rates[1000] == pytest.approx([1e-4, 1e-4])
    assert all(min(r) >= 1e-4 for r in rates)
    assert seg_train.lr_factor(500, 1000, cfg.optim) == pytest.approx(0.5 ** 0.9)


def test_a_group_at_rate_zero_stays_at_zero():
    cfg = OptimConfig(backbone_lr_factor=0.0)
    optimizer = seg_train.make_optimizer(create_model("deeplabv3plus_mobilenet", 3), cfg)
    scheduler = seg_train.make_scheduler(optimizer, 10, cfg)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, cfg.min_lr]


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
    # No data or evaluation settings: the run's own (its config.yaml beside the checkpoint).
    assert seg_test.main(["--checkpoint", str(tmp_path / "run" / "final.pth"), "--device", "cpu",
                          "--out", str(tmp_path / "eval")]) == 0
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
    assert "a test takes only data.KEY=VALUE, eval.KEY=VALUE" in capsys.readouterr().err


def test_missing_data_names_the_shapes_command(tmp_path, capsys):
    assert seg_train.main(["--config", str(CONFIGS / "voc12_resnet50_afan.yaml"), f"data.root={tmp_path}",
                           "model.backbone_weights=", f"out={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "VOCdevkit" in err and "shapes_afan.yaml" in err


def _bad_weights(path, problem):
    if problem == "foreign":  # another architecture's ImageNet weights
        torch.save(mobilenet_v2().state_dict(), path)
    elif problem == "truncated":  # a download cut short
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("problem,message", [
    ("missing", "does not exist; download https://download.pytorch.org/models/resnet50-0676ba61.pth "
                r"\(torchvision's ResNet50_Weights.IMAGENET1K_V1\) to that path"),
    ("foreign", "is not a torchvision ImageNet backbone for deeplabv3plus_resnet50"),
    ("truncated", "resnet50-0676ba61.pth"),
])
def test_bad_backbone_weights_end_with_one_error(tmp_path, capsys, problem, message):
    """A released config names weights/resnet50-0676ba61.pth: a missing, foreign or truncated
    file there stops the run with one line and exit status 2, before any run folder exists."""
    weights = tmp_path / "weights" / "resnet50-0676ba61.pth"
    weights.parent.mkdir()
    _bad_weights(weights, problem)
    shapes = ["data.name=shapes", "data.image_size=32", "data.train_size=2", "data.val_size=2", "data.crop_size=0",
              "data.scale_range=[1.0,1.0]", "data.workers=0", "device=cpu"]
    assert seg_train.main(["--config", str(CONFIGS / "voc12_resnet50_afan.yaml"), f"model.backbone_weights={weights}",
                           *shapes, f"out={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ["voc12_resnet50_afan.yaml", "cityscapes_resnet50_afan.yaml"])
def test_a_released_config_trains_and_evaluates(tmp_path, config, capsys):
    """The released settings end to end (A-FAN as released, crop_val on VOC, SD at concat
    with mixing and colour jitter on Cityscapes), on the tiny on-disk fixtures with a small
    model, random weights and small crops."""
    if config.startswith("voc12"):
        make_voc(tmp_path)
        sizes = ["data.crop_size=32", "eval.crop=24"]
    else:
        make_cityscapes(tmp_path)
        sizes = ["data.crop_size=16"]
    cfg = load_config(TrainConfig, CONFIGS / config, [
        "model.backbone_weights=", "model.name=deeplabv3plus_mobilenet", f"data.root={tmp_path}", "data.workers=0",
        *sizes, "iterations=2", "batch_size=2", "eval_every=0", "eval.save_images=0", "device=cpu",
        f"out={tmp_path}/run"])
    summary = seg_train.run(cfg)
    assert 0 <= summary["miou"] <= 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "loss_sd" in rows[0] and rows[1].startswith("2,")  # one row: the last iteration
    # Without the ImageNet weights the released run is not the release's: said loudly.
    assert "warning: model.backbone_weights is empty" in capsys.readouterr().err


def test_shapes_configs_train_from_random_weights_on_the_built_in_data():
    for mode in ("base", "afan", "advprop"):
        shapes = load_config(TrainConfig, CONFIGS / f"shapes_{mode}.yaml")
        assert shapes.mode == mode and shapes.data.name == "shapes" and shapes.model.backbone_weights == ""


def test_training_logs_plain_lines_into_a_pipe(tmp_path):
    """Under nohup, Slurm or `| tee` (stdout not a terminal, so no progress bar) every
    log_every iterations still print a line with the loss terms, lr, speed and time left."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "Segmentation.train", *TINY, "mode=afan", "iterations=3",
                           f"out={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in lines] == ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    assert re.fullmatch(r"iteration 1/3: loss [\d.]+ \(loss_0 [\d.]+, loss_1 [\d.]+, loss_2 [\d.]+, loss_sd [\d.]+\), "
                        r"lr [\d.e-]+, [\d.]+ s/it, ETA \dm\d\ds", lines[0]), lines[0]
    assert lines[-1].endswith("ETA 0m00s")
    assert done.stdout.index("iteration 3/3") < done.stdout.index("SUMMARY ")


def test_prediction_pictures_have_titles_and_a_legend_of_the_classes_shown():
    from Segmentation.data import voc_palette
    from Segmentation.evaluation import segmentation_figure

    mask = torch.tensor([[0, 1], [255, 1]])
    pred = torch.tensor([[0, 3], [3, 1]])
    figure = segmentation_figure(torch.rand(3, 2, 2), mask, pred, voc_palette(), ("bg", "circle", "square", "star"))
    assert [ax.get_title() for ax in figure.axes] == ["image", "ground truth", "prediction"]
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["bg", "circle", "star", "ignore"]
    colours = [tuple(round(255 * c) for c in patch.get_facecolor()[:3]) for patch in legend.get_patches()]
    assert colours == [tuple(voc_palette()[c]) for c in (0, 1, 3, 255)]
