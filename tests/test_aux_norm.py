"""Auxiliary LayerNorm/GroupNorm (``convert_aux_norm``), in-place conversion, and the loud
failures of conversions that find nothing and of 3-D features in ``mix_statistics``."""
import copy
import pickle

import numpy as np
import pytest
import timm
import timm.layers
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

import afan
from afan.norm import AuxBatchNorm2d, AuxNorm

NORMS = (nn.LayerNorm, nn.GroupNorm)


def token_model():
    """Linear -> LayerNorm -> GELU -> Linear over [B, N, C] tokens."""
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def conv_model():
    """A CNN normalised by torch's GroupNorm, timm's GroupNorm1 and LayerNorm2d (which permutes
    to channels last) and torchvision ConvNeXt's LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), timm.layers.LayerNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), timm.layers.GroupNorm1(8), TorchvisionLayerNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


MODELS = {"tokens": (token_model, (4, 5, 6)), "conv": (conv_model, (4, 3, 7, 7))}


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _setup(name, num_aux=1):
    """``(original, converted, x)`` in float64: random weights, and auxiliary branches given
    weights of their own so that a pass through them is told apart from the main branch."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    original = make().double()
    _randomize(original, 1)
    converted = afan.convert_aux_norm(copy.deepcopy(original), num_aux=num_aux)
    for i, layer in enumerate(m for m in converted.modules() if isinstance(m, AuxNorm)):
        _randomize(layer.aux_bn, 10 + i)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return original, converted, x


def _aux_reference(original, converted, branch=0):
    """A copy of ``original`` whose norm layers carry the parameters of ``converted``'s
    auxiliary branch ``branch``: the model an adversarial pass should compute."""
    reference = copy.deepcopy(original)
    for name, m in converted.named_modules():
        if isinstance(m, AuxNorm):
            reference.get_submodule(name).load_state_dict(m.aux_bn[branch].state_dict())
    return reference


def _norm_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, AuxNorm)}


# --- routing and gradients ----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_clean_loss_trains_the_main_branch_and_adversarial_loss_the_auxiliary(name):
    original, converted, x = _setup(name)
    x_adv = x.flip(0) * 0.5 + 0.1
    clean_ref, adv_ref = copy.deepcopy(original), _aux_reference(original, converted)

    def clean_loss(m):
        return m(x).pow(2).mean()

    def adv_loss(m):
        return (m(x_adv) - 1).pow(2).mean() * 0.7

    # Each loss alone reaches only its own branch's norm parameters.
    clean_loss(converted).backward()
    assert all(p.grad is None for n, p in converted.named_parameters() if ".aux_bn." in n)
    converted.zero_grad(set_to_none=True)
    with afan.use_aux_bn(converted):
        adv_loss(converted).backward()
    norms = _norm_names(converted)
    main_norm_params = [p for n, p in converted.named_parameters() if n.rpartition(".")[0] in norms]
    assert main_norm_params and all(p.grad is None for p in main_norm_params)

    # Both together: the gradients of two independent models, one per loss; the layers
    # outside the norms, shared by both passes, get the sum.
    converted.zero_grad(set_to_none=True)
    loss = clean_loss(converted)
    with afan.use_aux_bn(converted):
        loss = loss + adv_loss(converted)
    loss.backward()
    clean_loss(clean_ref).backward()
    adv_loss(adv_ref).backward()
    clean_grads = {n: p.grad for n, p in clean_ref.named_parameters()}
    adv_grads = {n: p.grad for n, p in adv_ref.named_parameters()}
    for n, p in converted.named_parameters():
        if ".aux_bn.0." in n:
            expected = adv_grads[n.replace(".aux_bn.0.", ".")]
        elif n.rpartition(".")[0] in norms:
            expected = clean_grads[n]
        else:
            expected = clean_grads[n] + adv_grads[n]
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_aux", [1, 2])
def test_split_batch_equals_main_and_auxiliary_passes(name, num_aux):
    original, converted, x = _setup(name, num_aux=num_aux)
    chunks = [x, x.flip(0) * 0.5, x + 1.0]
    with afan.use_aux_bn(converted, split=3):
        out = converted(torch.cat(chunks))
    # Chunk i runs through branch i - 1 when there is one per chunk, otherwise through the only one.
    expected = [original(chunks[0])] + [
        _aux_reference(original, converted, branch=i if num_aux == 2 else 0)(chunk)
        for i, chunk in enumerate(chunks[1:])
    ]
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_eval_uses_the_main_branch_and_strip_restores_the_original_layers(name):
    original, converted, x = _setup(name)
    plain_keys = list(original.state_dict())
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    with afan.use_aux_bn(converted, split=2):  # train both branches a little
        converted(torch.cat([x, x.flip(0)])).sum().backward()
    optimizer.step()

    stripped = afan.strip_aux_bn(converted)
    assert [type(m) for m in stripped.modules()] == [type(m) for m in original.modules()]
    assert list(stripped.state_dict()) == plain_keys
    assert list(afan.strip_aux_state_dict(converted.state_dict())) == plain_keys
    assert _norm_names(converted)  # the converted model is left as it was
    converted.eval(), stripped.eval()
    with afan.use_aux_bn(converted):  # no running statistics: eval always takes the main branch
        out = converted(x)
    assert torch.equal(stripped(x), out)
    main = copy.deepcopy(original)
    main.load_state_dict(afan.strip_aux_state_dict(converted.state_dict()))
    torch.testing.assert_close(main.eval()(x), out, rtol=1e-12, atol=1e-12)


