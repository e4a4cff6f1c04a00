"""The release's classification variants against independent re-statements, in float64.

* ``mode=learnable`` (``Classification/main_learnable.py`` of VITA-Group/CV_A-FAN, restated
  here from its facts on the project's ResNet-20s laid out as the release's ``nn.Sequential``
  and run by start/end index): for each perturbed index ``k`` a head pass, detached, and its
  own PGD (sign steps of ``gamma / 255``, no random start, no clip); then the tails on
  ``h_k + w_k (h_adv_k - h_k)``, a clean full pass, and
  ``loss = (L_clean + sum_k L_k / K) / 2 + l1 * ||w||_1``, one backward; SGD steps the model
  (lr, momentum 0.9, weight decay 5e-4) and ``w`` on its own (lr 0.01, momentum 0.9, no decay),
  then ``w -= (sum(w) - 1) / K``.
* ``afan.input_pgd`` (the release's ``attack_algo.adv_input``: random start
  ``(2 rand - 1) eps``, sign steps, clip to the eps-ball after each, clamp to [0, 1] at the end),
  its loss in place of the clean term or added to it.
"""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afan_harness.checkpoint import load_checkpoint, save_checkpoint
from afan_harness.config import ConfigError, load_config
from afan_harness.settings import InputPgdConfig
from Classification import train as cls_train
from Classification.config import AfanConfig, LearnableConfig, TrainConfig
from Classification.models import checkpoint_payload, create_model, load_model
from Classification.steps import LAYER_WEIGHTS, afan_step, layer_cuts

CONFIGS = Path(__file__).resolve().parents[1] / "Classification" / "configs"
LAYERS = ["stem", "layer1.1", "layer2.0", "layer3"]
RELEASE_INDICES = [4, 6, 8, 13]  # the same cuts in the release's Sequential of ResNet-20s
WEIGHTS = [0.6, -0.1, 0.3, 0.2]  # sum 1, one negative: the L1 term's sign matters
TINY = ["data.name=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.workers=0",
        "batch_size=16", "device=cpu", "epochs=1"]


@pytest.fixture
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def release_layout(model) -> nn.Sequential:
    return nn.Sequential(model.normalize, *model.stem, *model.layer1, *model.layer2, *model.layer3,
                         model.pool, nn.Flatten(), model.fc)


def sign_pgd(start, loss_fn, steps, step):
    adv = start.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(adv), adv)
        adv = adv.detach() + step * grad.sign()
    return adv


def release_learnable_loss(model, w, x, y, *, steps, gamma, l1):
    seq = release_layout(model)
    cleans, advs = [], []
    for num in RELEASE_INDICES:
        clean = seq[:num](x).detach()
        cleans.append(clean)
        advs.append(sign_pgd(clean, lambda f, num=num: F.cross_entropy(seq[num:](f), y), steps, gamma / 255))
    outputs = [seq[num:](c + w[k] * (a - c)) for k, (num, c, a) in enumerate(zip(RELEASE_INDICES, cleans, advs))]
    loss_adv = sum(F.cross_entropy(o, y) for o in outputs)
    loss = (F.cross_entropy(seq(x), y) + loss_adv / len(outputs)) / 2 + torch.norm(w, p=1) * l1
    return loss, torch.cat([(a - c).flatten(1) for c, a in zip(cleans, advs)], 1)


def learnable_config(*extra):
    # Contiguous tensors: float64 convolutions have no fast channels-last path on the CPU.
    return load_config(TrainConfig, overrides=["mode=learnable", "model=resnet20", f"learnable.layers={LAYERS}",
                                               "learnable.steps=2", "learnable.gamma=2.0", "channels_last=false",
                                               *extra])


def setup(cfg, seed=0):
    torch.manual_seed(seed)
    model = cls_train.build_model(cfg, 10, torch.device("cpu")).train()
    with torch.no_grad():
        model.get_submodule(LAYER_WEIGHTS).w.copy_(torch.tensor(WEIGHTS))
    reference = copy.deepcopy(model)
    w = nn.Parameter(torch.tensor(WEIGHTS))
    g = torch.Generator().manual_seed(seed + 1)
    return model, reference, w, torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.usefixtures("float64")
