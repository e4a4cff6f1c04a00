"""The segmentation A-FAN step against the release's, restated here from its facts.

``release_step`` below re-states one training iteration of the release
(``Segmentation/main_aug_final.py`` with ``attack_algo.py``, ``network/utils.py``,
``network/_deeplab.py`` and ``network/backbone/resnet.py`` of VITA-Group/CV_A-FAN) on this
project's DeepLabv3+ modules, pass by pass as the release runs them:

* an SE head pass (``flag 'head'``): stem, ``layer1`` (the low-level feature, kept attached)
  and the stages up to the split point, whose output is detached;
* an SD head pass: a second full clean backbone pass, then the decoder up to the SD feature
  (``aspp_head``: the ASPP output; ``concat_head``: the projected low-level feature
  concatenated with the upsampled ASPP output), detached;
* PGD on the SE feature through the tail (the rest of the backbone, ASPP, decoder reading
  the attached clean low-level feature, also when the split point is ``layer1``), sign steps
  of ``gamma_se / 255``, gradients towards the feature only;
* decoder PGD on the SD feature (``aspp_tail``: projection of the SD pass's low-level feature,
  upsampled SD feature, classifier; ``concat_tail``: the classifier alone), steps of
  ``gamma_sd / 255``; ``--mix_sd`` re-normalises the clean SD feature with its statistics;
* ``get_sample_points(clean, adv, 3)`` (``lerp`` at 0.5 and the attack's own tensor) and
  ``mix_feature`` (channel mean and unbiased variance + 1e-5 at every position) by
  ``--mix_layer``;
* a third, full clean pass for ``L0``, the tails on the two strengths for ``L1``, ``L2``, the SD
  tail for ``L3``; loss ``0.7 L0 + 0.1 L1 + 0.1 L2 + 0.1 L3``, one backward.

It is compared in float64 with ``Segmentation.steps.afan_step`` on copies of one model: the
loss, every loss term and every parameter gradient agree to 1e-8, relative (measured: terms to
6e-16, gradients to 6e-14).

The test fails on the code before this change (checked by putting it back in
``Segmentation.steps`` / ``models.deeplab`` for a run):

* strengths built from the clean SE feature attached (now ``se_trains_head=True``): every
  layer before the split point gets another gradient, the worst parameter off by 29% (relative
  norm; SE after layer3, mask 11, the VOC setting), 25% (after layer2, aspp or concat, the
  Cityscapes one), 7% (after layer3, mask 00) and 19% (after layer1), while the loss terms and
  the layers after the split agree; ``test_the_attached_se_feature_is_not_the_release`` keeps
  that measurement;
* the decoder reading the perturbed feature as its low-level input when SE is after layer1:
  ``L2`` off by 6e-4 and ``L1`` by 4e-5 (relative) at the step size used here.
"""
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1
from torchvision.models.segmentation.deeplabv3 import ASPP

from afan_harness.config import load_config
from Segmentation.config import AfanConfig, TrainConfig
from Segmentation.models import create_model
from Segmentation.steps import afan_step
from release_ops import mix_feature

NUM_CLASSES = 5
TERMS = ("loss_0", "loss_1", "loss_2", "loss_sd")  # the project's names of the release's loss0..loss3
STAGES = ("layer1", "layer2", "layer3", "layer4")
MEAN = (0.485, 0.456, 0.406)  # the release's NormalizeByChannelMeanStd
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# The release's passes, on the project's modules (``net.backbone.<torchvision ResNet names>``,
# ``net.classifier.{project, aspp, classifier}``).


def _normalise(images):
    # float32 constants, as the release's NormalizeByChannelMeanStd buffers hold them, cast
    # with the model
    mean = torch.tensor(MEAN).to(images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD).to(images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _stem_and_layer1(net, images):
    b = net.backbone
    return b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(_normalise(images))))))


def backbone_head(net, images, idx):
    """``flag 'head'``, ``out_idx = idx``: ``low_level`` is layer1's output, ``out`` stage idx's."""
    x = low = _stem_and_layer1(net, images)
    for name in STAGES[1:idx]:
        x = getattr(net.backbone, name)(x)
    return {"low_level": low, "out": x}


def backbone_tail(net, adv, idx, low_level_feat):
    """``flag 'tail'``: the stages after idx on ``adv``; ``low_level`` is the one passed in."""
    x = adv
    for name in STAGES[idx:]:
        x = getattr(net.backbone, name)(x)
    return {"low_level": low_level_feat, "out": x}


def backbone_clean(net, images):
    """``flag 'clean'``: the whole backbone."""
    return backbone_head(net, images, 4)


