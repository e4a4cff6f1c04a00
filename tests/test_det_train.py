"""Detection training and testing on tiny Shapes data: every mode, resume, test.py, configs."""
import json
from pathlib import Path

import pytest

import torch
import torchvision

from afan_harness.config import ConfigError, load_config
from afan_harness.rundir import MetricsLog
from Detection import test as det_test
from Detection import train as det_train
from Detection.models.faster_rcnn import model_settings
from Detection.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "Detection" / "configs"


@pytest.fixture
def tiny(tmp_path):
    return ["model.name=fasterrcnn_resnet18_c4", "model.min_size=64", "model.max_size=64",
            "model.anchor_sizes=[16,32,64]", "model.roi_batch_size=16", "data.name=shapes", "data.image_size=64", "data.train_size=8",
            "data.val_size=4", f"data.root={tmp_path / 'data'}", "data.workers=0", "batch_size=2",
            "log_every=1", "draw_images=1", "device=cpu", "afan.n=2", "afan.mask=01", "optim.warmup_iters=1"]


@pytest.mark.parametrize("mode, extra", [("base", []), ("afan", []), ("advprop", ["model.norm=bn"]),
                                         ("afan", ["model.name=fasterrcnn_resnet18_fpn", "model.anchor_sizes=[16,32,64,128,256]"])],
                         ids=["base", "afan", "advprop", "afan-fpn"])