def test_the_learnable_step_is_the_release_step():
    cfg = learnable_config()
    ours, theirs, w, x, y = setup(cfg)
    result = cls_train.training_step(ours, x, y, cfg)
    result.loss.backward()
    loss, perturbation = release_learnable_loss(theirs, w, x, y, steps=2, gamma=2.0, l1=1.0)
    loss.backward()
    assert relative(result.loss.detach(), loss.detach()) < 1e-12
    assert relative(result.perturbation, perturbation) < 1e-12
    assert result.weights.tolist() == WEIGHTS
    assert relative(ours.get_submodule(LAYER_WEIGHTS).w.grad, w.grad) < 1e-10
    for name, p in ours.named_parameters():
        if not name.startswith(LAYER_WEIGHTS):
            assert relative(p.grad, theirs.get_parameter(name).grad) < 1e-10, name


@pytest.mark.usefixtures("float64")
def test_two_optimizer_steps_are_the_releases_two_optimizers_and_projection():
    """The model's group at the schedule's rate with weight decay, the weights' group at 0.01
    throughout, momentum 0.9 for both, then the projection onto sum(w) = 1."""
    cfg = learnable_config()
    ours, theirs, w, x, y = setup(cfg, seed=2)
    optimizer, scheduler = cls_train.make_optimizer(ours, cfg, iters_per_epoch=4)
    main = [(name, p) for name, p in theirs.named_parameters() if not name.startswith(LAYER_WEIGHTS)]
    velocity = {name: None for name, _ in main}
    w_velocity = None
    for _ in range(2):
        lr = optimizer.param_groups[0]["lr"]
        assert optimizer.param_groups[1]["lr"] == 0.01
        result = cls_train.training_step(ours, x, y, cfg)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        scheduler.step()
        theirs.zero_grad()
        w.grad = None
        release_learnable_loss(theirs, w, x, y, steps=2, gamma=2.0, l1=1.0)[0].backward()
        with torch.no_grad():
            for name, p in main:
                g = p.grad + 5e-4 * p
                velocity[name] = g if velocity[name] is None else 0.9 * velocity[name] + g
                p -= lr * velocity[name]
            w_velocity = w.grad.clone() if w_velocity is None else 0.9 * w_velocity + w.grad
            w -= 0.01 * w_velocity
            w -= (w.sum() - 1) / len(w)
        weights = ours.get_submodule(LAYER_WEIGHTS).w
        assert relative(weights.detach(), w.detach()) < 1e-10
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        for name, p in main:
            assert relative(ours.get_parameter(name).detach(), p.detach()) < 1e-10, name


def test_the_weights_and_their_momentum_resume_and_best_pth_loads_as_a_plain_classifier(tmp_path):
    cfg = load_config(TrainConfig, overrides=["mode=learnable", "model=smallcnn", "learnable.layers=[block1,block3]",
                                              "learnable.steps=1"])
    torch.manual_seed(0)
    model = cls_train.build_model(cfg, 4, torch.device("cpu")).train()
    optimizer, scheduler = cls_train.make_optimizer(model, cfg, iters_per_epoch=4)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]

    def step(model, optimizer, scheduler, batch):
        result = cls_train.training_step(model, *batch, cfg)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        scheduler.step()

    step(model, optimizer, scheduler, batches[0])
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, tmp_path / "last.pth")
    state = load_checkpoint(tmp_path / "last.pth")
    assert f"{LAYER_WEIGHTS}.w" in state["model"]
    resumed = cls_train.build_model(cfg, 4, torch.device("cpu")).train()
    resumed_optimizer, resumed_scheduler = cls_train.make_optimizer(resumed, cfg, iters_per_epoch=4)
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    step(model, optimizer, scheduler, batches[1])
    step(resumed, resumed_optimizer, resumed_scheduler, batches[1])
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    save_checkpoint(checkpoint_payload(model), tmp_path / "best.pth")
    plain = load_model(tmp_path / "best.pth")
    assert not hasattr(plain, LAYER_WEIGHTS)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key].to(value.dtype)), key