def classifier(net, feature, return_type=None):
    """``DeepLabHeadV3Plus.forward`` with its ``return_type`` branches."""
    head = net.classifier

    def concat(aspp_out):
        low = head.project(feature["low_level"])
        up = F.interpolate(aspp_out, size=low.shape[2:], mode="bilinear", align_corners=False)
        return torch.cat([low, up], dim=1)

    if return_type is None:
        return head.classifier(concat(head.aspp(feature["out"])))
    if return_type == "aspp_head":
        return head.aspp(feature["out"])
    if return_type == "aspp_tail":
        return head.classifier(concat(feature["adv"]))
    if return_type == "concat_head":
        return concat(head.aspp(feature["out"]))
    assert return_type == "concat_tail"
    return head.classifier(feature["adv"])


def upsample(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def get_sample_points(x, y, number):
    step = 1.0 / (number - 1)
    return [x] + [torch.lerp(x, y, i * step) for i in range(1, number - 1)] + [y]


def release_step(net, images, labels, *, se_idx, sd_layer, gamma_se, gamma_sd, mix, mix_sd, steps=1):
    """One release iteration up to ``loss.backward()``; returns the loss and its four terms."""
    size = images.shape[-2:]

    def criterion(logits):
        return F.cross_entropy(logits, labels, ignore_index=255)

    se = backbone_head(net, images, se_idx)
    sd = backbone_clean(net, images)
    sd["adv"] = classifier(net, sd, f"{sd_layer}_head")
    feature_map_sd = sd["adv"].detach()
    low_level_feat = se["low_level"]
    feature_map_se = se["out"].detach()

    x_adv = feature_map_se.clone().requires_grad_(True)  # attack_algo.PGD
    for _ in range(steps):
        logits = upsample(classifier(net, backbone_tail(net, x_adv, se_idx, low_level_feat)), size)
        grad = torch.autograd.grad(criterion(logits), x_adv, only_inputs=True)[0]
        x_adv.data.add_(gamma_se / 255 * torch.sign(grad.data))

    sd_adv = feature_map_sd.clone().requires_grad_(True)  # attack_algo.decoder_PGD
    sd["adv"] = sd_adv
    for _ in range(steps):
        logits = upsample(classifier(net, sd, f"{sd_layer}_tail"), size)
        grad = torch.autograd.grad(criterion(logits), sd_adv, only_inputs=True)[0]
        sd_adv.data.add_(gamma_sd / 255 * torch.sign(grad.data))
    adv_sd = sd_adv.detach()
    if mix_sd:
        adv_sd = mix_feature(feature_map_sd, adv_sd)
    sd["adv"] = adv_sd

    points = get_sample_points(feature_map_se, x_adv, 3)
    for k in (1, 2):
        if int(mix[k - 1]):
            points[k] = mix_feature(feature_map_se, points[k])

    outputs = [upsample(classifier(net, backbone_clean(net, images)), size),
               upsample(classifier(net, backbone_tail(net, points[1], se_idx, low_level_feat)), size),
               upsample(classifier(net, backbone_tail(net, points[2], se_idx, low_level_feat)), size),
               upsample(classifier(net, sd, f"{sd_layer}_tail"), size)]
    terms = [criterion(o) for o in outputs]
    loss = 0.7 * terms[0] + 0.1 * terms[1] + 0.1 * terms[2] + 0.1 * terms[3]
    loss.backward()
    return loss.detach(), [t.detach() for t in terms]


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    """The project's DeepLabv3+ R-50 with random weights, made small enough for float64 on a
    CPU: one bottleneck per stage, layer4 256 channels wide and the ASPP reading those (the
    passes and their order are untouched). Training mode, no dropout (the release's and the
    project's passes would draw different masks)."""
    torch.manual_seed(0)
    model = create_model("deeplabv3plus_resnet50", NUM_CLASSES)
    for name in STAGES:
        setattr(model.backbone, name, getattr(model.backbone, name)[:1])
    narrow = nn.Sequential(conv1x1(1024, 256), nn.BatchNorm2d(256))
    model.backbone.layer4 = nn.Sequential(Bottleneck(1024, 64, downsample=narrow))
    model.classifier.aspp = ASPP(256, (6, 12, 18))
    model.classifier.aspp.project[-1].p = 0.0
    return model.double().train()


def batch(size=32):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (2, size, size), generator=g)
    labels[:, :4] = 255  # ignored pixels
    return images, labels


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def compare(net, cfg):
    """Run the project's step and the release's on copies of ``net``; return the loss and
    term differences and the relative difference of every parameter gradient."""
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    images, labels = batch()
    result = afan_step(ours, images, labels, cfg)
    result.loss.backward()
    loss, terms = release_step(theirs, images, labels, se_idx=STAGES.index(cfg.se_layer) + 1,
                               sd_layer=cfg.sd_layer, gamma_se=cfg.gamma_se, gamma_sd=cfg.gamma_sd,
                               mix=cfg.mask, mix_sd=cfg.sd_mix, steps=cfg.se_steps)
    differences = {"loss": relative(result.loss.detach(), loss),
                   **{name: relative(result.losses[name], term) for name, term in zip(TERMS, terms)}}
    reference = dict(theirs.named_parameters())
    gradients = {name: relative(p.grad, reference[name].grad) for name, p in ours.named_parameters()}
    return differences, gradients


