"""The attacks every ``test.py`` scores a trained model under: the feature attack (the release's
``eval_sat_layers.py``: sign steps, a strength of five points, optional mixing) against an
independent float64 re-statement; input PGD through the auxiliary BN in eval mode; the
detection passes the attacks use (losses mode, the evaluation tail) and each task's attacked
predictions, which equal the clean ones when the attack cannot move."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import afan
from afan_harness.robustness import FeatureAttack
from afan_harness.settings import AdvPropConfig
from Classification.evaluation import pgd_logits
from Detection.evaluation import feature_outputs, pgd_outputs
from Detection.models import create_model as create_detector, head, prepare
from Detection.models.parts import losses_mode, tail_detections
from Segmentation.config import EvalConfig
from Segmentation.evaluation import feature_logits as seg_feature_logits, pgd_logits as seg_pgd_logits, predict
from Segmentation.models import create_model as create_segmenter
from release_ops import mix_feature, sign_step


def _tail_and_feature():
    torch.manual_seed(0)
    tail = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3)).double()
    return tail, torch.randn(4, 6, 5, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("point", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("mix", [False, True])
def test_feature_attack_is_the_releases_point_of_its_sign_steps(point, mix):
    """The release: ``steps`` sign steps of gamma/255 from the clean feature, its five points
    ``clean + (k/4)(adv - clean)``, the chosen one re-normalised to the clean statistics with
    ``--mix`` (``mix_feature(point, clean)``)."""
    tail, h, y = _tail_and_feature()
    loss_fn = lambda f: F.cross_entropy(tail(f), y)
    adv = h
    for _ in range(3):
        adv = sign_step(adv, loss_fn, 4.0 / 255)
    expected = h + point / 4 * (adv - h)
    if mix:
        expected = mix_feature(expected, h)
    attack = FeatureAttack("layer", gamma=4.0, steps=3, strength=point / 4, mix=mix)
    torch.testing.assert_close(attack.perturb(h, loss_fn), expected, rtol=1e-10, atol=1e-12)


def test_feature_attack_starts_and_stays_in_its_ball_when_asked():
    tail, h, y = _tail_and_feature()
    attack = FeatureAttack("layer", gamma=8.0, steps=4, eps=2.0, random_start=True, project=True, strength=1.0)
    torch.manual_seed(1)
    moved = attack.perturb(h, lambda f: F.cross_entropy(tail(f), y))
    assert (moved - h).abs().max() <= 2.0 / 255 + 1e-12 and not torch.equal(moved, h)
    # The default (the release's): no projection, so 10 steps of 0.5/255 go past 2/255.
    far = FeatureAttack("layer", strength=1.0).perturb(h, lambda f: F.cross_entropy(tail(f), y))
    assert (far - h).abs().max() == pytest.approx(10 * 0.5 / 255)
    assert FeatureAttack("layer").summary()["feature_strength"] == 0.25


def test_use_aux_bn_in_eval_routes_through_the_auxiliary_running_statistics():
    torch.manual_seed(0)
    model = afan.convert_aux_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    aux = model[1].aux_bn[0]
    aux.running_mean.uniform_(-1, 1), aux.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    main_out = model(x)
    with afan.use_aux_bn(model):  # timm's rule: evaluation uses the main BN
        torch.testing.assert_close(model(x), main_out)
    with afan.use_aux_bn(model, in_eval=True):
        torch.testing.assert_close(model(x), aux(model[0](x)))
        assert not torch.allclose(model(x), main_out)
    torch.testing.assert_close(model(x), main_out)  # the route is gone after the context
    assert not any(getattr(m, "route_in_eval", False) for m in model.modules())


def test_classification_pgd_through_the_auxiliary_bn_is_the_attack_of_a_model_with_those_statistics():
    """``pgd_logits(bn="aux")`` on a model in eval mode: the PGD images are those made against
    a twin whose BatchNorm holds the auxiliary running statistics; the logits are the main
    BN's. (The route used to be ignored in eval mode, so "aux" attacked the main BN.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    model = afan.convert_aux_bn(copy.deepcopy(net)).eval()
    aux = model[1].aux_bn[0]
    aux.running_mean.uniform_(-1, 1), aux.running_var.uniform_(0.2, 3)
    twin = copy.deepcopy(net).eval()
    twin[1].load_state_dict(aux.state_dict())
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    attack = AdvPropConfig(steps=3, step_size=2.0, eps=4.0, random_start=True)
    torch.manual_seed(2)
    through_aux = pgd_logits(model, attack, "aux")(x, y)
    torch.manual_seed(2)
    twin_images = afan.pixel_pgd(x, lambda images: F.cross_entropy(twin(images), y), **attack.attack())
    torch.testing.assert_close(through_aux, model(twin_images))
    torch.manual_seed(2)
    assert not torch.allclose(pgd_logits(model, attack, "main")(x, y), through_aux)


