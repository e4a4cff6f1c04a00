"""Classification training, testing, scripts and paper configs on tiny Shapes data."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import afan
from afan_harness.checkpoint import load_checkpoint
from afan_harness.rundir import MetricsLog
from afan_harness.config import ConfigError, load_config
from Classification import test as cls_test
from Classification import train as cls_train
from Classification.config import AfanConfig, TrainConfig
from Classification.models import create_model
from Classification.steps import afan_step

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "Classification" / "configs"
TINY = ["model=resnet20", "data.name=shapes", "data.train_size=48", "data.val_size=32",
        "data.test_size=32", "data.workers=0", "batch_size=16", "device=cpu"]


def tiny_config(tmp_path, *extra):
    return load_config(TrainConfig, overrides=[*TINY, f"out={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("mode", ["base", "afan", "advprop"])
def test_one_short_epoch_of_each_mode(tmp_path, mode, capsys):
    extra = {"afan": ["afan.aux_bn=true", "afan.n=2", "afan.mask=01"], "base": ["input_norm=half"]}.get(mode, [])
    summary = cls_train.run(tiny_config(tmp_path, f"mode={mode}", "epochs=1", *extra))
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pth", "best.pth", "summary.json"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out.splitlines()
    line = [text for text in printed if text.startswith("SUMMARY ")][-1]
    assert json.loads(line[len("SUMMARY "):]) == json.loads((out / "summary.json").read_text()) == summary
    epoch_line = [text for text in printed if text.startswith("epoch 0: ")]
    assert epoch_line and "train_loss" in epoch_line[0] and epoch_line[0].endswith("ETA 0m00s")
    assert 0 <= summary["test_acc"] <= 1 and summary["mode"] == mode
    row = MetricsLog(out / "metrics.csv").rows()[0]
    assert {"train_loss", "train_acc", "val_acc", "lr", "time"} <= set(row)
    if mode == "afan":
        assert row["pert_linf"] == pytest.approx(5 * 0.5 / 255, rel=1e-4)
    if mode == "advprop":
        assert 0 < row["pert_linf"] <= 4 / 255 + 1e-6
    best = load_checkpoint(out / "best.pth")
    assert not any(".aux_bn." in k for k in best["model"])
    assert best["mean"] == pytest.approx([0.5] * 3 if mode == "base" else [0.4914, 0.4822, 0.4465])


@pytest.mark.parametrize("aux_bn, n, mask", [(False, 1, "0"), (True, 2, "01")])
def test_afan_loss_is_the_mean_of_clean_and_adversarial_losses(aux_bn, n, mask):
    torch.manual_seed(0)
    model = create_model("resnet20", 6).train()
    cfg = AfanConfig(layer="layer2", steps=2, gamma=2.0, n=n, mask=mask, aux_bn=aux_bn)
    if aux_bn:
        afan.convert_aux_bn(model, after=cfg.layer)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 6, (8,))
    by_hand = copy.deepcopy(model)
    result = afan_step(model, x, y, cfg)

    h = by_hand.head(x, "layer2")
    clean = F.cross_entropy(by_hand.tail(h, "layer2"), y)
    h_adv = h.detach() + result.perturbation
    strengths = [h + (i / n) * (h_adv - h) for i in range(1, n + 1)]
    strengths = [afan.mix_statistics(h, f) if m == "1" else f for m, f in zip(mask, strengths)]
    with afan.use_aux_bn(by_hand, enabled=aux_bn):
        adv = sum(F.cross_entropy(by_hand.tail(f, "layer2"), y) for f in strengths) / n
    torch.testing.assert_close(result.loss, (clean + adv) / 2)
    assert (result.perturbation.abs() <= 2 * 2.0 / 255 + 1e-6).all()


def _bn_layers(model, prefixes):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.BatchNorm2d) and name.startswith(prefixes)}


def test_attack_updates_bn_running_stats_by_default_and_frozen_leaves_them():
    torch.manual_seed(0)
    start = create_model("resnet20", 6).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 6, (8,))
    steps = 3
    models, perturbations = {}, {}
    for setting in ("update", "frozen"):
        cfg = AfanConfig(layer="layer1", steps=steps, gamma=2.0, attack_bn_stats=setting)
        models[setting] = copy.deepcopy(start)
        perturbations[setting] = afan_step(models[setting], x, y, cfg).perturbation
    assert AfanConfig().attack_bn_stats == "update"  # the release's attack passes update them

    head, tail = ("stem.", "layer1."), ("layer2.", "layer3.")
    for setting, model in models.items():
        assert all(m.num_batches_tracked == 1 for m in _bn_layers(model, head).values())
        # Tail BNs: the adversarial and the clean pass, plus every attack step unless frozen.
        attack = steps if setting == "update" else 0
        assert all(m.num_batches_tracked == 2 + attack for m in _bn_layers(model, tail).values()), setting

    # Frozen: the tail's statistics are exactly those of the two training passes alone.
    reference = copy.deepcopy(start)
    h = reference.head(x, "layer1")
    reference.tail(h + perturbations["frozen"], "layer1")
    reference.tail(h, "layer1")
    for name, m in _bn_layers(models["frozen"], head + tail).items():
        expected = reference.get_submodule(name)
        assert torch.equal(m.running_mean, expected.running_mean), name
        assert torch.equal(m.running_var, expected.running_var), name
    moved = _bn_layers(models["update"], tail)
    assert all(not torch.allclose(m.running_mean, reference.get_submodule(n).running_mean) for n, m in moved.items())


@pytest.mark.parametrize("se_trains_head", [False, True])
def test_adversarial_losses_reach_the_head_only_with_se_trains_head(se_trains_head):
    torch.manual_seed(0)
    model = create_model("resnet20", 6).train()
    reference = copy.deepcopy(model)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 6, (8,))
    cfg = AfanConfig(layer="layer1", steps=2, gamma=2.0, n=2, mask="01", se_trains_head=se_trains_head)
    assert AfanConfig().se_trains_head is False  # the release detaches the clean feature
    result = afan_step(model, x, y, cfg)
    result.loss.backward()

    # By hand: the strengths built from h attached or detached, one backward of the sum.
    h = reference.head(x, "layer1")
    clean_loss = F.cross_entropy(reference.tail(h, "layer1"), y)
    base = h if se_trains_head else h.detach()
    h_adv = h.detach() + result.perturbation
    strengths = [base + 0.5 * (h_adv - base), afan.mix_statistics(base, h_adv)]
    adv_loss = sum(F.cross_entropy(reference.tail(f, "layer1"), y) for f in strengths) / 2
    head = [name for name, _ in model.named_parameters() if name.startswith(("stem.", "layer1."))]
    clean_only = dict(zip(head, torch.autograd.grad(clean_loss / 2, [reference.get_parameter(n) for n in head],
                                                    retain_graph=True)))
    ((clean_loss + adv_loss) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference.get_parameter(name).grad, msg=name)
    # Detached: the head's gradient is the clean loss's alone; attached: clearly more.
    for name in head:
        gap = (model.get_parameter(name).grad - clean_only[name]).norm() / clean_only[name].norm()
        assert (gap > 1e-2) if se_trains_head else (gap < 1e-6), (name, gap.item())


def test_test_script_reproduces_the_logged_accuracy(tmp_path, capsys):
    """No data settings: the test takes the run's own (its config.yaml beside the checkpoint)."""
    summary = cls_train.run(tiny_config(tmp_path, "epochs=2", "data.test_size=24"))
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.pth")
    assert cls_test.main(["--checkpoint", best, "--split", "val", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"settings of the run in {tmp_path / 'run' / 'config.yaml'}" in out and "changed here" not in out
    result = json.loads(out.split("SUMMARY ", 1)[1])
    assert result["top1"] == pytest.approx(summary["best_val_acc"])
    assert cls_test.main(["--checkpoint", best, "--device", "cpu", "--pgd-eps", "8", "--pgd-steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert result["top1"] == pytest.approx(summary["test_acc"])
    assert 0 <= result["pgd_top1"] <= 1
    # A changed setting is said, with the run's value.
    assert cls_test.main(["--checkpoint", best, "--device", "cpu", "data.test_size=16", "--fallback", "data.name=cifar10"]) == 0
    out = capsys.readouterr().out
    assert "changed here: data.test_size=16 (the run: 24)" in out and '"data": "shapes"' in out
    # Without the run's settings, the defaults (and a fallback) apply.
    assert cls_test.main(["--checkpoint", best, "--device", "cpu", "--no-run-config", "--fallback", "data.name=cifar10",
                          f"data.root={tmp_path / 'none'}"]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


def test_paper_configs_match_the_released_hyper_parameters():
    for mode in ("base", "afan"):
        cfg = load_config(TrainConfig, CONFIGS / f"cifar10_resnet56_{mode}.yaml")
        assert (cfg.mode, cfg.model, cfg.data.name) == (mode, "resnet56", "cifar10")
        assert (cfg.epochs, cfg.batch_size) == (200, 128)
        o = cfg.optim
        assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.milestones, o.decay, o.warmup_epochs) == \
            (0.1, 0.9, 5e-4, "step", [50, 150], 0.1, 1.0)
    a = load_config(TrainConfig, CONFIGS / "cifar10_resnet56_afan.yaml").afan
    assert (a.layer, a.steps, a.gamma, a.eps, a.random_start, a.project, a.n, a.aux_bn) == \
        ("layer1", 5, 0.5, 2.0, False, False, 1, False)
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(TrainConfig, path)
        assert cfg.out.endswith(path.stem), path.name
        if "cifar100" in path.name:
            assert cfg.data.name == "cifar100"
        if cfg.mode == "afan":
            assert cfg.afan.layer in create_model(cfg.model, 10).split_points


def test_warm_up_and_step_decay():
    o = TrainConfig().optim
    factor = lambda it: cls_train.lr_factor(it, 100, 200, o)  # noqa: E731
    assert factor(0) == pytest.approx(0.01) and factor(49) == pytest.approx(0.5)
    assert factor(99) == 1.0 and factor(4999) == 1.0
    assert factor(5000) == pytest.approx(0.1) and factor(15000) == pytest.approx(0.01)


def test_bad_settings_stop_with_one_clear_message(tmp_path, capsys):
    assert cls_train.main([*TINY, "mode=afan", "afan.layer=layer9", f"out={tmp_path / 'r'}"]) == 2
    assert "layer9" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="afan.mask"):
        load_config(TrainConfig, overrides=["afan.n=4", "afan.mask=011"])


def test_input_norm_and_weights_tag_reach_the_model_and_bad_ones_stop_cleanly(tmp_path, capsys):
    cpu = torch.device("cpu")
    for overrides, mean in [(["model=tf_efficientnet_b0.ap_in1k"], 0.5), (["model=tf_efficientnet_b0"], 0.485),
                            (["model=tf_efficientnet_b0", "input_norm=half"], 0.5)]:
        model = cls_train.build_model(load_config(TrainConfig, overrides=overrides), 4, cpu)
        assert model.normalize.mean[0].item() == pytest.approx(mean), overrides
    with pytest.raises(ConfigError, match="input_norm"):
        load_config(TrainConfig, overrides=["input_norm=cifar"])
    bad = [("tf_efficientnet_b0.jft", "unknown weights tag 'jft'"), ("resnet57", "Did you mean 'resnet56'")]
    for name, text in bad:
        assert cls_train.main([*TINY, f"model={name}", f"out={tmp_path / 'r'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and "Traceback" not in err, err
        assert not (tmp_path / "r").exists()


def _script(name, *args, cwd):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "Classification" / "cmd" / name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_scripts_work_from_the_root_and_the_task_folder(tmp_path):
    tiny = [*TINY, "epochs=1", "afan.steps=1", "afan.layer=layer1"]
    done = _script("run_perturb.sh", "--config", "Classification/configs/shapes_afan.yaml", *tiny,
                   f"out={tmp_path / 'a'}", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    done = _script("run_test.sh", "--checkpoint", str(tmp_path / "a" / "best.pth"), "--device", "cpu",
                   *[o for o in TINY if o.startswith("data.")], cwd=ROOT / "Classification")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.split("SUMMARY ", 1)[1])["data"] == "shapes"


def test_newcomer_without_cifar_is_told_what_to_do(tmp_path):
    done = _script("run_perturb.sh", f"data.root={tmp_path / 'nothing'}", f"out={tmp_path / 'r'}",
                   cwd=ROOT / "Classification")
    assert done.returncode == 2
    assert "data.download=true" in done.stderr
    assert "--config " in done.stderr and "shapes_afan.yaml" in done.stderr
    assert not (tmp_path / "r").exists()


def test_compare_prints_a_table_and_writes_the_plot(tmp_path, capsys):
    from Classification import compare
    tracked = ROOT / "Figs" / "shapes_base_vs_afan.png"
    before = tracked.read_bytes()
    args = ["epochs=1", "afan.steps=1", "advprop.steps=1", "data.train_size=32", "data.val_size=16", "data.test_size=16",
            "batch_size=16", "device=cpu", "--out", str(tmp_path / "runs")]
    assert compare.main(args) == 0
    figure = tmp_path / "runs" / "base_vs_afan.png"  # beside the runs: the checkout stays clean
    assert tracked.read_bytes() == before
    out = capsys.readouterr().out
    # The demo's table: one row per mode, a column per evaluation and the training time.
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0] == "| mode | clean | PGD 2/255 | feature (block1) | corruptions | training time |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", "| afan", "| advprop"]
    assert all(len(line.split(" | ")) == 6 and line.endswith("s |") for line in lines[2:])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
