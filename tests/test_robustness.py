"""Robustness evaluation: the common corruptions (identity at severity 0, range, determinism,
their defining properties), the corruption sweep, and classification's PGD and feature attacks
(no attack at radius or step 0; an attack never raises the accuracy of a trained model)."""
import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import afan
from afan_harness.config import load_config
from afan_harness.robustness import (CORRUPTIONS, CorruptedDataset, FeatureAttack, brightness, contrast, corrupt, corruption_sweep,
                                     parse_corruptions, save_sweep)
from Classification import test as cls_test
from Classification import train as cls_train
from Classification.config import AdvPropConfig, TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate, feature_logits, pgd_logits
from Classification.models import create_model
from Detection import test as det_test
from Detection import train as det_train
from Segmentation import test as seg_test
from Segmentation import train as seg_train


def cls_train_config(name):
    return cls_train.Path(cls_train.__file__).parent / "configs" / name


def _image(seed=0, size=(3, 20, 24)):
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_keeps_shape_and_range_is_identity_at_severity_0_and_deterministic(name):
    image = _image()
    assert corrupt(image, name, 0, torch.Generator()) is image
    outputs = []
    for severity in (1, 5):
        out = corrupt(image, name, severity, torch.Generator().manual_seed(3))
        again = corrupt(image, name, severity, torch.Generator().manual_seed(3))
        assert out.shape == image.shape and out.dtype == image.dtype
        assert 0 <= out.min() and out.max() <= 1
        assert torch.equal(out, again)
        outputs.append(out)
    # Severity 5 moves the image further than severity 1 (mean absolute change).
    assert (outputs[1] - image).abs().mean() > (outputs[0] - image).abs().mean()


def test_brightness_raises_the_hsv_value_and_keeps_hue_and_saturation():
    image = _image() * 0.6
    out = brightness(image, 2, torch.Generator())
    value, new_value = image.amax(0), out.amax(0)
    torch.testing.assert_close(new_value, (value + 0.2).clamp(max=1))
    saturation = lambda x: (x.amax(0) - x.amin(0)) / x.amax(0)
    torch.testing.assert_close(saturation(out), saturation(image))


def test_contrast_scales_the_distance_to_the_mean():
    image = _image()
    out = contrast(image, 1, torch.Generator())
    torch.testing.assert_close(out - image.mean(), 0.4 * (image - image.mean()))


def test_corrupted_dataset_is_the_same_for_a_seed_and_index_and_keeps_the_labels():
    data = TensorDataset(torch.rand(4, 3, 8, 8), torch.arange(4))
    a, b = CorruptedDataset(data, "gaussian_noise", 3, seed=1), CorruptedDataset(data, "gaussian_noise", 3, seed=1)
    other = CorruptedDataset(data, "gaussian_noise", 3, seed=2)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == i for i in range(4))
    assert not torch.equal(a[0][0], other[0][0]) and not torch.equal(a[0][0], a[1][0] + data[0][0] - data[1][0])


def test_unknown_corruptions_are_named():
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("contrast, pixelate") == ["contrast", "pixelate"]
    with pytest.raises(ValueError, match=r"unknown corruption\(s\) \['fog'\]; choose 'all' or some of gaussian_noise"):
        parse_corruptions("contrast,fog")


def test_the_sweep_averages_per_corruption_and_overall_and_saves_csv_and_plot(tmp_path):
    data = TensorDataset(torch.rand(3, 3, 8, 8))
    mean_pixel = lambda dataset: float(torch.stack([dataset[i][0] for i in range(len(dataset))]).mean())
    clean = mean_pixel(data)
    assert corruption_sweep(data, mean_pixel, ["contrast"], severities=(0,))[0]["score"] == clean
    rows = corruption_sweep(data, mean_pixel, ["contrast", "brightness"], severities=(1, 2))
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        ("contrast", 1), ("contrast", 2), ("contrast", "mean"), ("brightness", 1), ("brightness", 2),
        ("brightness", "mean"), ("mean", "mean")]
    assert rows[2]["score"] == pytest.approx((rows[0]["score"] + rows[1]["score"]) / 2)
    assert rows[-1]["score"] == pytest.approx((rows[2]["score"] + rows[5]["score"]) / 2)
    table, picture = save_sweep(rows, "top1", tmp_path)
    with open(table, newline="") as file:
        assert next(csv.reader(file)) == ["corruption", "family", "severity", "top1"]
    assert picture.stat().st_size > 0


@pytest.fixture(scope="module")
def shapes_model():
    torch.manual_seed(0)
    cfg = load_config(TrainConfig, overrides=["data.name=shapes", "data.val_size=32", "data.train_size=32",
                                              "data.test_size=32"])
    splits = build_datasets(cfg.data, seed=0)
    model = create_model("resnet20", splits.num_classes).eval()
    return model, make_loader(splits.val, 16, train=False, workers=0, seed=0)


def test_pgd_and_feature_attacks_of_strength_0_change_nothing(shapes_model):
    model, loader = shapes_model
    clean = evaluate(model, loader, torch.device("cpu"))
    no_pgd = evaluate(model, loader, torch.device("cpu"),
                      predict=pgd_logits(model, AdvPropConfig(steps=3, step_size=0.0, eps=0.0)))
    no_feature = evaluate(model, loader, torch.device("cpu"), predict=feature_logits(model, FeatureAttack("layer2", gamma=0.0, steps=2)))
    for result in (no_pgd, no_feature):
        assert result["top1"] == clean["top1"] and result["loss"] == pytest.approx(clean["loss"], abs=1e-6)