# -- detection -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = create_detector("fasterrcnn_resnet18_c4", 5, anchor_sizes=[16, 32, 64], roi_batch_size=32, min_size=64,
                            max_size=96, norm="bn").eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])} for _ in images]
    return model, images, targets


def test_losses_mode_trains_the_heads_keeps_norms_and_resizing_in_eval_and_restores_every_mode(detector):
    model, images, targets = detector
    before = {name: m.training for name, m in model.named_modules()}
    with losses_mode(model):
        assert model.rpn.training and model.roi_heads.training and not model.transform.training
        assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        image_list, scaled = prepare(model, images, targets)
        losses = model.rpn(image_list, model.backbone(image_list.tensors), scaled)[1]
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # running stats read only
    assert {name: m.training for name, m in model.named_modules()} == before


@pytest.mark.parametrize("at", ["layer2", "layer3"])
def test_the_evaluation_tail_from_the_clean_feature_is_the_model(detector, at):
    model, images, targets = detector
    with torch.no_grad():
        expected = model(images)
        image_list, _ = prepare(model, images, targets)
        found = tail_detections(model, head(model, image_list.tensors, at), at, image_list,
                                [image.shape[-2:] for image in images])
    for ours, theirs in zip(found, expected):
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(ours[key], theirs[key])


def test_detection_attacks_that_cannot_move_give_the_clean_detections(detector):
    model, images, targets = detector
    with torch.no_grad():
        expected = model(images)
    still = [feature_outputs(model, FeatureAttack("layer2", steps=2, strength=0.0)),
             pgd_outputs(model, AdvPropConfig(steps=2, step_size=0.0, eps=0.0, random_start=False))]
    for outputs in still:
        for ours, theirs in zip(outputs(images, targets), expected):
            torch.testing.assert_close(ours["boxes"], theirs["boxes"])
            torch.testing.assert_close(ours["scores"], theirs["scores"])
    moved = feature_outputs(model, FeatureAttack("layer2", gamma=50.0, steps=2, strength=1.0))(images, targets)
    assert any(o["scores"].shape != e["scores"].shape or not torch.allclose(o["scores"], e["scores"])
               for o, e in zip(moved, expected))
    assert not model.training


# -- segmentation ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    model = create_segmenter("deeplabv3plus_mobilenet", 4).eval()
    images, masks = torch.rand(2, 3, 40, 48), torch.randint(0, 4, (2, 40, 48))
    masks[:, :3] = 255
    return model, images, masks


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_segmentation_attacks_that_cannot_move_give_the_clean_prediction(segmenter, mode):
    model, images, masks = segmenter
    cfg = EvalConfig(mode=mode, crop=32, stride=16)
    clean = predict(model, images, 4, cfg)
    for forward in (seg_feature_logits(model, FeatureAttack("layer3", steps=2, strength=0.0)),
                    seg_pgd_logits(model, AdvPropConfig(steps=2, step_size=0.0, eps=0.0, random_start=False))):
        assert torch.equal(predict(model, images, 4, cfg, masks=masks, forward=forward), clean)


def test_segmentation_feature_attack_raises_the_loss_it_climbs(segmenter):
    model, images, masks = segmenter
    size = images.shape[-2:]
    loss = lambda logits: F.cross_entropy(logits, masks, ignore_index=255).item()
    attacked = seg_feature_logits(model, FeatureAttack("layer3", gamma=20.0, steps=3, strength=1.0))(images, masks)
    assert loss(attacked) > loss(model(images))
    assert attacked.shape == (2, 4, *size)