# (se_layer, mask, sd_layer, sd_mix): the released VOC settings (sh/voc/2012/clean50/
# 01_final50.sh runs 1 and 3) and Cityscapes ones (sh/city/clean50/091 FINAL01, 092 FINAL04),
# and SE after layer1, where the decoder must read the clean low-level feature. The step sizes
# are larger than released so that every adversarial term differs clearly from the clean one.
SETTINGS = [("layer3", "11", "aspp", False), ("layer2", "01", "aspp", False), ("layer2", "01", "concat", True),
            ("layer3", "00", "concat", True), ("layer1", "10", "aspp", False)]


@pytest.mark.parametrize("se_layer,mask,sd_layer,sd_mix", SETTINGS)
def test_the_afan_step_is_the_release_step(net, se_layer, mask, sd_layer, sd_mix):
    cfg = AfanConfig(se_layer=se_layer, mask=mask, sd_layer=sd_layer, sd_mix=sd_mix, gamma_se=2.0, gamma_sd=3.0)
    differences, gradients = compare(net, cfg)
    assert max(differences.values()) < 1e-8, differences
    worst = max(gradients, key=gradients.get)
    assert gradients[worst] < 1e-8, (worst, gradients[worst])


def test_the_attached_se_feature_is_not_the_release(net):
    """``se_trains_head=True`` (the code before this change) lets L1, L2 reach the layers
    before the split point: their gradients differ from the release's, the others do not."""
    cfg = AfanConfig(se_layer="layer3", gamma_se=2.0, gamma_sd=3.0, se_trains_head=True)
    differences, gradients = compare(net, cfg)
    assert max(differences.values()) < 1e-8, differences
    head = ("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3")
    before = [g for name, g in gradients.items() if name.startswith(head)]
    after = [g for name, g in gradients.items() if name.startswith(("backbone.layer4", "classifier."))]
    assert 0.2 < min(before) and max(before) < 0.4  # measured: 0.28 to 0.29
    assert max(after) < 1e-8


# --------------------------------------------------------------------------------------------
# The released settings. Each config is checked against values written out here from the
# release: its scripts' flags, else the defaults of Segmentation/args.py and what
# main_aug_final.py / main_ori.py hard-code.

CONFIGS = Path(__file__).resolve().parents[1] / "Segmentation" / "configs"