def test_converted_layers_keep_their_class_and_survive_pickling():
    _, converted, x = _setup("conv")
    layer = converted[4]
    assert isinstance(layer, timm.layers.LayerNorm2d) and isinstance(layer, AuxNorm)
    assert type(layer) is type(afan.convert_aux_norm(timm.layers.LayerNorm2d(3)))  # one class per type
    loaded = pickle.loads(pickle.dumps(converted))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in converted.modules()]
    with afan.use_aux_bn(converted), afan.use_aux_bn(loaded):
        assert torch.equal(loaded(x), converted(x))


def test_timm_convnext_converts_every_layernorm_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    reference = copy.deepcopy(model)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    afan.convert_aux_norm(model)
    assert _norm_names(model) == names and len(names) == 17
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    torch.testing.assert_close(out, reference(x))
    with afan.use_aux_bn(model):  # the auxiliary branches start as copies of the main ones
        torch.testing.assert_close(model(x), out)


# --- real architectures: which layers convert_aux_norm converts ------------------------------

def test_torchvision_convnext_counts_all_after_and_narrowed_kinds():
    model = torchvision.models.convnext_tiny(weights=None)
    layernorms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(_norm_names(afan.convert_aux_norm(copy.deepcopy(model)))) == len(layernorms) == 23

    # Registered after features.4: the 9 blocks of features.5, the downsampling features.6,
    # the 3 blocks of features.7 and the classifier's LayerNorm2d.
    after = _norm_names(afan.convert_aux_norm(copy.deepcopy(model), after="features.4"))
    assert len(after) == 14
    assert after == {n for n in layernorms if n.startswith(("features.5.", "features.6.", "features.7.", "classifier."))}

    narrowed = afan.convert_aux_norm(copy.deepcopy(model), kinds=(TorchvisionLayerNorm2d,))
    assert _norm_names(narrowed) == {n for n, m in model.named_modules() if type(m) is TorchvisionLayerNorm2d}
    assert len(_norm_names(narrowed)) == 5  # stem, three downsamplings, classifier


def small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=3)


