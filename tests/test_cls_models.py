"""Classification models: names, shapes, head/tail split, auxiliary BN, checkpoint loading."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import afan
from afan_harness.checkpoint import CheckpointError
from afan.input_norm import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from Classification.models import MODEL_NAMES, checkpoint_payload, create_model, load_model

# One representative per family, with an input size it handles quickly.
FAMILIES = {"resnet20": 32, "resnet18": 32, "tf_efficientnet_b0": 32, "smallcnn": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models run on tiny batches, where a second thread costs more than it gives
    (seconds per forward pass when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(size, n=2, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics and affines, so that eval-mode mistakes show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def model(built_once):
    """``model(name, num_classes=10, **kw)``: ``create_model`` built under ``torch.manual_seed(0)``
    with random BN statistics, in evaluation mode; a fresh copy of one built once per module."""
    def make(name, num_classes=10, **kw):
        build = lambda: randomize_bn(create_model(name, num_classes, **kw)).eval()
        return built_once.get((name, num_classes, repr(sorted(kw.items()))), build, seed=0)
    return make


# ---------------------------------------------------------------- building

BUILD_CASES = [(name, 32) for name in MODEL_NAMES if name.startswith("resnet") and name != "resnet50"]
BUILD_CASES += [("resnet50", 64), ("tf_efficientnet_b0", 64), ("tf_efficientnet_b1", 64)]


@pytest.mark.parametrize("name,size", BUILD_CASES)
def test_model_builds_with_its_metadata_and_output_shape(name, size):
    m = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert m(images(size)).shape == (2, 7)
    assert m.arch == name and m.num_classes == 7
    assert isinstance(m.normalize, afan.Normalize)
    assert not any(key.startswith("normalize.") for key in m.state_dict())


def test_model_names_cover_all_families():
    assert MODEL_NAMES == ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18",
                           "resnet50", *(f"tf_efficientnet_b{i}" for i in range(8)), "smallcnn")


@pytest.mark.parametrize("name,low,high", [("resnet20", 0.26e6, 0.28e6), ("resnet56", 0.84e6, 0.87e6)])
def test_cifar_resnet_parameter_counts(name, low, high):
    assert low < sum(p.numel() for p in create_model(name, 10).parameters()) < high


def test_cifar_resnet_layout():
    m = create_model("resnet56", 10)
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    keys = m.state_dict().keys()
    assert {"stem.0.weight", "stem.1.running_mean", "layer1.0.conv1.weight", "layer3.8.bn2.bias",
            "fc.weight", "fc.bias"} <= set(keys)
    assert not any("shortcut" in key for key in keys)  # option A has no parameters


HALF = (0.5,) * 3


@pytest.mark.parametrize("name,mean,std", [("resnet20", CIFAR10_MEAN, CIFAR10_STD),
                                           ("resnet18", IMAGENET_MEAN, IMAGENET_STD),
                                           ("tf_efficientnet_b0", IMAGENET_MEAN, IMAGENET_STD)])
def test_default_normalisation_and_override(name, mean, std):
    m = create_model(name, 10)
    assert torch.allclose(m.normalize.mean, torch.tensor(mean))
    assert torch.allclose(m.normalize.std, torch.tensor(std))
    m = create_model(name, 10, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert m.normalize.mean.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert m.normalize.std.tolist() == pytest.approx([0.4, 0.5, 0.6])


# The mean/std each EfficientNet weights tag was trained with: AdvProp's take [-1, 1] inputs,
# the others (and the bare name, timm's default tag ns_jft_in1k) ImageNet-normalised ones.
TAG_NORMS = {"": (IMAGENET_MEAN, IMAGENET_STD), ".ap_in1k": (HALF, HALF), ".ns_jft_in1k": (IMAGENET_MEAN, IMAGENET_STD),
             ".aa_in1k": (IMAGENET_MEAN, IMAGENET_STD), ".in1k": (IMAGENET_MEAN, IMAGENET_STD)}


@pytest.mark.parametrize("name", ["tf_efficientnet_b0" + tag for tag in TAG_NORMS] + ["tf_efficientnet_b3.ap_in1k"])
def test_efficientnet_normalisation_follows_the_weights_tag(name):
    mean, std = TAG_NORMS["." + name.partition(".")[2] if "." in name else ""]
    m = create_model(name, 10)
    assert m.arch == name
    assert m.normalize.mean.tolist() == pytest.approx(mean) and m.normalize.std.tolist() == pytest.approx(std)
    assert set(m.state_dict()) == set(create_model(name.partition(".")[0], 10).state_dict())


def test_timm_records_these_values_for_every_tag_of_b0_to_b7():
    """The models read timm's pretrained config; it holds 0.5 exactly for the AdvProp tags."""
    names = timm.list_pretrained("tf_efficientnet_b[0-7].*")
    assert len(names) >= 30
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        expected = (HALF, HALF) if name.endswith(".ap_in1k") else (IMAGENET_MEAN, IMAGENET_STD)
        assert (tuple(cfg.mean), tuple(cfg.std)) == expected, name