def test_a_few_iterations_of_each_mode(tmp_path, tiny, mode, extra, capsys):
    cfg = load_config(TrainConfig, overrides=[*tiny, f"mode={mode}", "iterations=2", f"out={tmp_path / 'run'}", *extra])
    summary = det_train.run(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pth", "final.pth", "summary.json",
                 "per_class_ap.csv", "predictions/000.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert json.loads(printed.split("SUMMARY ", 1)[1]) == summary
    assert "iteration 1/2: loss " in printed and "iteration 2/2: loss " in printed and "ETA 0m00s" in printed
    assert 0 <= summary["mAP"] <= 1 and "AP50" in summary
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "loss_classifier" in rows[0]
    if mode == "afan":
        assert "se_linf" in rows[0] and "sd_linf" in rows[0] and "loss_sd" in rows[0]


def test_resume_equals_an_uninterrupted_run(tiny, check_resume):
    # eval_every: the evaluation at iteration 2 comes before that checkpoint, in both runs.
    settings = [*tiny, "mode=afan", "iterations=4", "checkpoint_every=2", "eval_every=2", "deterministic=true"]
    check_resume(det_train, settings)


def test_evaluation_during_training_keeps_the_best_model_and_exports_coco_json(tmp_path, tiny, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from Detection.data import build_datasets
    from Detection.evaluation import run_evaluation
    from Detection.models import load_model

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, overrides=[*tiny, "iterations=3", "eval_every=1", "optim.lr=0.05", f"out={out}"])
    summary = det_train.run(cfg)
    rows = MetricsLog(out / "metrics.csv").rows()
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["val_AP"] <= 1 and 0 <= r["val_mAP"] <= 1 for r in rows)
    assert "iteration 1/3:" in capsys.readouterr().out
    # Shapes is COCO-format: the best model is the one with the highest COCO AP, and it is
    # the model best.pth holds (scored again from the file).
    best_row = max(rows, key=lambda r: r["val_AP"])
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["AP"] == best_row["val_AP"] and best["iteration"] == rows.index(best_row) + 1
    assert summary["best_AP"] == max(best_row["val_AP"], summary["AP"])
    splits = build_datasets(cfg.data, seed=cfg.seed)
    again = run_evaluation(load_model(out / "best.pth", num_classes=splits.num_classes), splits, "cpu", tmp_path / "x",
                           draw=0, write=False)
    assert again["AP"] == pytest.approx(best["AP"], abs=1e-12)
    # detections.json is a COCO results file: pycocotools scores it to the summary's AP.
    results = json.loads((out / "detections.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score", "file_name"}
    coco_gt = COCO(str(splits.eval_info.annotation_file))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(summary["AP"], abs=1e-12)
    # The mAP curve is drawn beside the losses.
    assert (out / "curves.png").is_file()


def test_test_script_reproduces_the_training_evaluation(tmp_path, tiny, capsys):
    summary = det_train.run(load_config(TrainConfig, overrides=[*tiny, "iterations=2", f"out={tmp_path / 'run'}"]))
    capsys.readouterr()
    # No data settings: the run's own (its config.yaml beside the checkpoint).
    assert det_test.main(["--checkpoint", str(tmp_path / "run" / "final.pth"), "--device", "cpu",
                          "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert result["mAP"] == pytest.approx(summary["mAP"]) and result["AP"] == pytest.approx(summary["AP"])
    assert (tmp_path / "eval" / "per_class_ap.csv").is_file()


# The release's settings, read from its repository (VITA-Group/CV_A-FAN, Detection/): the
# training defaults of config/train_config.py and config/config.py (batch, lr, momentum 0.9,
# weight decay 5e-4, warm-up 500 iterations from 1/3, sides 600/1000, anchors 128/256/512,
# RPN top-n 12000/2000 training and 6000/300 test, smooth-L1 beta 1.0), and what each
# script under sh/ passes to train_aug_final.py (--sd_adv_loss_weight defaults to 0.5).
VOC_RUN = {"batch_size": 8, "iterations": 11250, "lr": 0.008, "weight_decay": 5e-4, "steps": [6250, 8750]}
VOC_MODEL = {"min_size": 600, "max_size": 1000, "anchor_sizes": [128, 256, 512], "rpn_smooth_l1_beta": 1.0,
             "rpn_post_nms_top_n": [2000, 300]}
COCO_RUN = {"batch_size": 8, "iterations": 180000, "lr": 0.01, "weight_decay": 1e-4, "steps": [120000, 160000]}
# --anchor_smooth_l1_loss_beta=0.1111; eval.py --rpn_post_nms_top_n=1000
COCO_MODEL = {"min_size": 800, "max_size": 1333, "anchor_sizes": [64, 128, 256, 512], "rpn_smooth_l1_beta": 0.1111,
              "rpn_post_nms_top_n": [2000, 1000]}
# config: (data, run, model, (gamma_se, mask, gamma_sd, w, only_roi, mix_sd, noise_sd) or None)
RELEASED = {
    "voc07_resnet50_base": ("voc07", VOC_RUN, VOC_MODEL, None),  # sh/voc2007/clean50/080_voc_res50_clean_baseline.sh
    "voc07_resnet50_afan": ("voc07", VOC_RUN, VOC_MODEL, (1.0, "0011", 0.1, 0.3, True, False, 0.0)),  # 090_final_setting1
    "voc07_resnet50_afan_setting2": ("voc07", VOC_RUN, VOC_MODEL, (1.0, "0011", 0.05, 0.3, True, False, 0.0)),  # 091
    "voc07_resnet50_afan_setting3": ("voc07", VOC_RUN, VOC_MODEL, (1.0, "0011", 0.2, 0.3, False, True, 0.0)),  # 092
    "coco_resnet50_base": ("coco", COCO_RUN, COCO_MODEL, None),
    "coco_resnet50_afan": ("coco", COCO_RUN, COCO_MODEL, (0.1, "0011", 0.1, 0.3, True, False, 0.0)),  # sh/coco/clean50/090
    "coco_resnet50_afan_setting2": ("coco", COCO_RUN, COCO_MODEL, (0.1, "0011", 0.05, 0.3, True, False, 0.0)),  # 091
    "coco_resnet50_afan_setting3": ("coco", COCO_RUN, COCO_MODEL, (0.1, "0011", 0.2, 0.3, False, True, 0.0)),  # 092
    "coco_resnet50_afan_setting4": ("coco", COCO_RUN, COCO_MODEL, (0.1, "0011", 0.3, 0.5, False, True, 0.01)),  # 093
    "coco_resnet50_afan_setting5": ("coco", COCO_RUN, COCO_MODEL, (0.1, "1100", 0.2, 0.3, False, True, 0.0)),  # 094
    "coco_resnet50_afan_setting6": ("coco", COCO_RUN, COCO_MODEL, (0.1, "1100", 0.1, 0.3, True, False, 0.0)),  # 095
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs_hold_the_released_settings(name):
    data, run, model, afan = RELEASED[name]
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.mode == ("base" if afan is None else "afan") and cfg.data.name == data
    assert cfg.out == f"runs/{name}"
    o = cfg.optim
    assert {"batch_size": cfg.batch_size, "iterations": cfg.iterations, "lr": o.lr, "weight_decay": o.weight_decay,
            "steps": o.steps} == run
    assert (o.momentum, o.decay, o.warmup_iters, o.warmup_factor) == (0.9, 0.1, 500, pytest.approx(1 / 3))
    # R-50-C4 from torchvision's ImageNet file, conv1..layer1 and every BatchNorm frozen.
    assert cfg.model.name == "fasterrcnn_resnet50_c4"
    assert cfg.model.backbone_weights == "weights/resnet50-0676ba61.pth"
    settings = model_settings(cfg.model.name, **cfg.model.settings())
    assert {k: settings[k] for k in model} == model
    assert (settings["trainable_layers"], settings["norm"], settings["roi_batch_size"]) == (3, "frozen", 128)
    assert settings["rpn_pre_nms_top_n"] == [12000, 6000] and settings["rpn_post_nms_top_n"][0] == 2000
    assert settings["roi_smooth_l1_beta"] == 1.0
    if afan is None:
        return
    a = cfg.afan
    assert (a.se_layer, a.se_steps, a.n, a.sd, a.sd_steps) == ("layer2", 1, 4, True, 1)
    assert (a.gamma_se, a.mask, a.gamma_sd, a.w, a.only_roi, a.sd_mix, a.sd_noise) == afan
    assert (a.attack_bn_stats, a.se_trains_head, a.aux_bn) == ("update", False, False)


def test_every_config_parses_and_names_its_run_folder():
    for path in CONFIGS.glob("*.yaml"):
        assert load_config(TrainConfig, path).out.endswith(path.stem.replace("shapes", "shapes_det")), path


def test_backbone_weights_reach_the_trained_model(tmp_path, tiny):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    cfg = load_config(TrainConfig, overrides=[*tiny, "iterations=1", "optim.lr=1e-9", f"out={tmp_path / 'run'}",
                                               f"model.backbone_weights={tmp_path / 'resnet18.pth'}"])
    det_train.run(cfg)
    state = torch.load(tmp_path / "run" / "final.pth", weights_only=True)["model"]
    # layer1 is frozen: it ends the run exactly as the file had it.
    for key, value in resnet.state_dict().items():
        if key.startswith("layer1.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(state[f"backbone.body.{key}"], value), key


def test_bad_settings_are_refused(tmp_path, tiny, capsys):
    with pytest.raises(ConfigError, match="model.norm=bn"):
        load_config(TrainConfig, overrides=["mode=advprop"])
    with pytest.raises(ConfigError, match="representation_size is the FPN box head's width"):
        load_config(TrainConfig, overrides=["model.representation_size=256"])
    # A released config whose ImageNet backbone file is not there: one clear error, no run folder.
    assert det_train.main(["--config", str(CONFIGS / "voc07_resnet50_afan.yaml"), f"out={tmp_path / 'v'}",
                           f"model.backbone_weights={tmp_path / 'resnet50-0676ba61.pth'}", "device=cpu",
                           *[o for o in tiny if o.startswith("data.")]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "resnet50-0676ba61.pth does not exist" in err
    assert not (tmp_path / "v").exists()
    assert det_train.main([*tiny, "data.name=voc07", f"data.root={tmp_path / 'none'}", f"out={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "VOCdevkit" in err and "shapes_base.yaml" in err
    assert not (tmp_path / "r").exists()


def test_test_outputs_never_replace_an_earlier_evaluation(tmp_path, tiny, capsys):
    det_train.run(load_config(TrainConfig, overrides=[*tiny, "iterations=1", "draw_images=0", f"out={tmp_path / 'run'}"]))
    capsys.readouterr()
    for expected in ("test_shapes", "test_shapes-2"):
        assert det_test.main(["--checkpoint", str(tmp_path / "run" / "final.pth"), "--device", "cpu", "--draw", "0"]) == 0
        result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
        assert result["out"] == str(tmp_path / "run" / expected) and (tmp_path / "run" / expected).is_dir()


def test_a_config_path_from_the_task_folder_works_from_the_root(tmp_path, capsys):
    from afan_harness.cli import config_path
    assert config_path("configs/shapes_afan.yaml", CONFIGS) == CONFIGS.parent / "configs/shapes_afan.yaml"
    assert config_path("shapes_afan.yaml", CONFIGS) == CONFIGS / "shapes_afan.yaml"
    assert config_path("nowhere.yaml", CONFIGS) == "nowhere.yaml"
    assert det_train.main(["--config", "nowhere.yaml", f"out={tmp_path / 'r'}"]) == 2
    assert "config file nowhere.yaml does not exist" in capsys.readouterr().err