def test_vision_transformer_converts_its_layernorms_and_refuses_convert_aux_bn():
    vit = small_vit()
    with pytest.raises(ValueError, match=r"no BatchNorm2d layer.*LayerNorm.*convert_aux_norm"):
        afan.convert_aux_bn(vit)
    assert not _norm_names(vit)  # nothing half converted

    after = afan.convert_aux_norm(copy.deepcopy(vit), after="encoder.layers.encoder_layer_0")
    assert _norm_names(after) == {"encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                                  "encoder.ln"}
    converted = afan.convert_aux_norm(vit)
    assert len(_norm_names(converted)) == 5
    # The encoder is batch-first, so a split batch is exactly two separate passes.
    x = torch.rand(4, 3, 32, 32)
    with afan.use_aux_bn(converted, split=2):
        out = converted(torch.cat([x, x.flip(0)]))
    expected = converted(x)
    with afan.use_aux_bn(converted):
        expected = torch.cat([expected, converted(x.flip(0))])
    torch.testing.assert_close(out, expected)


# --- after= and example_input select layers as for BatchNorm ---------------------------------

class _TwoBranch(nn.Module):
    """A decoder that also takes an early feature, normalised by GroupNorm/LayerNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
        self.deep = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
        self.skip = nn.Sequential(nn.Conv2d(4, 4, 1), TorchvisionLayerNorm2d(4))
        self.fuse = nn.GroupNorm(1, 4)

    def forward(self, x):
        early = self.stem(x)
        return self.fuse(self.deep(early) + self.skip(early))


def test_after_follows_registration_order_or_the_traced_data_flow():
    by_order = afan.convert_aux_norm(_TwoBranch(), after="stem")
    assert _norm_names(by_order) == {"deep.1", "skip.1", "fuse"}  # not stem.1, inside `after`
    by_order = afan.convert_aux_norm(_TwoBranch(), after="deep.0")
    assert _norm_names(by_order) == {"deep.1", "skip.1", "fuse"}
    traced = afan.convert_aux_norm(_TwoBranch(), after="deep.0", example_input=torch.rand(2, 3, 4, 4))
    assert _norm_names(traced) == {"deep.1", "fuse"}
    assert all(p.requires_grad for p in traced.parameters())
    with pytest.raises(ValueError, match=r"convert_aux_norm: the model has no module named 'dep'.*'deep'"):
        afan.convert_aux_norm(_TwoBranch(), after="dep")


def test_mixed_model_converts_both_kinds_and_only_those_asked_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4))
    both = afan.convert_aux_norm(copy.deepcopy(model))
    assert isinstance(both[1], AuxBatchNorm2d) and isinstance(both[2], AuxNorm) and isinstance(both[4], AuxNorm)
    assert {k for k in both.state_dict() if "aux_bn" in k} == {
        "1.aux_bn.0.weight", "1.aux_bn.0.bias", "1.aux_bn.0.running_mean", "1.aux_bn.0.running_var",
        "1.aux_bn.0.num_batches_tracked", "2.aux_bn.0.weight", "2.aux_bn.0.bias",
        "4.aux_bn.0.weight", "4.aux_bn.0.bias"}
    only_bn = afan.convert_aux_bn(copy.deepcopy(model))
    assert isinstance(only_bn[1], AuxBatchNorm2d) and not _norm_names(only_bn)
    only_gn = afan.convert_aux_norm(copy.deepcopy(model), kinds=(nn.GroupNorm,))
    assert _norm_names(only_gn) == {"2"} and type(only_gn[1]) is nn.BatchNorm2d


# --- conversions that find nothing -----------------------------------------------------------

def test_a_model_without_the_layers_is_a_value_error():
    with pytest.raises(ValueError, match="convert_aux_norm: the model has no BatchNorm2d or LayerNorm or "
                                         "GroupNorm layer to convert, nor any other"):
        afan.convert_aux_norm(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"no GroupNorm layer.*LayerNorm \(e.g. 'encoder.layers.*add their "
                                         r"classes to kinds"):
        afan.convert_aux_norm(small_vit(), kinds=(nn.GroupNorm,))
    with pytest.raises(TypeError, match="kinds must be subclasses"):
        afan.convert_aux_norm(token_model(), kinds=(nn.ReLU,))


def test_converting_again_is_not_an_error_but_past_the_last_layer_is():
    model = afan.convert_aux_norm(token_model())
    keys = list(model.state_dict())
    assert list(afan.convert_aux_norm(model).state_dict()) == keys
    fresh = token_model()
    with pytest.raises(ValueError, match="no BatchNorm2d or LayerNorm or GroupNorm layer runs after '2'"):
        afan.convert_aux_norm(fresh, after="2")  # a split point after the last norm
    assert not _norm_names(fresh)


# --- references taken before the conversion ---------------------------------------------------

def test_a_tail_built_before_conversion_routes_through_the_auxiliary_branch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LayerNorm(4 * 4 * 4))
    tail = nn.Sequential(model[3], model[4], model[5], model[6])
    weight = model[4].weight
    afan.convert_aux_norm(model)
    assert tail[1] is model[4] and isinstance(tail[1], AuxBatchNorm2d) and isinstance(tail[3], AuxNorm)
    assert model[4].weight is weight  # an optimizer made before the conversion still trains the main branch

    h = torch.rand(6, 4, 4, 4)
    main_stats = model[4].running_mean.clone()
    with afan.use_aux_bn(model):
        out = tail(h)
    assert torch.equal(model[4].running_mean, main_stats)
    assert not torch.equal(model[4].aux_bn[0].running_mean, main_stats)
    out.sum().backward()
    assert weight.grad is None and model[4].aux_bn[0].weight.grad is not None
    assert model[6].weight.grad is None and model[6].aux_bn[0].weight.grad is not None


def test_from_bn_still_returns_a_converted_copy():
    bn = nn.BatchNorm2d(3)
    aux = AuxBatchNorm2d.from_bn(bn, num_aux=2)
    assert aux is not bn and type(bn) is nn.BatchNorm2d and len(aux.aux_bn) == 2
    assert type(aux.to_plain()) is nn.BatchNorm2d


# --- mix_statistics on 3-D features ---------------------------------------------------------

def test_3d_features_need_an_explicit_dim():
    clean, adv = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"mix_statistics: a 3-D feature \(2, 5, 4\).*\[B, N, C\] pass dim=-1"):
        afan.mix_statistics(clean, adv)
    with pytest.raises(ValueError, match=r"mix_by_mask.*dim=-1"):  # even where nothing is mixed
        afan.mix_by_mask(clean, [adv, adv], "00")
    with pytest.raises(ValueError, match=r"mixed_strength.*\[B, C, L\] pass dim=1"):
        afan.mixed_strength(clean, adv, 1, "01")
    torch.testing.assert_close(afan.mixed_strength(clean, adv, 2, "01", dim=-1),
                               afan.mix_statistics(clean, adv, dim=-1))
    # Other ranks keep the default of dim 1: NCHW channels, or the features of [B, C].
    flat = torch.randn(3, 6)
    torch.testing.assert_close(afan.mix_statistics(flat, flat * 2), afan.mix_statistics(flat, flat * 2, dim=1))


@pytest.mark.parametrize("dim", [-1, 1])
def test_3d_mixing_takes_the_statistics_over_the_chosen_axis(dim):
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(1.0, 2.0, (2, 5, 4)), rng.normal(-3.0, 0.5, (2, 5, 4))
    out = afan.mix_statistics(torch.from_numpy(clean), torch.from_numpy(adv), dim=dim)

    def moments(t):  # per token over its channels (dim=-1), or per channel over the tokens
        k = t.shape[dim]
        mean = t.sum(axis=dim, keepdims=True) / k
        return mean, np.sqrt(((t - mean) ** 2).sum(axis=dim, keepdims=True) / (k - 1) + 1e-5)

    (cm, cs), (am, as_) = moments(clean), moments(adv)
    np.testing.assert_allclose(out.numpy(), (clean - cm) / cs * as_ + am, rtol=1e-12, atol=1e-12)