@pytest.mark.parametrize("name,input_norm,mean,std", [
    ("tf_efficientnet_b0", "half", HALF, HALF),
    ("tf_efficientnet_b0.ap_in1k", "imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ("tf_efficientnet_b0.ap_in1k", "auto", HALF, HALF),
    ("resnet20", "imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ("resnet18", "half", HALF, HALF),
])
def test_input_norm_setting_overrides_the_model_default(name, input_norm, mean, std):
    m = create_model(name, 10, input_norm=input_norm)
    assert m.normalize.mean.tolist() == pytest.approx(mean) and m.normalize.std.tolist() == pytest.approx(std)
    # Explicit mean/std win over input_norm.
    m = create_model(name, 10, input_norm=input_norm, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert m.normalize.mean.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_bad_input_norm_and_weights_tag_are_named():
    with pytest.raises(ValueError, match=r"input_norm must be one of auto, imagenet, half, got 'cifar'"):
        create_model("resnet20", 10, input_norm="cifar")
    with pytest.raises(ValueError, match=r"unknown weights tag 'jft' for tf_efficientnet_b0.*aa_in1k, ap_in1k, in1k"):
        create_model("tf_efficientnet_b0.jft", 10)
    with pytest.raises(ValueError, match=r"'tf_efficientnet_b0_ap'.*follows a dot.*tf_efficientnet_b0.ap_in1k"):
        create_model("tf_efficientnet_b0_ap", 10)
    with pytest.raises(ValueError, match=r"unknown model 'resnet20.in1k'"):
        create_model("resnet20.in1k", 10)


def test_unknown_name_lists_valid_names_and_closest():
    with pytest.raises(ValueError, match=r"'resnet57'.*Did you mean 'resnet56'.*resnet110"):
        create_model("resnet57", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", bad)


# ---------------------------------------------------------------- head / tail split

EXPECTED_SPLITS = {
    "resnet20": ("stem", "layer1", "layer2", "layer3"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "tf_efficientnet_b0": tuple(f"blocks.{i}" for i in range(7)),
    "smallcnn": ("block1", "block2", "block3"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_head_then_tail_is_forward(name, model):
    m, x = model(name), images(FAMILIES[name])
    assert m.split_points == EXPECTED_SPLITS[name]
    with torch.no_grad():
        expected = m(x)
        for at in m.split_points:
            m.get_submodule(at)
            h = m.head(x, at)
            assert h.dim() == 4
            assert torch.equal(m.tail(h, at), expected), at


def bn_names_run(model, fn):
    """Names of the BatchNorm layers that run during ``fn()``."""
    ran, hooks = set(), []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: ran.add(name)))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return ran


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_aux_bn_after_split_point_converts_exactly_the_tail(name, model):
    base, x = model(name), images(FAMILIES[name])
    for at in base.split_points:
        m = copy.deepcopy(base)
        h = {}
        head_bns = bn_names_run(m, lambda: h.setdefault("h", m.head(x, at)))
        tail_bns = bn_names_run(m, lambda: m.tail(h["h"], at))
        assert head_bns and not head_bns & tail_bns
        if not tail_bns:  # after the last stage of the ResNets: nothing to convert, and it says so
            with pytest.raises(ValueError, match=f"no BatchNorm2d layer runs after '{at}'"):
                afan.convert_aux_bn(m, after=at)
            continue
        afan.convert_aux_bn(m, after=at)
        converted = {n for n, mod in m.named_modules() if isinstance(mod, afan.AuxBatchNorm2d)}
        assert converted == tail_bns, at


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_split_point_lists_valid_ones(name):
    m, x = create_model(name, 10), images(FAMILIES[name])
    valid = ", ".join(m.split_points)
    with pytest.raises(ValueError, match=f"'nowhere'.*{valid}"):
        m.head(x, "nowhere")
    with pytest.raises(ValueError, match="valid split points"):
        m.tail(x, "fc")


# ---------------------------------------------------------------- library state dicts

def test_torchvision_resnet18_state_dict_loads_and_matches():
    torch.manual_seed(1)
    reference = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    ours = create_model("resnet18", 10)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = images(64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference((x - mean) / std), atol=1e-5)


@pytest.mark.parametrize("name,mean,std", [("tf_efficientnet_b0.ap_in1k", HALF, HALF),
                                           ("tf_efficientnet_b0", IMAGENET_MEAN, IMAGENET_STD)])
def test_timm_efficientnet_state_dict_loads_and_matches(tmp_path, name, mean, std):
    torch.manual_seed(1)
    reference = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    ours = load_model(tmp_path / "timm.pth", name=name)
    x = images(64)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference((x - mean) / std), atol=1e-5)


# ---------------------------------------------------------------- original release checkpoints

class ReleaseNormalize(nn.Module):
    """The release's input normalisation: persistent 1-D ``mean`` and ``std`` buffers."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


class ReleaseBlock(nn.Module):
    """Basic block with the option-A shortcut (subsample, zero-pad planes // 4 per side)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.downsample else x
        return F.relu(out + shortcut)


class ReleaseModel(nn.Module):
    """The release's layout: ``sequential_model`` plus an unused parameter ``w``."""

    def __init__(self, depth, num_classes, mean, std):
        super().__init__()
        n = (depth - 2) // 6
        layers = [ReleaseNormalize(mean, std), nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(ReleaseBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        layers += [nn.AvgPool2d(8), nn.Flatten(), nn.Linear(64, num_classes)]
        self.sequential_model = nn.Sequential(*layers)
        self.w = nn.Parameter(torch.ones(9))

    def forward(self, x):
        return self.sequential_model(x)


RELEASE_MEAN, RELEASE_STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)  # not CIFAR's: must come from the file


@pytest.mark.parametrize("depth,num_classes,prefix", [(56, 10, ""), (20, 100, "module.")])
def test_release_checkpoint_gives_the_original_logits(tmp_path, depth, num_classes, prefix):
    torch.manual_seed(2)
    original = randomize_bn(ReleaseModel(depth, num_classes, RELEASE_MEAN, RELEASE_STD)).eval()
    assert isinstance(original.sequential_model[4 + 3 * (depth - 2) // 6 + 2], nn.Linear)
    state = {prefix + key: value for key, value in original.state_dict().items()}
    path = tmp_path / "release.pth.tar"
    torch.save({"state_dict": state, "epoch": 3, "best_prec1": 90.0}, path)

    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.training) == (f"resnet{depth}", num_classes, False)
    assert loaded.normalize.mean.tolist() == pytest.approx(RELEASE_MEAN)
    x = images(32, n=3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), original(x), atol=1e-5)
    assert load_model(path, name=f"resnet{depth}", num_classes=num_classes).arch == f"resnet{depth}"


def test_release_checkpoint_with_other_name_or_classes_is_refused(tmp_path):
    path = tmp_path / "release.pth.tar"
    torch.save({"state_dict": ReleaseModel(20, 10, RELEASE_MEAN, RELEASE_STD).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"release.pth.tar holds a resnet20 model, not the requested resnet56"):
        load_model(path, name="resnet56")
    with pytest.raises(CheckpointError, match=r"10 classes.*num_classes=100"):
        load_model(path, num_classes=100)


# ---------------------------------------------------------------- this project's checkpoints

def test_payload_round_trip_drops_aux_bn(tmp_path, model):
    m = model("resnet20", num_classes=5)
    afan.convert_aux_bn(m, after="layer1")
    payload = checkpoint_payload(m)
    assert payload["arch"] == "resnet20" and payload["num_classes"] == 5
    assert any(".aux_bn." in key for key in payload["model"])
    torch.save({**payload, "epoch": 7}, tmp_path / "best.pth")

    loaded = load_model(tmp_path / "best.pth")
    assert not any(isinstance(mod, afan.AuxBatchNorm2d) for mod in loaded.modules())
    assert not loaded.training
    x = images(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m.eval()(x))


@pytest.mark.parametrize("name,kw", [("tf_efficientnet_b0.ap_in1k", {}), ("tf_efficientnet_b0", {"input_norm": "half"}),
                                     ("resnet20", {"input_norm": "imagenet"})])
def test_payload_records_the_input_normalisation(tmp_path, name, kw, model):
    m = model(name, **kw)
    torch.save(checkpoint_payload(m), tmp_path / "best.pth")
    loaded = load_model(tmp_path / "best.pth")
    assert loaded.normalize.mean.tolist() == m.normalize.mean.tolist()
    assert loaded.normalize.std.tolist() == m.normalize.std.tolist()
    x = images(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_payload_written_before_it_recorded_the_normalisation_still_loads(tmp_path, model):
    """EfficientNet payloads without mean/std date from when every EfficientNet used 0.5."""
    m = model("tf_efficientnet_b0", input_norm="half")
    payload = checkpoint_payload(m)
    del payload["mean"], payload["std"]
    torch.save(payload, tmp_path / "old.pth")
    loaded = load_model(tmp_path / "old.pth")
    assert loaded.normalize.mean.tolist() == pytest.approx(HALF)
    with torch.no_grad():
        assert torch.equal(loaded(images(32)), m(images(32)))
    r = model("resnet20")
    payload = checkpoint_payload(r)
    del payload["mean"], payload["std"]
    torch.save(payload, tmp_path / "old_resnet.pth")
    assert load_model(tmp_path / "old_resnet.pth").normalize.mean.tolist() == pytest.approx(CIFAR10_MEAN)


def test_plain_state_dict_needs_a_name_and_infers_classes(tmp_path, model):
    m = model("resnet20", num_classes=3)
    torch.save(m.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain.pth.*plain state dict.*name=.*resnet56"):
        load_model(tmp_path / "plain.pth")
    # Also wrapped as {"state_dict": ...} with DataParallel's "module." prefixes.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 1}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    x = images(32)
    for file in ("plain.pth", "wrapped.pth"):
        loaded = load_model(tmp_path / file, name="resnet20")
        assert loaded.num_classes == 3
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))


def test_wrong_architecture_names_differing_keys(tmp_path):
    torch.save(create_model("resnet20", 10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(CheckpointError, match=r"r20.pth does not fit resnet32 .*missing keys \(72\): layer1.3.conv1.weight"):
        load_model(tmp_path / "r20.pth", name="resnet32")
    with pytest.raises(CheckpointError, match=r"does not fit resnet18.*missing keys.*conv1.weight.*unexpected keys.*stem.0.weight.*"
                       r"shape mismatches.*layer1.0.conv1.weight \(file \(16, 16, 3, 3\), model \(64, 64, 3, 3\)\)"):
        load_model(tmp_path / "r20.pth", name="resnet18")


def test_num_classes_mismatch_names_both_numbers(tmp_path):
    torch.save(checkpoint_payload(create_model("resnet20", 10)), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c.pth holds a model for 10 classes, but num_classes=100"):
        load_model(tmp_path / "c.pth", num_classes=100)


def test_unknown_name_and_unknown_format(tmp_path):
    torch.save(create_model("resnet20", 10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(ValueError, match=r"unknown model 'resnet99'.*resnet20"):
        load_model(tmp_path / "r20.pth", name="resnet99")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd.pth is not a classification checkpoint.*'model'.*sequential_model"):
        load_model(tmp_path / "odd.pth")
