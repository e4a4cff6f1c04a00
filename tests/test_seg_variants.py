"""The release's segmentation variants against a re-statement of their steps, in float64.

``restated`` writes the release's multi-layer step (``Segmentation/main_aug_muti_clean.py`` of
VITA-Group/CV_A-FAN with ``attack_algo.py``; ``--mix_all``) and its input adversarial training
(``main_aug_muti_advt.py``: ``attack_algo.adv_input`` with randinit and clip) from their
facts, on the project's DeepLabv3+ parts, pass by pass: the PGD images and their full pass; a
head pass per stage (``low_level`` of the first kept attached for every tail), the stage's
feature detached, one sign step of its own gamma through the tail, ``mix_feature``, its tail;
a clean pass to the decoder's concatenated feature, detached, one sign step through the
classifier, ``mix_feature``, the classifier; the ``--loss_settings`` sum. It is compared with
``Segmentation.steps.afan_step``: loss, every term, every gradient. SD at ``concat`` on its
own is covered by tests/test_seg_steps.py and the released Cityscapes settings in
tests/test_seg_release.py; the random start and projection of SE and SD by their bounds here.
"""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1
from torchvision.models.segmentation.deeplabv3 import ASPP

from afan_harness.config import load_config
from afan_harness.settings import InputPgdConfig, MultiLayerConfig
from Segmentation.config import AfanConfig, TrainConfig
from Segmentation.models import create_model
from Segmentation.steps import afan_step
from release_ops import mix_feature, sign_step

NUM_CLASSES = 4
LAYERS = ["layer1", "layer2", "layer3", "layer4"]
# --loss_settings 2 of main_aug_muti_clean.py: 0.3 (L0 + L3 + L5) + 0.1 (L1 + L2 + L4) / 3
SETTING_2 = [0.3, 0.1 / 3, 0.1 / 3, 0.3, 0.1 / 3, 0.3]


@pytest.fixture
def net(built_once):
    """The DeepLabv3+ R-50 of tests/test_seg_release.py, small enough for float64 on a CPU (one
    bottleneck per stage, layer4 and the ASPP 256 channels wide; MobileNetV2's depthwise
    convolutions have no fast float64 path), in training mode, without dropout (the two steps
    would draw different masks)."""
    def build():
        model = create_model("deeplabv3plus_resnet50", NUM_CLASSES)
        for name in LAYERS:
            setattr(model.backbone, name, getattr(model.backbone, name)[:1])
        model.backbone.layer4 = nn.Sequential(Bottleneck(1024, 64, downsample=nn.Sequential(conv1x1(1024, 256),
                                                                                            nn.BatchNorm2d(256))))
        model.classifier.aspp = ASPP(256, (6, 12, 18))
        model.classifier.aspp.project[-1].p = 0.0
        return model.double().train()
    return built_once.get("r50-small", build, seed=0)