COMMON = {
    "model.name": "deeplabv3plus_resnet50",  # --model deeplabv3plus_resnet50
    "model.output_stride": 16,  # args.py default
    "model.backbone_weights": "weights/resnet50-0676ba61.pth",  # ImageNet R-50 (pretrained=True)
    "model.backbone_bn_momentum": 0.01,  # main_aug_final.py: utils.set_bn_momentum(model.backbone, 0.01)
    "iterations": 30000,  # --total_itrs default 30e3
    "batch_size": 4,  # --batch_size 4 in every script
    "eval_every": 100,  # --val_interval default 100, best mIoU reported
    "optim.name": "sgd", "optim.momentum": 0.9,  # main_aug_final.py: SGD(momentum=0.9)
    "optim.weight_decay": 1e-4,  # --weight_decay default
    "optim.power": 0.9, "optim.min_lr": 1e-6,  # utils.PolyLR(optimizer, total_itrs, power=0.9), floor 1e-6
    "optim.backbone_lr_factor": 0.1,  # backbone group at 0.1 * lr
    "data.flip": True,  # ExtRandomHorizontalFlip
}
VOC = {
    **COMMON,
    "data.name": "voc12",  # --year 2012 (train.txt, not train_aug)
    "data.crop_size": 513, "data.scale_range": [0.5, 2.0],  # ExtRandomScale((0.5, 2.0)), ExtRandomCrop(513)
    "data.color_jitter": 0.0,
    "optim.lr": 0.01,  # --lr default
    "eval.mode": "crop", "eval.crop": 513,  # --crop_val: ExtResize(513), ExtCenterCrop(513)
    "eval.batch_size": 4,  # --val_batch_size default
}
CITYSCAPES = {
    **COMMON,
    "data.name": "cityscapes", "data.crop_size": 768,  # --crop_size 768
    "data.scale_range": [1.0, 1.0],  # get_dataset: ExtRandomCrop only, no ExtRandomScale
    "data.color_jitter": 0.5,  # ExtColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)
    "optim.lr": 0.1,  # --lr 0.1
    "eval.mode": "whole", "eval.batch_size": 4,  # no --crop_val
}
AFAN = {  # every released A-FAN run
    "mode": "afan", "seed": 1,  # --random_seed default
    "afan.se_steps": 1, "afan.sd_steps": 1,  # --steps default 1 (SE and SD)
    "afan.n": 2,  # get_sample_points(clean, adv, 3): strengths 1/2 and 1
    "afan.sd": True, "afan.sd_noise": 0.0,  # --noise_sd default 0
    "afan.w": 0.3,  # --adv_loss_weight_sd 0.3; the loss is hard-coded 0.7 / 0.1 / 0.1 / 0.1
    "afan.aux_bn": False, "afan.attack_bn_stats": "update", "afan.se_trains_head": False,
}


def voc_run(se_layer, gamma_se, mask):  # SDLAYER=aspp GAMMASD=0.4, no --mix_sd
    return {**VOC, **AFAN, "afan.se_layer": se_layer, "afan.gamma_se": gamma_se, "afan.mask": mask,
            "afan.sd_layer": "aspp", "afan.gamma_sd": 0.4, "afan.sd_mix": False}


def city_run(se_layer, gamma_se, mask):  # SDLAYER=concat GAMMASD=1.5 --mix_sd
    return {**CITYSCAPES, **AFAN, "afan.se_layer": se_layer, "afan.gamma_se": gamma_se, "afan.mask": mask,
            "afan.sd_layer": "concat", "afan.gamma_sd": 1.5, "afan.sd_mix": True}


RELEASED = {
    # sh/voc/2012/clean50/00_baseline50.sh: main_ori.py --year 2012 --crop_val --batch_size 4 --random_seed 66
    "voc12_resnet50_base.yaml": {**VOC, "mode": "base", "seed": 66},
    # sh/voc/2012/clean50/01_final50.sh, its four runs (SELAYER, GAMMASE, MIX)
    "voc12_resnet50_afan.yaml": voc_run("layer3", 0.01, "11"),
    "voc12_resnet50_afan_run2.yaml": voc_run("layer3", 0.01, "01"),
    "voc12_resnet50_afan_run3.yaml": voc_run("layer2", 0.01, "01"),
    "voc12_resnet50_afan_run4.yaml": voc_run("layer2", 0.03, "00"),
    # no released Cityscapes baseline script: the A-FAN runs' recipe without A-FAN
    "cityscapes_resnet50_base.yaml": {**CITYSCAPES, "mode": "base", "seed": 1},
    # sh/city/clean50/091_city_final01.sh: FINAL01, FINAL02
    "cityscapes_resnet50_afan.yaml": city_run("layer2", 0.02, "01"),
    "cityscapes_resnet50_afan_final02.yaml": city_run("layer2", 0.04, "10"),
    # sh/city/clean50/092_city_final02.sh: FINAL03, FINAL04
    "cityscapes_resnet50_afan_final03.yaml": city_run("layer2", 0.1, "00"),
    "cityscapes_resnet50_afan_final04.yaml": city_run("layer3", 0.1, "00"),
    # sh/city/clean50/093_city_final03.sh: FINAL05, FINAL06
    "cityscapes_resnet50_afan_final05.yaml": city_run("layer2", 0.01, "11"),
    "cityscapes_resnet50_afan_final06.yaml": city_run("layer2", 0.01, "10"),
}


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_voc_and_cityscapes_config_is_a_released_setting():
    assert {p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("shapes_")} == set(RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_has_the_releases_values(name):
    settings = flat(dataclasses.asdict(load_config(TrainConfig, CONFIGS / name)))
    expected = RELEASED[name]
    assert {key: settings[key] for key in expected} == expected
    if settings["mode"] == "afan":  # the release's 0.7 L0 + 0.1 (L1 + L2 + L3)
        assert settings["afan.w"] / (settings["afan.n"] + 1) == pytest.approx(0.1)
