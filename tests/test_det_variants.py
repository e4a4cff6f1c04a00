"""The release's detection variants against a re-statement of their steps.

``restated`` below writes the release's multi-layer step (``Detection/py/train_aug_muti_final.py``
of VITA-Group/CV_A-FAN, with ``attack_algo.py``) and its input adversarial training
(``train_aug_muti_advt.py``: ``attack_algo.adv_input`` with randinit and clip) from their facts,
on the project's model parts, pass by pass: the PGD images first (``(2 rand - 1) eps`` start,
sign steps of the total loss, clip to the eps-ball, clamp to [0, 1] at the end) and their
full pass; per stage a head pass, detached, one sign step of its own gamma through the tail,
``mix_feature`` where the stage is mixed, its tail; SD on the RoI head's output (the clean
pass's RoIs, sign step, ``mix_feature``), its RoI losses plus the clean RPN losses; the
release's ``--loss_settings`` sum. It is compared with ``Detection.steps.afan_step``: loss,
terms and every gradient. The random start and projection (``--randinit`` / ``--clip``) of SE
and SD are checked by their bounds.
"""
import copy
from pathlib import Path

import pytest
import torch

from afan_harness.config import load_config
from afan_harness.settings import InputPgdConfig, MultiLayerConfig
from Detection.config import AfanConfig, TrainConfig
from Detection.models import create_model, forward_losses, head, predictor_losses, prepare, tail
from Detection.steps import afan_step
from release_ops import mix_feature, sign_step

LAYERS = ["layer1", "layer2", "layer3"]


@pytest.fixture
def model(built_once):
    build = lambda: create_model("fasterrcnn_resnet18_c4", 5, anchor_sizes=[16, 32, 64], roi_batch_size=16,  # noqa: E731
                                 min_size=64, max_size=80).train()
    return built_once.get("c4", build, seed=0)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 72, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = []
    for image in images:
        h, w = image.shape[1:]
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 5, (2,), generator=g)})
    return images, targets


def adv_input(model, images, targets, *, steps, gamma, eps, randinit):
    advs = [image + (2.0 * torch.rand(image.shape) - 1.0) * eps if randinit else image.clone() for image in images]
    for _ in range(steps):
        advs = [a.requires_grad_(True) for a in advs]
        grads = torch.autograd.grad(sum(forward_losses(model, advs, targets).values()), advs)
        advs = [torch.min(torch.max(a.detach() + gamma * g.sign(), x - eps), x + eps)
                for a, g, x in zip(advs, grads, images)]
    return [a.clamp(0, 1) for a in advs]


def restated(model, images, targets, *, gammas, mask, gamma_sd, weights, pgd=None):
    total = lambda losses: sum(losses.values())  # noqa: E731
    if pgd is not None:
        adv_images = adv_input(model, images, targets, steps=pgd.steps, gamma=pgd.step_size / 255, eps=pgd.eps / 255,
                               randinit=pgd.random_start)
        loss_adv_images = total(forward_losses(model, adv_images, targets))
    image_list, targets = prepare(model, images, targets)
    clean_feats = head(model, image_list.tensors, "layer3")
    clean, roi = tail(model, clean_feats, "layer3", image_list, targets, return_roi=True)
    terms = [loss_adv_images if pgd is not None else total(clean)]
    for at, gamma, mix in zip(LAYERS, gammas, mask):
        feats = head(model, image_list.tensors, at)
        h = feats[at].detach()
        adv = sign_step(h, lambda f, at=at: total(tail(model, {at: f}, at, image_list, targets)), gamma / 255)
        terms.append(total(tail(model, {at: mix_feature(h, adv) if mix == "1" else adv}, at, image_list, targets)))
    box = roi.box_features.detach()
    rpn = clean["loss_objectness"] + clean["loss_rpn_box_reg"]
    sd_loss = lambda f: total(predictor_losses(model.roi_heads, f, roi.labels, roi.regression_targets))  # noqa: E731
    box_adv = mix_feature(box, sign_step(box, lambda f: sd_loss(f) + rpn.detach(), gamma_sd / 255))
    terms.append(sd_loss(box_adv) + rpn)
    loss = sum(w * t for w, t in zip(weights, terms))
    loss.backward()
    return loss.detach(), [t.detach() for t in terms]


def test_the_multi_layer_step_with_input_pgd_is_the_release_step(model):
    """``train_aug_muti_advt.py`` at ``--loss_settings 1`` (whose clean term is the PGD
    images' loss), with step sizes larger than released so that every term moves.

    In float32 the release's steps on the image and the project's on the perturbation
    (``x + s_1 + s_2`` against ``x + (s_1 + s_2)``, the projection of ``x + d`` against that of
    ``d``) round apart by an ulp, and so do ``(2 rand - 1) eps`` and ``uniform_(-eps, eps)``; the RPN's
    proposal selection on the PGD images turns that into gradients some 1e-4 apart (relative
    norm), so those are held to 1e-3 and the random start is left out here
    (tests/test_cls_variants.py checks both in float64)."""
    reference = copy.deepcopy(model)
    gammas, weights = [5.0, 5.0, 10.0], [0.35, 0.1, 0.1, 0.35, 0.1]
    pgd = InputPgdConfig(enabled=True, steps=1, step_size=0.3, eps=2.0, random_start=False)
    cfg = AfanConfig(multi=MultiLayerConfig(layers=LAYERS, gammas=gammas, eps=[0.1, 0.1, 2.0], mask="001",
                                            weights=weights),
                     sd_mix=True, gamma_sd=2.0, only_roi=False, input_pgd=pgd)
    images, targets = batch()
    torch.manual_seed(3)  # the same random start and RPN and RoI sampling in both
    result = afan_step(model, images, targets, cfg)
    result.loss.backward()
    torch.manual_seed(3)
    loss, terms = restated(reference, images, targets, gammas=gammas, mask="001", gamma_sd=2.0, weights=weights,
                           pgd=pgd)
    names = ["loss_0", "loss_layer1", "loss_layer2", "loss_layer3", "loss_sd"]
    torch.testing.assert_close(torch.stack([result.losses[n] for n in names]), torch.stack(terms))
    assert result.losses["loss_input_pgd"] == result.losses["loss_0"]
    torch.testing.assert_close(result.loss.detach(), loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)).item() < 1e-3, name
    # Every stage's perturbation, one sign step of its own gamma, flattened side by side.
    assert result.se_perturbation.abs().max().item() == pytest.approx(10.0 / 255, rel=1e-5)


