"""Segmentation training steps: the losses, the attacks' bounds, untouched gradients, BN
statistics updated (the release) or frozen by the attacks, SD at the concatenated feature, the
attacks raising the loss, auxiliary BN and AdvProp."""
import copy

import pytest
import torch
import torch.nn.functional as F

import afan
from afan_harness.settings import AdvPropConfig
from Segmentation.config import AfanConfig
from Segmentation.models import create_model
from Segmentation.steps import advprop_step, afan_step, base_step

NUM_CLASSES = 4


def batch(seed=0, size=33):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, size, size, generator=g)
    masks = torch.randint(0, NUM_CLASSES, (4, size, size), generator=g)
    masks[:, :3] = 255  # an ignored band
    return images, masks


def build_model():
    net = create_model("deeplabv3plus_mobilenet", NUM_CLASSES).train()
    net.classifier.aspp.project[-1].p = 0.0  # no dropout: passes comparable without RNG bookkeeping
    return net


@pytest.fixture
def model(built_once):
    """A fresh copy of the model above, built under ``torch.manual_seed(0)`` once per module,
    with the random state of a fresh build."""
    return built_once.get("mobilenet", build_model, seed=0)


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_base_loss_is_cross_entropy_ignoring_255(model):
    images, masks = batch()
    result = base_step(model, images, masks)
    expected = F.cross_entropy(result.logits, masks, ignore_index=255)
    torch.testing.assert_close(result.loss, expected)
    valid = masks != 255
    by_hand = -F.log_softmax(result.logits, 1).gather(1, masks.clamp(max=NUM_CLASSES - 1)[:, None])[:, 0][valid].mean()
    torch.testing.assert_close(result.loss, by_hand)


def test_afan_loss_is_the_released_weighting(model):
    result = afan_step(model, *batch(), AfanConfig())
    terms = result.losses
    assert set(terms) == {"loss_0", "loss_1", "loss_2", "loss_sd"}
    expected = 0.7 * terms["loss_0"] + 0.1 * (terms["loss_1"] + terms["loss_2"] + terms["loss_sd"])
    torch.testing.assert_close(result.loss.detach(), expected)
    without_sd = afan_step(model, *batch(), AfanConfig(sd=False, w=0.4))
    t = without_sd.losses
    torch.testing.assert_close(without_sd.loss.detach(), 0.6 * t["loss_0"] + 0.2 * (t["loss_1"] + t["loss_2"]))


@pytest.mark.parametrize("layer", ["layer1", "layer3"])
def test_perturbations_stay_within_their_step_bounds(model, layer, device):
    cfg = AfanConfig(se_layer=layer, se_steps=2, gamma_se=3.0, sd_steps=3, gamma_sd=0.5)
    result = afan_step(model.to(device), *(t.to(device) for t in batch()), cfg)
    assert result.perturbation.abs().max() <= 2 * 3.0 / 255 + 1e-6
    assert result.sd_perturbation.abs().max() <= 3 * 0.5 / 255 + 1e-6
    assert result.perturbation.abs().max() > 0 and result.sd_perturbation.abs().max() > 0


@pytest.mark.parametrize("bn_stats", ["update", "frozen"])
def test_attacks_leave_parameter_gradients_alone_and_bn_statistics_as_configured(model, bn_stats, device):
    """The attack passes (forward and backward through the tail and the decoder) change no
    parameter's .grad. With step size 0 they find the clean features, so the only trace they
    can leave is on BN running statistics: by default ("update", the release) they move them
    like any training pass; "frozen" leaves them exactly as a step without attack passes."""
    model.to(device)
    images, masks = (t.to(device) for t in batch())
    without_attack = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    afan_step(model, images, masks, AfanConfig(se_steps=3, sd_steps=3, gamma_se=0.0, gamma_sd=0.0,
                                               attack_bn_stats=bn_stats))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    afan_step(without_attack, images, masks, AfanConfig(se_steps=0, sd_steps=0, attack_bn_stats=bn_stats))
    after, expected = bn_state(model), bn_state(without_attack)
    changed = [key for key in expected if not torch.equal(after[key], expected[key])]
    if bn_stats == "frozen":
        assert changed == []
    else:
        # Every BN the attacks run through: after the split point and in the decoder (the
        # stem only runs in the clean pass, before the attacks).
        counter = "classifier.classifier.1.num_batches_tracked"
        assert counter in changed and "backbone.high_level_features.17.conv.1.1.running_mean" in changed
        assert not any(key.startswith("backbone.low_level_features.") for key in changed)
        assert after[counter] - expected[counter] == 6  # 3 SE and 3 SD attack steps


def test_sd_at_concat_perturbs_the_decoders_concatenated_feature(model):
    images, masks = batch()
    low_level = model.head(images, "layer1").low_level
    cfg = AfanConfig(sd_layer="concat", sd_steps=2, gamma_sd=3.0)
    result = afan_step(model, images, masks, cfg)
    # The projected low-level feature (48 channels) and the ASPP output (256) at stride 4.
    assert result.sd_perturbation.shape == (4, 48 + 256, *low_level.shape[-2:])
    assert result.sd_perturbation.abs().max().item() == pytest.approx(2 * 3.0 / 255, rel=1e-5)
    mixed = afan_step(model, images, masks, AfanConfig(sd_layer="concat", sd_steps=2, gamma_sd=3.0, sd_mix=True))
    assert mixed.losses["loss_sd"] != result.losses["loss_sd"]
    torch.testing.assert_close(mixed.losses["loss_1"], result.losses["loss_1"])  # SE untouched by the SD setting


def test_attacks_raise_the_loss_they_attack(model):
    """Without mixing, the strongest SE strength and the SD feature give a larger loss than the
    clean pass, on average over a few batches."""
    cfg = AfanConfig(gamma_se=20.0, gamma_sd=20.0, mask="00")
    gains_se, gains_sd = [], []
    for seed in range(3):
        terms = afan_step(model, *batch(seed), cfg).losses
        gains_se.append(terms["loss_2"] - terms["loss_0"])
        gains_sd.append(terms["loss_sd"] - terms["loss_0"])
    assert sum(gains_se) > 0 and sum(gains_sd) > 0


def test_aux_bn_takes_the_adversarial_statistics(model):
    images, masks = batch()
    model.convert_aux_bn("layer3")
    aux_layers = {n: m for n, m in model.named_modules() if isinstance(m, afan.AuxBatchNorm2d)}
    assert "classifier.classifier.1" in aux_layers and "classifier.project.1" not in aux_layers
    assert not any(n.startswith("backbone.low_level_features") for n in aux_layers)
    reference = copy.deepcopy(model)
    afan_step(model, images, masks, AfanConfig(aux_bn=True))
    with afan.use_aux_bn(reference, enabled=False):
        reference(images)
    for name, layer in aux_layers.items():
        main = dict(reference.named_modules())[name]
        torch.testing.assert_close(layer.running_mean, main.running_mean, rtol=0, atol=0)  # clean pass only
        assert not torch.equal(layer.aux_bn[0].running_mean, main.aux_bn[0].running_mean), name  # adversarial passes


def test_advprop_image_stays_in_the_eps_ball_and_in_range(model):
    afan.convert_aux_bn(model)
    images, masks = batch()
    result = advprop_step(model, images, masks, AdvPropConfig(steps=2, step_size=2.0, eps=3.0))
    adv = images + result.perturbation
    assert result.perturbation.abs().max() <= 3.0 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    torch.testing.assert_close(result.loss.detach(), (result.losses["loss_clean"] + result.losses["loss_adv"]) / 2)
