"""Detection training steps: base equals torchvision, attacks are bounded and leave
gradients (and, when asked, BN statistics) alone, the A-FAN loss is the release's formula."""
import copy
import dataclasses

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

import afan
from afan_harness.config import load_config
from afan_harness.settings import AdvPropConfig
from Detection.config import AfanConfig, TrainConfig
from Detection.models import create_model, head, predictor_losses, prepare, tail
from Detection.steps import advprop_step, afan_step, base_step, pixel_pgd, sd_attack, se_attack

TINY = {"min_size": 64, "max_size": 96}
FPN = ("fasterrcnn_resnet18_fpn", {"anchor_sizes": [16, 32, 64, 128, 256], "roi_batch_size": 64})
C4 = ("fasterrcnn_resnet18_c4", {"anchor_sizes": [16, 32, 64], "roi_batch_size": 64})


@pytest.fixture(scope="module")
def make_model(built_once):
    """``make_model(norm="frozen", seed=0, device="cpu", arch=C4)``: a small detector (64 sampled
    RoIs per image: the RoI head dominates CPU time), built under ``torch.manual_seed(seed)``
    once per module; each call is a fresh copy, with the random state of a fresh build."""
    def make(norm="frozen", seed=0, device="cpu", arch=C4):
        name, options = arch
        build = lambda: create_model(name, 5, norm=norm, **options, **TINY).train()
        return built_once.get((name, repr(options), norm, seed), build, seed=seed).train().to(device)
    return make


def on(device, images, targets):
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = []
    for image in images:
        h, w = image.shape[1:]
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 5, (2,), generator=g)})
    return images, targets


def clean_pass(model, images, targets, at="layer2"):
    image_list, targets = prepare(model, images, targets)
    feats = head(model, image_list.tensors, at)
    losses, roi = tail(model, feats, at, image_list, targets, return_roi=True)
    return image_list, targets, feats, losses, roi


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def rpn_losses(losses):
    return losses["loss_objectness"] + losses["loss_rpn_box_reg"]