def test_the_learnable_run_trains_logs_its_weights_and_tests_its_best_model(tmp_path):
    summary = cls_train.run(load_config(TrainConfig, overrides=[
        *TINY, "mode=learnable", "model=smallcnn", "learnable.layers=[block1,block2]", "learnable.steps=1",
        f"out={tmp_path / 'run'}"]))
    assert summary["mode"] == "learnable" and 0 <= summary["test_acc"] <= 1
    header, row = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[:2]
    columns = dict(zip(header.split(","), row.split(",")))
    assert float(columns["w_1"]) + float(columns["w_2"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["learnable.layers=[]"], "learnable.layers must name at least one layer"),
    (["learnable.layers=[block1,block1]"], "must be distinct"),
    (["learnable.l1=-1"], "learnable.l1 must be >= 0"),
    (["learnable.layers=[block9]"], "'block9' is not a layer of smallcnn; valid: block1.0, block1.1"),
    (["learnable.layers=[block1.1]"], "'block1.1' is followed by an in-place ReLU"),
    (["model=tv:resnet18", "learnable.layers=[layer1]"], "no list of stages"),
])
def test_bad_learnable_settings_stop_with_one_clear_message(tmp_path, overrides, message, capsys):
    argv = [*TINY, "mode=learnable", "model=smallcnn", *overrides, f"out={tmp_path / 'run'}"]
    assert cls_train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_learnable_config_is_the_releases_defaults():
    cfg = load_config(TrainConfig, CONFIGS / "cifar10_resnet56_learnable.yaml")
    a = cfg.learnable
    assert (cfg.mode, cfg.model, cfg.optim.lr, cfg.optim.momentum, cfg.epochs) == ("learnable", "resnet56", 0.1, 0.9, 200)
    assert (a.steps, a.gamma, a.eps, a.random_start, a.project, a.w_lr, a.l1) == (3, 1.0, 2.0, False, False, 0.01, 1.0)
    assert a == LearnableConfig()  # the dataclass defaults are the release's too
    # The release's end points 4, 8, ..., 31 into its Sequential of ResNet-56s.
    _, cuts = layer_cuts(create_model("resnet56", 10))
    assert [cuts[name] for name in a.layers] == [4, 8, 11, 14, 18, 21, 24, 28, 31]


# --- afan.input_pgd -----------------------------------------------------------------------

def release_adv_input(model, x, y, *, steps, gamma, eps):
    """``attack_algo.adv_input`` with randinit and clip."""
    adv = x + (2.0 * torch.rand(x.shape) - 1.0) * eps
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = adv.detach() + gamma * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps)
    return adv.clamp(0, 1)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("clean_term,weight", [("adversarial", 0.0), ("adversarial", 0.6), ("clean", 0.5)])
def test_input_pgd_is_the_restated_step(clean_term, weight):
    torch.manual_seed(0)
    ours = create_model("resnet20", 10).train()
    theirs = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    pgd = InputPgdConfig(enabled=True, steps=2, step_size=0.3, eps=2.0, clean_term=clean_term, weight=weight)
    cfg = AfanConfig(layer="layer1", steps=2, gamma=0.5, input_pgd=pgd)
    torch.manual_seed(5)
    result = afan_step(ours, x, y, cfg)
    result.loss.backward()

    torch.manual_seed(5)
    x_adv = release_adv_input(theirs, x, y, steps=2, gamma=0.3 / 255, eps=2.0 / 255)
    pgd_loss = F.cross_entropy(theirs(x_adv), y)
    h = theirs.head(x, "layer1").detach()
    h_adv = sign_pgd(h, lambda f: F.cross_entropy(theirs.tail(f, "layer1"), y), 2, 0.5 / 255)
    first = pgd_loss if clean_term == "adversarial" else F.cross_entropy(theirs(x), y)
    afan_loss = (first + F.cross_entropy(theirs.tail(h_adv, "layer1"), y)) / 2
    loss = (1 - weight) * afan_loss + weight * pgd_loss
    loss.backward()
    assert relative(result.loss.detach(), loss.detach()) < 1e-10
    for name, p in ours.named_parameters():
        assert relative(p.grad, theirs.get_parameter(name).grad) < 1e-8, name


def test_input_pgd_settings_are_checked():
    with pytest.raises(ValueError, match="never uses its PGD images"):
        InputPgdConfig(enabled=True, clean_term="clean", weight=0.0)
    with pytest.raises(ValueError, match=r"afan.input_pgd.weight must be in \[0, 1\], got 1.5"):
        InputPgdConfig(weight=1.5)
    with pytest.raises(ConfigError, match="afan.input_pgd.eps must be >= 0"):
        load_config(TrainConfig, overrides=["afan.input_pgd.eps=-1"])