def test_random_start_and_projection_bound_se_and_sd_by_their_radii(model):
    images, targets = batch(1)
    start = AfanConfig(se_steps=0, sd_steps=0, random_start=True, eps_se=3.0, eps_sd=1.0, n=1, mask="0", w=0.5)
    result = afan_step(copy.deepcopy(model), images, targets, start)
    for delta, eps in ((result.se_perturbation, 3.0 / 255), (result.sd_perturbation, 1.0 / 255)):
        assert 0.5 * eps < delta.abs().max().item() <= eps * (1 + 1e-3)
    projected = AfanConfig(se_steps=2, sd_steps=2, gamma_se=5.0, gamma_sd=5.0, project=True, eps_se=3.0, eps_sd=1.0,
                           n=1, mask="0", w=0.5)
    result = afan_step(copy.deepcopy(model), images, targets, projected)
    # (origin + delta) - origin in float32: within rounding of the feature's magnitude.
    assert result.se_perturbation.abs().max().item() == pytest.approx(3.0 / 255, rel=1e-3)
    assert result.sd_perturbation.abs().max().item() == pytest.approx(1.0 / 255, rel=1e-3)


def test_input_pgd_added_to_the_clean_step_weights_its_loss(model):
    """``train_aug_final_advtrain.py``: ``0.5 * A-FAN(clean) + 0.5 * L(x_adv)``."""
    images, targets = batch(2)
    base = AfanConfig(n=1, mask="0")
    pgd = InputPgdConfig(enabled=True, steps=1, step_size=0.1, clean_term="clean", weight=0.5)
    torch.manual_seed(4)
    result = afan_step(copy.deepcopy(model), images, targets, AfanConfig(n=1, mask="0", input_pgd=pgd))
    t = result.losses
    afan_loss = (t["loss_0"] + t["loss_1"]) / 3 * (1 - base.w) + t["loss_sd"] / 3 * base.w
    torch.testing.assert_close(result.loss.detach(), 0.5 * afan_loss + 0.5 * t["loss_input_pgd"])
    assert t["loss_0"] != t["loss_input_pgd"]


@pytest.mark.parametrize("multi,options,message", [
    ({"layers": ["layer9"]}, {}, "afan.multi.layers: 'layer9' is not one of"),
    ({"layers": ["layer2", "layer2"], "gammas": [1, 1], "eps": [2, 2], "mask": "00", "weights": [1, 1, 1, 1]}, {},
     "must be distinct"),
    ({"layers": ["layer2"], "gammas": [], "eps": [2], "mask": "0", "weights": [1, 1, 1]}, {},
     r"afan.multi.gammas needs one value per layer \(1\)"),
    ({"layers": ["layer2"], "gammas": [1], "eps": [2], "mask": "01", "weights": [1, 1, 1]}, {}, "afan.multi.mask"),
    ({"layers": ["layer2"], "gammas": [1], "eps": [2], "mask": "0", "weights": [1, 1, 1]}, {"sd": False},
     r"afan.multi.weights needs 2 values \(L_0, one per layer\)"),
    ({"layers": ["layer2"], "gammas": [-1], "eps": [2], "mask": "0", "weights": [1, 1, 1]}, {}, "must be >= 0"),
    ({"layers": ["layer2"], "gammas": [1], "eps": [2], "mask": "0", "weights": [1, 1, 1]}, {"aux_bn": True},
     "afan.aux_bn does not combine with afan.multi.layers"),
    ({}, {"eps_sd": -1.0}, "afan.eps_sd must be >= 0"),
])
def test_bad_variant_settings_are_refused(multi, options, message):
    with pytest.raises(ValueError, match=message):
        AfanConfig(multi=MultiLayerConfig(**multi), **options)


def test_the_variant_configs_hold_the_releases_settings():
    folder = Path(__file__).resolve().parents[1] / "Detection" / "configs" / "variants"
    multi = load_config(TrainConfig, folder / "voc07_resnet50_afan_multi.yaml").afan
    assert multi.multi == MultiLayerConfig(layers=LAYERS, gammas=[0.001, 0.001, 0.2], eps=[0.1, 0.1, 2.0], mask="001",
                                           weights=[0.35, 0.1, 0.1, 0.35, 0.1])
    assert (multi.sd, multi.gamma_sd, multi.sd_mix, multi.only_roi, multi.se_steps, multi.sd_steps) == \
        (True, 0.2, True, False, 1, 1)
    assert (multi.random_start, multi.project, multi.input_pgd.enabled) == (False, False, False)
    advt = load_config(TrainConfig, folder / "voc07_resnet50_afan_multi_advt.yaml").afan
    assert advt.multi == multi.multi
    assert advt.input_pgd == InputPgdConfig(enabled=True, steps=5, step_size=0.3, eps=2.0, random_start=True,
                                            project=True, clean_term="adversarial", weight=0.0)
    for path in folder.glob("*.yaml"):
        assert load_config(TrainConfig, path).out.endswith(path.stem), path