def test_pgd_through_the_auxiliary_bn_leaves_the_main_bn_for_the_logits(shapes_model):
    model, loader = shapes_model
    aux = afan.convert_aux_norm(create_model("resnet20", 6)).eval()
    aux.load_state_dict({**aux.state_dict(), **model.state_dict()})
    attack = AdvPropConfig(steps=0, step_size=0.0, eps=0.0, random_start=False)
    # No attack step: the logits are the main-BN model's whichever BN the attack was told to use.
    for bn in ("main", "aux"):
        assert evaluate(aux, loader, torch.device("cpu"), predict=pgd_logits(aux, attack, bn))["top1"] == \
            evaluate(model, loader, torch.device("cpu"))["top1"]


@pytest.mark.slow
def test_the_test_script_scores_attacks_and_corruptions_of_an_advprop_run(tmp_path, capsys):
    overrides = ["data.train_size=128", "data.val_size=48", "data.test_size=48", "batch_size=32", "epochs=2",
                 "optim.warmup_epochs=1", "advprop.steps=1", "device=cpu", f"out={tmp_path / 'run'}"]
    cls_train.run(load_config(TrainConfig, cls_train_config("shapes_advprop.yaml"), overrides))
    capsys.readouterr()
    assert cls_test.main(["--checkpoint", str(tmp_path / "run" / "last.pth"), "--device", "cpu", "--pgd-eps", "8",
                          "--pgd-bn", "aux", "--feature-layer", "block2", "--feature-gamma", "20",
                          "--corruptions", "gaussian_noise,contrast", "--severities", "5"]) == 0
    result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    # The attacks raise the loss they climb and take no accuracy from nothing.
    assert result["pgd_loss"] > result["loss"] and result["feature_loss"] > result["loss"]
    assert result["pgd_top1"] <= result["top1"] and result["feature_top1"] <= result["top1"]
    assert result["pgd_bn"] == "aux" and 0 <= result["corruption_top1"] <= 1
    assert (tmp_path / "run" / "test_shapes" / "corruptions.csv").is_file()


SEG = ["model.name=deeplabv3plus_mobilenet", "data.name=shapes", "data.image_size=32", "data.train_size=4",
       "data.val_size=3", "data.crop_size=0", "data.scale_range=[1.0,1.0]", "data.workers=0", "batch_size=2",
       "device=cpu", "eval.batch_size=2", "eval.save_images=0", "iterations=1"]
DET = ["model.name=fasterrcnn_resnet18_c4", "model.min_size=64", "model.max_size=64", "model.anchor_sizes=[16,32,64]",
       "model.roi_batch_size=16", "data.name=shapes", "data.image_size=64", "data.train_size=4", "data.val_size=3",
       "data.workers=0", "batch_size=2", "draw_images=0", "device=cpu", "optim.warmup_iters=1", "iterations=1"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_segmentation_and_detection_tests_score_pgd_feature_attacks_and_corruptions(tmp_path, capsys, task):
    train, test, settings, key = {"segmentation": (seg_train, seg_test, SEG, "miou"),
                                  "detection": (det_train, det_test, [*DET, "model.norm=bn", f"data.root={tmp_path / 'data'}"],
                                                "AP")}[task]
    # An AdvProp run, so last.pth holds auxiliary BN to attack through.
    train.run(load_config(train.TrainConfig, overrides=[*settings, "mode=advprop", "advprop.steps=1",
                                                        f"out={tmp_path / 'run'}"]))
    capsys.readouterr()
    final, last = str(tmp_path / "run" / "final.pth"), str(tmp_path / "run" / "last.pth")

    def summary(checkpoint, *argv):
        assert test.main(["--checkpoint", checkpoint, "--device", "cpu", *argv]) == 0
        return json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    # Attacks that cannot move give the clean score; then real attacks and a sweep.
    clean = summary(final, "--pgd-eps", "1e-12", "--pgd-steps", "1", "--pgd-step-size", "0",
                    "--feature-layer", "layer2", "--feature-strength", "0")
    assert clean[f"pgd_{key}"] == pytest.approx(clean[key]) and clean[f"feature_{key}"] == clean[key]
    assert clean["feature_layer"] == "layer2" and clean["feature_steps"] == 10  # the release's evaluation
    attacked = summary(last, "--pgd-eps", "8", "--pgd-steps", "2", "--pgd-bn", "aux", "--feature-layer", "layer3",
                       "--feature-gamma", "20", "--feature-mix", "--corruptions", "contrast,impulse_noise",
                       "--severities", "1,5")
    # last.pth's model through its main BN is the final model.
    assert attacked[key] == pytest.approx(clean[key]) and attacked["pgd_bn"] == "aux"
    for name in ("pgd", "feature", "corruption"):
        assert 0 <= attacked[f"{name}_{key}"] <= 1
    with open(Path(attacked["out"]) / "corruptions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["corruption"], r["severity"]) for r in rows][-1] == ("mean", "mean") and len(rows) == 7
    # Bad input: one error line, exit status 2.
    for checkpoint, argv, message in [(final, ["--pgd-eps", "2", "--pgd-bn", "aux"], "pass the last.pth"),
                                      (final, ["--feature-layer", "layer9"], "'layer9' is not a split point")]:
        assert test.main(["--checkpoint", checkpoint, "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err