@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_base_step_equals_torchvision(norm, device, make_model):
    model = make_model(norm, device=device, arch=FPN)
    reference = copy.deepcopy(model)  # BN statistics move with every training pass
    images, targets = on(device, *batch())
    torch.manual_seed(5)
    expected = reference(images, targets)
    torch.manual_seed(5)
    result = base_step(model, images, targets)
    assert list(result.losses) == list(expected)
    for key, value in expected.items():
        assert torch.allclose(result.losses[key], value.detach(), atol=1e-5, rtol=0), key
    assert torch.allclose(result.loss, sum(expected.values()), atol=1e-5, rtol=0)
    # The A-FAN step's clean term is the same pass (same random sampling).
    torch.manual_seed(5)
    cfg = AfanConfig(se_steps=0, n=1, mask="0", sd=False)
    afan_result = afan_step(copy.deepcopy(reference), images, targets, cfg)
    assert torch.allclose(afan_result.losses["loss_0"], result.loss.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_c4_model_trains_with_its_own_forward_and_equals_torchvision_fasterrcnn(norm, device):
    """The C4 detector's training pass (``base_step``, through ``parts``) gives the losses of
    its own ``forward`` and, at torchvision's smooth-L1 beta 1/9, those of torchvision's
    ``FasterRCNN`` assembled from the same parts; at the release's beta 1.0 the box losses
    follow the smooth-L1 formula (same sampling)."""
    torch.manual_seed(0)
    name, options = C4
    model = create_model(name, 5, norm=norm, **options, **TINY, rpn_smooth_l1_beta=1 / 9,
                         roi_smooth_l1_beta=1 / 9).train().to(device)
    heads = model.roi_heads
    reference = FasterRCNN(copy.deepcopy(model.backbone), num_classes=None, rpn_anchor_generator=model.rpn.anchor_generator,
                           rpn_head=copy.deepcopy(model.rpn.head), box_roi_pool=heads.box_roi_pool,
                           box_head=copy.deepcopy(heads.box_head), box_predictor=copy.deepcopy(heads.box_predictor),
                           rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000, box_batch_size_per_image=64,
                           **TINY).train().to(device)
    images, targets = on(device, *batch())
    runs = {}
    for label, fn in (("parts", lambda: base_step(copy.deepcopy(model), images, targets).losses),
                      ("forward", lambda: copy.deepcopy(model)(images, targets)),
                      ("torchvision", lambda: reference(images, targets))):
        torch.manual_seed(5)
        runs[label] = {k: v.detach() for k, v in fn().items()}
    torch.testing.assert_close(runs["parts"], runs["forward"], rtol=0, atol=0)
    torch.testing.assert_close(runs["parts"], runs["torchvision"], rtol=1e-5, atol=1e-6)
    # beta 1.0: for |d| < 1 smooth-L1 is d^2 / 2 instead of 9 d^2 / 2 (and |d| - 1/18 beyond 1/9).
    released = copy.deepcopy(model)
    released.rpn.smooth_l1_beta = released.roi_heads.smooth_l1_beta = 1.0
    torch.manual_seed(5)
    losses = base_step(released, images, targets).losses
    assert torch.equal(losses["loss_objectness"], runs["parts"]["loss_objectness"])
    assert losses["loss_box_reg"] < runs["parts"]["loss_box_reg"]


@pytest.mark.parametrize("arch", [C4, FPN], ids=["c4", "fpn"])
def test_attacks_are_bounded_and_touch_neither_grads_nor_frozen_bn_stats(device, arch, make_model):
    model = make_model("bn", device=device, arch=arch)
    afan.convert_aux_bn(model, after="backbone.body.layer2")
    cfg = AfanConfig(se_steps=2, gamma_se=1.0, sd_steps=3, gamma_sd=0.1, aux_bn=True, attack_bn_stats="frozen")
    images, targets = on(device, *batch())
    image_list, targets, feats, clean, roi = clean_pass(model, images, targets)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = bn_buffers(model)
    assert any(".aux_bn." in k for k in buffers)

    h_adv = se_attack(model, feats, "layer2", image_list, targets, cfg)
    box_adv = sd_attack(model, roi, rpn_losses(clean), cfg)

    se_delta = (h_adv - feats["layer2"]).abs().max().item()
    sd_delta = (box_adv - roi.box_features).abs().max().item()
    assert 0 < se_delta <= 2 * 1.0 / 255 + 1e-6
    assert 0 < sd_delta <= 3 * 0.1 / 255 + 1e-6
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for key, value in bn_buffers(model).items():
        assert torch.equal(value, buffers[key]), key


def test_attack_updates_bn_stats_by_default_as_released(make_model):
    """The release's attack passes run in training mode and move BN running statistics;
    ``attack_bn_stats="frozen"`` (above) keeps them."""
    model = make_model("bn")
    image_list, targets, feats, _, _ = clean_pass(model, *batch())
    before = bn_buffers(model)
    se_attack(model, feats, "layer2", image_list, targets, AfanConfig(se_steps=1))
    after = bn_buffers(model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.startswith(("backbone.body.layer3", "roi_heads.box_head.")) for k in moved)


def test_only_roi_changes_the_sd_attacks_loss_not_its_perturbation(make_model):
    model = make_model()
    _, _, _, clean, roi = clean_pass(model, *batch())
    perturbations = [sd_attack(model, roi, rpn_losses(clean), AfanConfig(only_roi=only, gamma_sd=5.0))
                     for only in (True, False)]
    assert torch.equal(*perturbations)


def test_attacks_raise_their_loss(make_model):
    model = make_model()
    cfg = AfanConfig(se_steps=1, gamma_se=20.0, sd_steps=1, gamma_sd=20.0)
    se_gain, sd_gain = [], []
    for seed in range(3):
        images, targets = batch(seed)
        image_list, targets, feats, clean, roi = clean_pass(model, images, targets)
        h_adv = se_attack(model, feats, "layer2", image_list, targets, cfg)
        box_adv = sd_attack(model, roi, rpn_losses(clean), cfg)
        with torch.no_grad():
            def se_loss(feature):
                torch.manual_seed(100 + seed)  # the same RPN/RoI sampling for both
                return sum(tail(model, {**feats, "layer2": feature}, "layer2", image_list, targets).values())

            def sd_loss(box_features):
                return sum(predictor_losses(model.roi_heads, box_features, roi.labels,
                                            roi.regression_targets).values())

            se_gain.append(se_loss(h_adv) - se_loss(feats["layer2"]))
            sd_gain.append(sd_loss(box_adv) - sd_loss(roi.box_features))
    assert sum(se_gain) > 0
    assert all(g > 0 for g in sd_gain)


@pytest.mark.parametrize("options", [{}, {"sd_mix": True, "sd_noise": 0.5, "only_roi": False},
                                     {"sd": False, "n": 2, "mask": "01"}])
def test_afan_step_loss_is_the_release_formula(options, make_model):
    model = make_model()
    cfg = AfanConfig(**options)
    images, targets = batch()
    result = afan_step(model, images, targets, cfg)
    terms = [result.losses[f"loss_{i}"] for i in range(cfg.n + 1)]
    expected = sum(terms) / 3
    if cfg.sd:
        expected = expected * (1 - cfg.w) + result.losses["loss_sd"] / 3 * cfg.w
        assert result.sd_perturbation.abs().max() <= cfg.sd_steps * cfg.gamma_sd / 255 + 1e-6
    else:
        assert "loss_sd" not in result.losses and result.sd_perturbation is None
    assert torch.allclose(result.loss.detach(), expected, atol=1e-6)
    assert result.se_perturbation.abs().max() <= cfg.se_steps * cfg.gamma_se / 255 + 1e-6
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(result.losses)


@pytest.mark.parametrize("se_trains_head", [False, True])
def test_afan_step_gradients_equal_those_of_the_plain_sum_of_its_passes(se_trains_head, make_model):
    """The strength passes are back-propagated one at a time (``afan.backward_each``); the
    step's gradients are those of the release's loss written as one plain sum, with the
    strengths built from the clean feature detached (the release) or attached."""
    cfg = AfanConfig(sd=False, se_trains_head=se_trains_head)
    model = make_model(arch=FPN)
    reference = copy.deepcopy(model)
    images, targets = batch()
    torch.manual_seed(4)  # the same RPN and RoI sampling in both
    result = afan_step(model, images, targets, cfg)
    result.loss.backward()
    torch.manual_seed(4)
    image_list, prepared, feats, clean, _ = clean_pass(reference, images, targets)
    h = feats["layer2"] if se_trains_head else feats["layer2"].detach()
    h_adv = se_attack(reference, feats, "layer2", image_list, prepared, cfg)
    strengths = afan.mix_by_mask(h, afan.interpolate(h, h_adv, cfg.n), cfg.mask)
    passes = [sum(tail(reference, {**feats, "layer2": f}, "layer2", image_list, prepared).values()) for f in strengths]
    plain = (sum(clean.values()) + sum(passes)) / 3
    plain.backward()
    torch.testing.assert_close(result.loss, plain)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


class FirstSampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler taking the first positives and negatives instead of random ones,
    so passes over the same images sample the same anchors and RoIs."""

    def __call__(self, matched_idxs):
        positives, negatives = [], []
        for matched in matched_idxs:
            pos, neg = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
            num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
            masks = [torch.zeros_like(matched, dtype=torch.uint8) for _ in range(2)]
            masks[0][pos[:num_pos]], masks[1][neg[:num_neg]] = 1, 1
            positives.append(masks[0]), negatives.append(masks[1])
        return positives, negatives


@pytest.mark.parametrize("arch", [C4, FPN], ids=["c4", "fpn"])
def test_batched_strengths_give_the_per_strength_loss_and_gradients(arch, make_model):
    """``afan.batched``: one tail pass over the strengths of every image gives the loss and
    gradients of one pass per strength (float64), where each image samples its full count
    (here with the same anchors and RoIs sampled in both, deterministically). Up to 1e-7: the
    joined pass sums and pools in another order, and torchvision keeps a few box computations
    in float32."""
    cfg = AfanConfig(se_steps=1, gamma_se=5.0, sd=True)
    results = []
    for batched in (False, True):
        model = make_model(arch=arch).double()
        model.rpn.fg_bg_sampler = FirstSampler(256, 0.5)
        model.roi_heads.fg_bg_sampler = FirstSampler(8, 0.25)
        images, targets = batch()
        images = [image.double() for image in images]
        result = afan_step(model, images, targets, dataclasses.replace(cfg, batched=batched))
        result.loss.backward()
        results.append((result, [p.grad for p in model.parameters() if p.requires_grad]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-7, atol=1e-10)
    mean = sum(want.losses[f"loss_{i}"] for i in range(1, cfg.n + 1)) / cfg.n
    torch.testing.assert_close(got.losses["loss_strengths"], mean, rtol=1e-7, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_batched_strengths_need_frozen_batch_norm(make_model):
    model = make_model("bn")
    with pytest.raises(ValueError, match=r"'backbone.body.layer3.0.bn1' \(BatchNorm2d\) normalises with the statistics"):
        afan_step(model, *batch(), AfanConfig(batched=True, sd=False))
    with pytest.raises(ValueError, match=r"afan.batched .*\(model.norm=frozen\)"):
        load_config(TrainConfig, overrides=["afan.batched=true", "model.norm=bn"])


def _assert_finite_grads(model, loss):
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_afan_step_with_aux_bn_backprops(make_model):
    model = make_model("bn")
    afan.convert_aux_bn(model, after="backbone.body.layer2")
    cfg = AfanConfig(aux_bn=True, sd_mix=True)
    result = afan_step(model, *batch(), cfg)
    assert torch.isfinite(result.loss)
    _assert_finite_grads(model, result.loss)
    # The adversarial passes trained the auxiliary BN of layer3, the clean pass the main one.
    bn = model.backbone.body.layer3[0].bn1
    assert bn.weight.grad.abs().sum() > 0 and bn.aux_bn[0].weight.grad.abs().sum() > 0


def test_advprop_step_backprops_and_pgd_is_bounded(make_model):
    model = make_model("bn")
    afan.convert_aux_bn(model)
    cfg = AdvPropConfig(steps=2, step_size=1.0, eps=2.0)
    images, targets = batch()
    buffers = bn_buffers(model)
    with afan.frozen_bn_stats(model), afan.use_aux_bn(model):  # as advprop_step runs it
        adv = pixel_pgd(model, images, targets, cfg)
    for key, value in bn_buffers(model).items():
        assert torch.equal(value, buffers[key]), key
    for a, x in zip(adv, images):
        assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
        assert (a - x).abs().max() <= 2 / 255 + 1e-6
    result = advprop_step(model, images, targets, cfg)
    assert torch.allclose(result.loss.detach(), (result.losses["loss_clean"] + result.losses["loss_adv"]) / 2)
    _assert_finite_grads(model, result.loss)
    bn = model.backbone.body.layer3[0].bn1  # layer1 is frozen (trainable_layers=3)
    assert bn.weight.grad.abs().sum() > 0 and bn.aux_bn[0].weight.grad.abs().sum() > 0


def test_advprop_needs_aux_bn(make_model):
    with pytest.raises(ValueError, match="convert_aux_bn"):
        advprop_step(make_model(), *batch(), AdvPropConfig())


def test_channels_last_gives_the_same_training_step(device, make_model):
    images, targets = on(device, *batch())
    runs = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = make_model("bn", device=device, arch=FPN).to(memory_format=memory_format)
        torch.manual_seed(3)
        base = base_step(model, images, targets)
        base.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.manual_seed(3)
        runs.append((base, grads, afan_step(model, images, targets, AfanConfig(n=2, mask="01"))))
    (base, grads, afan), (nhwc_base, nhwc_grads, nhwc_afan) = runs
    assert nhwc_grads["backbone.body.layer3.0.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    # Equal losses; the gradients are not compared entry by entry: a near-tie among the
    # proposals' scores may order another way and hand the sampler other RoIs.
    torch.testing.assert_close(nhwc_base.losses, base.losses, rtol=1e-4, atol=1e-5)
    assert nhwc_grads.keys() == grads.keys()
    torch.testing.assert_close(nhwc_afan.losses["loss_0"], afan.losses["loss_0"], rtol=1e-4, atol=1e-5)
    # The SE step is gamma * sign(gradient): where the gradient is zero up to rounding (units
    # that ReLU switched off), another summation order may give the other sign. A few % of
    # the entries, so the strengths' losses can differ by about 1%.
    same = (nhwc_afan.se_perturbation - afan.se_perturbation).abs() < 1e-6
    assert same.float().mean() > 0.95
