"""Feature-statistics mixing, auxiliary BatchNorm and frozen BN statistics."""
import copy

import numpy as np
import pytest
import torch
import torchvision
from timm.layers import BatchNormAct2d, SplitBatchNorm2d, convert_splitbn_model
from torch import nn

import afan
from afan.norm import AuxBatchNorm2d


# --- mix_statistics --------------------------------------------------------------------

def _moments(a, axis):
    return a.mean(axis=axis, keepdims=True), np.sqrt(a.var(axis=axis, ddof=1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("dim", [1, (0, 2, 3)])
def test_mix_statistics_carries_adversarial_statistics_and_clean_content(dim):
    torch.manual_seed(0)
    clean = torch.randn(4, 16, 5, 5) * 2 + 1
    adv = torch.randn(4, 16, 5, 5) * 0.5 - 3
    out = afan.mix_statistics(clean, adv, dim=dim)

    c, a, o = (t.double().numpy() for t in (clean, adv, out))
    (cm, cs), (am, as_), (om, _) = _moments(c, dim), _moments(a, dim), _moments(o, dim)
    np.testing.assert_allclose(om, np.broadcast_to(am, om.shape), atol=1e-4)
    np.testing.assert_allclose(o.std(axis=dim, keepdims=True), a.std(axis=dim, keepdims=True), atol=1e-4, rtol=1e-4)
    # The content is the clean feature's: normalising the output gives the normalised clean input.
    np.testing.assert_allclose((o - am) / as_, (c - cm) / cs, atol=1e-4)


def _mix_by_sums(clean, adv, dim, correction=1):
    """The release's mixing written out with explicit sums: over the k values at every
    position (``dim=1``: each (n, h, w); ``dim=(0, 2, 3)``: each channel) mean = sum / k,
    var = sum((x - mean)^2) / (k - correction) (1: unbiased, as the release's ``.var``),
    sigma = sqrt(var + 1e-5). Returns the mixed feature and the clean variances."""
    axes = (dim,) if isinstance(dim, int) else dim
    k = int(np.prod([clean.shape[a] for a in axes]))

    def moments(t):
        mean = t.sum(axis=axes, keepdims=True) / k
        var = ((t - mean) ** 2).sum(axis=axes, keepdims=True) / (k - correction)
        return mean, np.sqrt(var + 1e-5), var

    (cm, cs, clean_var), (am, as_, _) = moments(clean), moments(adv)
    return (clean - cm) / cs * as_ + am, clean_var


@pytest.mark.parametrize("dim", [1, (0, 2, 3)])
def test_mix_statistics_in_float64_is_the_release_formula_with_the_unbiased_variance(dim):
    rng = np.random.default_rng(0)
    clean = rng.normal(1.0, 2.0, (2, 4, 3, 3))
    adv = rng.normal(-3.0, 0.5, (2, 4, 3, 3))
    # One place whose variance is about 1e-5, the size of eps: a position's four channels
    # (dim=1) or one channel over batch and space (dim=(0, 2, 3)).
    small = (0, slice(None), 1, 2) if dim == 1 else (slice(None), 2)
    clean[small] = 0.7 + 3e-3 * rng.choice([-1.0, 1.0], clean[small].shape)
    out = afan.mix_statistics(torch.from_numpy(clean), torch.from_numpy(adv), dim=dim)
    assert out.dtype == torch.float64

    expected, clean_var = _mix_by_sums(clean, adv, dim)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert 5e-6 < clean_var[(0, 0, 1, 2) if dim == 1 else (0, 2, 0, 0)] < 2e-5

    # With the biased variance (sum / k) the content part (out - adv mean) differs clearly at
    # the small-variance place; elsewhere the factor k / (k - 1) nearly cancels between the
    # clean and the adversarial sigma.
    biased, _ = _mix_by_sums(clean, adv, dim, correction=0)
    adv_mean = adv.mean(axis=dim, keepdims=True)
    gap = np.abs((biased - adv_mean) / (expected - adv_mean) - 1)
    assert gap[small].min() > 1e-2
    elsewhere = np.ones(gap.shape, bool)
    elsewhere[small] = False
    assert gap[elsewhere].max() < 1e-3


def test_mix_statistics_is_differentiable_and_checks_shapes():
    clean = torch.randn(2, 4, 3, 3, requires_grad=True)
    afan.mix_statistics(clean, torch.randn(2, 4, 3, 3)).pow(2).sum().backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        afan.mix_statistics(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def test_mix_by_mask_mixes_only_the_marked_strengths():
    clean = torch.randn(2, 4, 3, 3)
    feats = [torch.randn(2, 4, 3, 3) for _ in range(4)]
    out = afan.mix_by_mask(clean, feats, "0011")
    assert out[0] is feats[0] and out[1] is feats[1]
    for i in (2, 3):
        torch.testing.assert_close(out[i], afan.mix_statistics(clean, feats[i]))
    with pytest.raises(ValueError, match="must be 4 characters"):
        afan.mix_by_mask(clean, feats, "011")
    with pytest.raises(ValueError, match="'0'/'1'"):
        afan.mix_by_mask(clean, feats, "0a11")


# --- AuxBatchNorm2d against timm's SplitBatchNorm2d --------------------------------------

def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("splits", [2, 3])
def test_split_mode_matches_timm_split_batchnorm(splits):
    timm_bn = SplitBatchNorm2d(6, num_splits=splits)
    _randomize(timm_bn, 0)
    ours = AuxBatchNorm2d(6, num_aux=splits - 1)
    ours.load_state_dict(timm_bn.state_dict(), strict=True)  # same key layout

    torch.manual_seed(1)
    for _ in range(3):  # several steps so the running statistics evolve
        x = torch.randn(4 * splits, 6, 5, 5)
        with afan.use_aux_bn(ours, split=splits):
            out = ours(x)
        torch.testing.assert_close(out, timm_bn(x))
    for key, value in timm_bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)

    ours.eval(), timm_bn.eval()
    x = torch.randn(5, 6, 5, 5)
    with afan.use_aux_bn(ours, split=splits):  # evaluation always uses the main BN
        torch.testing.assert_close(ours(x), timm_bn(x))


def test_timm_converted_model_state_dict_loads_strictly():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    timm_model = convert_splitbn_model(copy.deepcopy(plain), num_splits=2)
    _randomize(timm_model, 3)
    ours = afan.convert_aux_bn(copy.deepcopy(plain))
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    x = torch.rand(8, 3, 9, 9)
    with afan.use_aux_bn(ours, split=2):
        torch.testing.assert_close(ours(x), timm_model(x))


def test_one_auxiliary_bn_over_several_chunks_equals_separate_passes():
    torch.manual_seed(0)
    batched = AuxBatchNorm2d(3)
    _randomize(batched, 2)
    separate = copy.deepcopy(batched)
    chunks = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    with afan.use_aux_bn(batched, split=3):
        out = batched(torch.cat(chunks))
    expected = [separate(chunks[0])]
    with afan.use_aux_bn(separate):
        expected += [separate(chunks[1]), separate(chunks[2])]
    torch.testing.assert_close(out, torch.cat(expected))
    for key, value in separate.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[key], value, msg=key)


def test_routing_picks_the_branch_and_only_its_statistics_move():
    bn = AuxBatchNorm2d(3)
    _randomize(bn, 4)
    bn.aux_bn[0].weight.data.mul_(-2)
    x = torch.randn(4, 3, 2, 2)
    main_before = bn.running_mean.clone()
    aux_before = bn.aux_bn[0].running_mean.clone()

    with afan.use_aux_bn(bn):
        torch.testing.assert_close(bn(x), copy.deepcopy(bn.aux_bn[0])(x))
    assert torch.equal(bn.running_mean, main_before)
    assert not torch.equal(bn.aux_bn[0].running_mean, aux_before)

    aux_after = bn.aux_bn[0].running_mean.clone()
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict({k: v for k, v in bn.state_dict().items() if "aux_bn" not in k})
    torch.testing.assert_close(bn(x), reference(x))  # default route: main BN
    assert torch.equal(bn.aux_bn[0].running_mean, aux_after)
    assert bn.route is None


def test_use_aux_bn_restores_routes_and_reports_misuse(tiny_net):
    afan.convert_aux_bn(tiny_net)
    with pytest.raises(RuntimeError):
        with afan.use_aux_bn(tiny_net):
            raise RuntimeError("inside")
    assert all(m.route is None for m in tiny_net.modules() if isinstance(m, AuxBatchNorm2d))
    with pytest.raises(ValueError, match="split must be an integer of at least 2"):
        with afan.use_aux_bn(tiny_net, split=1):
            pass
    with pytest.raises(ValueError, match="cannot be split into 2 equal chunks"):
        with afan.use_aux_bn(tiny_net, split=2):
            tiny_net(torch.rand(3, 3, 8, 8))
    plain = nn.Sequential(nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="convert_aux_bn"):
        with afan.use_aux_bn(plain):
            pass
    with afan.use_aux_bn(plain, enabled=False):
        plain(torch.rand(2, 2, 1, 1))


# --- convert_aux_bn / strip_aux_bn --------------------------------------------------------

def _bn_names(model, cls):
    return {n for n, m in model.named_modules() if type(m) is cls}


def test_convert_copies_both_branches_and_keeps_outputs(tiny_net, batch):
    x, _ = batch
    original = copy.deepcopy(tiny_net)
    _randomize(original.head[1], 5)
    tiny_net = copy.deepcopy(original)
    converted = afan.convert_aux_bn(tiny_net)
    assert converted is tiny_net
    assert _bn_names(converted, AuxBatchNorm2d) == {"head.1", "tail.1", "tail.4"}
    for name in ("head.1", "tail.1", "tail.4"):
        bn = converted.get_submodule(name)
        for key, value in original.get_submodule(name).state_dict().items():
            assert torch.equal(bn.state_dict()[key], value)
            assert torch.equal(bn.aux_bn[0].state_dict()[key], value)
    for mode in (True, False):
        original.train(mode), converted.train(mode)
        torch.testing.assert_close(converted(x), original(x))
    # Converting again changes nothing (the branches inside are not converted).
    keys = set(converted.state_dict())
    assert set(afan.convert_aux_bn(converted).state_dict()) == keys


def test_convert_after_a_layer_follows_registration_order():
    model = torchvision.models.resnet18(num_classes=3)
    afan.convert_aux_bn(model, after="layer2")
    converted = _bn_names(model, AuxBatchNorm2d)
    assert converted and all(n.startswith(("layer3.", "layer4.")) for n in converted)
    assert len(converted) == 10  # 2 blocks x 2 BNs + 1 downsample BN, in layer3 and layer4
    assert "bn1" in _bn_names(model, nn.BatchNorm2d)


class _TwoBranch(nn.Module):
    """A decoder that also takes an early feature, like DeepLabv3+'s low-level branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.deep = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.skip = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.fuse = nn.BatchNorm2d(4)

    def forward(self, x):
        early = self.stem(x)
        return self.fuse(self.deep(early) + self.skip(early))


def test_convert_with_example_input_follows_the_data_flow():
    traced = afan.convert_aux_bn(_TwoBranch(), after="deep.0", example_input=torch.rand(2, 3, 4, 4))
    assert _bn_names(traced, AuxBatchNorm2d) == {"deep.1", "fuse"}
    by_order = afan.convert_aux_bn(_TwoBranch(), after="deep.0")
    assert _bn_names(by_order, AuxBatchNorm2d) == {"deep.1", "skip.1", "fuse"}
    assert all(p.requires_grad for p in traced.parameters())


def test_convert_names_an_unknown_layer():
    with pytest.raises(ValueError, match=r"no module named 'layr2'.*'layer2'"):
        afan.convert_aux_bn(torchvision.models.resnet18(), after="layr2")


def test_timm_batchnorm_act_keeps_its_activation_and_strips_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    x = torch.randn(4, 3, 6, 6)
    converted = afan.convert_aux_bn(copy.deepcopy(model))
    expected = model(x)
    assert isinstance(converted[1], AuxBatchNorm2d)
    out = converted(x)
    torch.testing.assert_close(out, expected)
    assert (out >= 0).all()
    stripped = afan.strip_aux_bn(converted)
    assert type(stripped[1]) is BatchNormAct2d
    stripped.eval(), model.eval()
    torch.testing.assert_close(stripped(x), model(x))


def test_strip_gives_identical_eval_outputs_and_plain_keys(tiny_net, batch):
    x, y = batch
    plain_keys = set(tiny_net.state_dict())
    model = afan.convert_aux_bn(tiny_net)
    with afan.use_aux_bn(model, split=2):  # train both branches a little
        model(torch.cat([x, x.flip(0)])).sum().backward()
    stripped = afan.strip_aux_bn(model)
    assert not any(isinstance(m, AuxBatchNorm2d) for m in stripped.modules())
    assert any(isinstance(m, AuxBatchNorm2d) for m in model.modules())  # original kept
    assert set(stripped.state_dict()) == plain_keys
    assert set(afan.strip_aux_state_dict(model.state_dict())) == plain_keys
    model.eval(), stripped.eval()
    assert torch.equal(stripped(x), model(x))


# --- frozen_bn_stats ----------------------------------------------------------------------

def test_frozen_bn_stats_leaves_every_buffer_bit_identical(tiny_net, batch):
    x, _ = batch
    model = afan.convert_aux_bn(tiny_net)
    model(x)  # statistics away from their initial values
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    reference = copy.deepcopy(model)
    with afan.frozen_bn_stats(model):
        out = model(x)
        with afan.use_aux_bn(model):
            model(x)
        with afan.use_aux_bn(model, split=2):
            model(torch.cat([x, x]))
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    # Inside, the forward pass still normalises with batch statistics as in training.
    torch.testing.assert_close(out, reference(x))
    # Outside, statistics are tracked again.
    model(x)
    assert not torch.equal(model.get_submodule("head.1").running_mean, buffers["head.1.running_mean"])
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_frozen_bn_stats_disabled_lets_the_passes_update_as_usual(tiny_net, batch):
    x, _ = batch
    reference = copy.deepcopy(tiny_net)
    with afan.frozen_bn_stats(tiny_net, enabled=False):
        tiny_net(x)
    reference(x)
    for (name, value), expected in zip(tiny_net.named_buffers(), reference.buffers()):
        assert torch.equal(value, expected), name
    assert tiny_net.get_submodule("head.1").num_batches_tracked == 1


# --- Normalize ----------------------------------------------------------------------------

def test_normalize_layer():
    x = torch.rand(2, 3, 4, 4)
    layer = afan.Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert layer.state_dict() == {}
    assert set(afan.Normalize((0.5,) * 3, (0.5,) * 3, persistent=True).state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        layer(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        afan.Normalize((0.0,), (0.0,))