def batch(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    masks = torch.randint(0, NUM_CLASSES, (2, size, size), generator=g)
    masks[:, :3] = 255
    return images, masks


def criterion(logits, masks):
    return F.cross_entropy(logits, masks, ignore_index=255)


def adv_input(net, images, masks, *, steps, gamma, eps):
    adv = images + (2.0 * torch.rand(images.shape, dtype=images.dtype) - 1.0) * eps
    for _ in range(steps):
        adv = sign_step(adv, lambda x: criterion(net(x), masks), gamma)
        adv = torch.min(torch.max(adv, images - eps), images + eps)
    return adv.clamp(0, 1)


def restated(net, images, masks, *, gammas, gamma_sd, weights, pgd=None):
    size = images.shape[-2:]
    if pgd is not None:
        loss_adv_images = criterion(net(adv_input(net, images, masks, steps=pgd.steps, gamma=pgd.step_size / 255,
                                                  eps=pgd.eps / 255)), masks)
    heads = [net.head(images, at) for at in LAYERS]
    low = heads[0].low_level  # output_dict1["low_level"], attached
    deepest = net.head(images, "layer4")  # the SD head pass (concat_head)
    sd_clean = net.fuse(net.encode(deepest.feature, "layer4"), deepest.low_level).detach()
    terms = [loss_adv_images if pgd is not None else criterion(net(images), masks)]
    for at, gamma, head in zip(LAYERS, gammas, heads):
        h = head.feature.detach()
        adv = sign_step(h, lambda f, at=at: criterion(net.tail(f, at, low.detach(), size), masks), gamma / 255)
        terms.append(criterion(net.tail(mix_feature(h, adv), at, low, size), masks))
    sd_adv = sign_step(sd_clean, lambda f: criterion(net.classify(f, size), masks), gamma_sd / 255)
    terms.append(criterion(net.classify(mix_feature(sd_clean, sd_adv), size), masks))
    loss = sum(w * t for w, t in zip(weights, terms))
    loss.backward()
    return loss.detach(), [t.detach() for t in terms]


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same_gradients(ours, reference):
    """Every parameter's gradient to 1e-8 of its norm, or of 1e-6 of the whole gradient's where
    it is zero but for rounding (a BN bias feeding only the next training-mode BN through a
    convolution: BN removes any constant shift)."""
    expected = dict(reference.named_parameters())
    scale = torch.stack([p.grad.norm() for p in expected.values()]).norm()
    for name, p in ours.named_parameters():
        q = expected[name].grad
        assert ((p.grad - q).norm() / torch.maximum(q.norm(), 1e-6 * scale)).item() < 1e-8, name


@pytest.mark.parametrize("pgd", [None, InputPgdConfig(enabled=True, steps=2, step_size=1.0, eps=4.0)],
                         ids=["muti_clean", "muti_advt"])
def test_the_multi_layer_step_is_the_release_step(net, pgd):
    reference = copy.deepcopy(net)
    gammas = [2.0, 2.0, 4.0, 2.0]
    multi = MultiLayerConfig(layers=LAYERS, gammas=gammas, eps=[2.0] * 4, mask="1111", weights=SETTING_2)
    cfg = AfanConfig(multi=multi, sd_layer="concat", gamma_sd=3.0, sd_mix=True,
                     **({"input_pgd": pgd} if pgd is not None else {}))
    images, masks = batch()
    torch.manual_seed(2)  # the same random start of the PGD images in both
    result = afan_step(net, images, masks, cfg)
    result.loss.backward()
    torch.manual_seed(2)
    loss, terms = restated(reference, images, masks, gammas=gammas, gamma_sd=3.0, weights=SETTING_2, pgd=pgd)
    names = ["loss_0", *(f"loss_{at}" for at in LAYERS), "loss_sd"]
    assert [n for n in result.losses if n != "loss_input_pgd"] == names
    for name, term in zip(names, terms):
        assert relative(result.losses[name], term) < 1e-10, name
    assert relative(result.loss.detach(), loss) < 1e-10
    assert_same_gradients(net, reference)
    assert result.perturbation.shape[0] == 2 and result.perturbation.abs().max().item() == pytest.approx(4.0 / 255)


def test_random_start_and_projection_bound_se_and_sd_by_their_radii(net):
    images, masks = batch(1)
    start = AfanConfig(se_steps=0, sd_steps=0, random_start=True, eps_se=3.0, eps_sd=1.0)
    result = afan_step(copy.deepcopy(net), images, masks, start)
    for delta, eps in ((result.perturbation, 3.0 / 255), (result.sd_perturbation, 1.0 / 255)):
        assert 0.9 * eps < delta.abs().max().item() <= eps * (1 + 1e-9)
    projected = AfanConfig(se_steps=2, sd_steps=2, gamma_se=5.0, gamma_sd=5.0, project=True, eps_se=3.0, eps_sd=1.0)
    result = afan_step(copy.deepcopy(net), images, masks, projected)
    assert result.perturbation.abs().max().item() == pytest.approx(3.0 / 255)
    assert result.sd_perturbation.abs().max().item() == pytest.approx(1.0 / 255)


def test_input_pgd_in_place_of_the_clean_term_also_gives_the_logits(net):
    """``main_aug_muti_advt.py``'s pixel PGD are the segmentation defaults (5 steps of 1/255
    within 4/255); with the PGD images as ``L_0`` the training accuracy is theirs."""
    pgd = AfanConfig().input_pgd
    assert (pgd.enabled, pgd.steps, pgd.step_size, pgd.eps, pgd.random_start, pgd.project) == \
        (False, 5, 1.0, 4.0, True, True)
    images, masks = batch(2)
    cfg = AfanConfig(input_pgd=InputPgdConfig(enabled=True, steps=1, step_size=1.0, eps=4.0, weight=0.5))
    result = afan_step(copy.deepcopy(net), images, masks, cfg)
    t = result.losses
    assert t["loss_0"] == t["loss_input_pgd"]
    expected = 0.7 * t["loss_0"] + 0.1 * (t["loss_1"] + t["loss_2"] + t["loss_sd"])
    torch.testing.assert_close(result.loss.detach(), 0.5 * expected + 0.5 * t["loss_input_pgd"])
    torch.testing.assert_close(criterion(result.logits, masks), t["loss_0"])


def test_the_variant_configs_hold_the_releases_settings():
    folder = Path(__file__).resolve().parents[1] / "Segmentation" / "configs" / "variants"
    clean = load_config(TrainConfig, folder / "voc12_resnet50_afan_multi.yaml").afan
    assert clean.multi == MultiLayerConfig(layers=LAYERS, gammas=[0.001, 0.001, 0.1, 0.001], eps=[2.0] * 4,
                                           mask="1111", weights=[0.4, 0.05, 0.05, 0.4, 0.05, 0.05])
    assert (clean.sd, clean.sd_layer, clean.gamma_sd, clean.sd_mix, clean.se_steps, clean.sd_steps) == \
        (True, "concat", 0.4, True, 1, 1)
    advt = load_config(TrainConfig, folder / "voc12_resnet50_afan_multi_advt.yaml").afan
    assert advt.multi.weights == [0.8, 0.04, 0.04, 0.04, 0.04, 0.04]
    assert advt.input_pgd == InputPgdConfig(enabled=True, steps=5, step_size=1.0, eps=4.0)
    for path in folder.glob("*.yaml"):
        assert load_config(TrainConfig, path).out.endswith(path.stem), path
