"""afan.split: head and tail of torchvision and timm models, cut by torch.fx or by hooks."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from afan.split import SplitTraceError, split

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

tv = torchvision.models


# name: (builder, split point, input shape, whether the tail needs x).  Inputs are small to keep
# the file fast on two CPU cores; batch 2 where BatchNorm meets 1x1 maps in training mode.
CASES = {
    "resnet18": (lambda: tv.resnet18(weights=None), "layer2", (2, 3, 32, 32), False),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(weights=None), "features.6", (2, 3, 32, 32), False),
    "convnext_tiny": (lambda: tv.convnext_tiny(weights=None), "features.3", (2, 3, 32, 32), False),
    # vit_b_16 itself (same layers and parameters), built for 64x64 images instead of 224x224:
    # 17 tokens instead of 197, so its four passes take well under a second.
    "vit_b_16": (lambda: tv.vit_b_16(weights=None, image_size=64), "encoder.layers.encoder_layer_5",
                 (1, 3, 64, 64), False),
    # The classifier's output is resized to the input's size: the tail needs x.
    "deeplabv3_resnet50": (lambda: tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None),
                           "backbone.layer3", (2, 3, 32, 32), True),
    "tf_efficientnet_b0": (lambda: timm.create_model("tf_efficientnet_b0", pretrained=False), "blocks.3",
                           (2, 3, 32, 32), False),
    "resnet26d": (lambda: timm.create_model("resnet26d", pretrained=False), "layer2", (2, 3, 32, 32), False),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False), "stages.1",
                      (2, 3, 32, 32), False),
}


def out(y):
    """The tensor to compare: segmentation models return a dict."""
    return y["out"] if isinstance(y, dict) else y


def captured(model, at, *inputs):
    """``model(*inputs)`` and the output of its submodule ``at`` inside that pass."""
    seen = []
    handle = model.get_submodule(at).register_forward_hook(lambda m, args, output: seen.append(output))
    try:
        result = model(*inputs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return result, seen[0]


def built(built_once, name):
    """A fresh copy of the model of ``CASES[name]``, built under ``torch.manual_seed(0)`` once per
    module (the other tests that take the same model share the build), with the random state
    of a fresh build."""
    return built_once.get(name, CASES[name][0], seed=0)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, built_once):
    _, at, shape, needs_x = CASES[request.param]
    model = built(built_once, request.param)
    keys = list(model.state_dict())
    head, tail = split(model, at, method="fx")
    return model, at, torch.randn(shape), needs_x, (head, tail), keys


@torch.no_grad()
def test_eval_tail_of_head_is_model_and_head_is_at_output(case):
    model, at, x, needs_x, (head, tail), _ = case
    model.eval()
    reference, at_output = captured(model, at, x)
    h = head(x)
    assert torch.equal(h, at_output)
    assert tail.needs_input is needs_x
    got = tail(h, x) if needs_x else tail(h)
    assert torch.equal(out(got), out(reference))
    if needs_x:
        with pytest.raises(TypeError, match=r"needs the model's input x.*call tail\(h, x\)"):
            tail(h)


@torch.no_grad()
def test_train_tail_of_head_is_model_under_the_same_seed(case):
    model, at, x, needs_x, (head, tail), _ = case
    model.train()
    torch.manual_seed(1)
    reference = model(x)
    torch.manual_seed(1)
    got = tail(head(x), x)
    assert torch.equal(out(got), out(reference))


def test_parts_share_the_models_parameters(case):
    model, _, _, _, (head, tail), keys = case
    own = {id(p) for p in model.parameters()}
    head_params, tail_params = list(head.parameters()), list(tail.parameters())
    assert head_params and tail_params
    assert all(id(p) in own for p in head_params + tail_params)
    assert {id(p) for p in head_params + tail_params} == own  # together, every parameter
    assert list(model.state_dict()) == keys
    # the parts' own state dicts use the model's names for the same tensors
    state = model.state_dict(keep_vars=True)
    for part in (head, tail):
        assert all(value is state[key] for key, value in part.state_dict(keep_vars=True).items())


def test_head_keeps_the_models_input_checks(built_once):
    model = built(built_once, "vit_b_16")
    head, _ = split(model, "encoder.layers.encoder_layer_5")
    with pytest.raises(AssertionError, match="Wrong image height"):
        head(torch.randn(1, 3, 32, 64))


def test_submodules_are_the_models_own(built_once):
    model = built(built_once, "resnet18")
    head, tail = split(model, "layer2")
    assert head.get_submodule("layer1.0.conv1") is model.layer1[0].conv1
    assert head.get_submodule("layer1.0.conv1").weight is model.layer1[0].conv1.weight
    assert tail.get_submodule("fc").weight is model.fc.weight
    assert not {id(p) for p in head.parameters()} & {id(p) for p in tail.parameters()}


def test_gradients_match_the_model_and_an_optimizer_step_trains_both_parts():
    torch.manual_seed(0)
    model = tv.resnet18(weights=None, num_classes=3).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    head, tail = split(model, "layer2")

    model(x).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    tail(head(x)).square().sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), reference))

    before = model.conv1.weight.clone(), model.fc.weight.clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.conv1.weight, before[0])  # a head parameter
    assert not torch.equal(model.fc.weight, before[1])  # a tail parameter
    with torch.no_grad():
        assert torch.equal(tail(head(x), x), model(x))  # x is accepted and ignored


class Branchy(nn.Module):
    """Dropout after the split point and a ``self.training`` branch in the traced forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 64)
        self.bn = nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(64, 3)

    def forward(self, x):
        h = self.bn(self.a(x))
        if self.training:  # fixed at trace time: right only if each mode has its own graph
            h = h + 1
        return self.b(self.drop(h))


@torch.no_grad()
def test_train_and_eval_pick_their_graph_and_follow_the_model():
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    head, tail = split(model, "bn")

    model.eval()
    assert not head.training and not tail.training
    first = tail(head(x))
    assert torch.equal(first, tail(head(x)))  # no dropout in eval mode
    assert torch.equal(first, model(x))

    tail.train()  # a part switches the whole model: one model, one mode
    assert model.training and head.training and model.drop.training
    assert not torch.equal(tail(head(x)), tail(head(x)))  # dropout draws anew
    torch.manual_seed(3)
    reference = model(x)
    torch.manual_seed(3)
    assert torch.equal(tail(head(x)), reference)

    head.eval()  # (the training passes above moved BN's running statistics)
    assert not model.training and not model.drop.training
    assert torch.equal(tail(head(x)), tail(head(x)))
    assert torch.equal(tail(head(x)), model(x))


def test_split_keeps_each_modules_own_mode():
    model = Branchy().train()
    model.bn.eval()  # e.g. a frozen BatchNorm
    split(model, "bn")
    assert model.training and model.a.training and not model.bn.training


@torch.no_grad()
def test_parts_read_the_model_at_call_time():
    torch.manual_seed(0)
    model = Branchy().eval()
    head, tail = split(model, "bn")
    model.double()  # after the split: new buffers, converted parameters
    model.b = nn.Linear(64, 3).double()  # a replaced submodule
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(tail(head(x)), model(x))


class ThreeLinears(nn.Module):
    """Linear layers a, b, c; the subclasses wire them differently."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)


class InPlace(ThreeLinears):
    """An in-place call whose result is unused: fx records it only as a user of its input."""

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        return self.c(self.b(h))


@torch.no_grad()
def test_in_place_calls_stay_in_the_head():
    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(3, 4)
    head, tail = split(model, "b")
    reference, at_output = captured(model, "b", x)
    assert torch.equal(head(x), at_output)
    assert torch.equal(tail(head(x)), reference)


class Skip(ThreeLinears):
    """A skip connection around the split point: the tail recomputes it from x."""

    def forward(self, x):
        s = self.a(x)
        return self.c(self.b(s) + s)


@torch.no_grad()
def test_skip_connection_around_the_split_needs_x():
    torch.manual_seed(0)
    model = Skip()
    x = torch.randn(3, 4)
    head, tail = split(model, "b")
    assert tail.needs_input
    assert torch.equal(tail(head(x), x), model(x))
    with pytest.raises(TypeError, match=r"call tail\(h, x\)"):
        tail(head(x))


def build_detector():
    return tv.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96)


def detector(built_once):
    """A fresh copy of a detector built under ``torch.manual_seed(0)`` once per module, and an
    image drawn after it."""
    model = built_once.get("detector", build_detector, seed=0)
    return model.eval(), [torch.rand(3, 80, 96)]


@torch.no_grad()
def test_untraceable_model_falls_back_to_hooks(built_once):
    model, images = detector(built_once)
    with pytest.warns(UserWarning, match=r"could not trace FasterRCNN.*method='hooks'"):
        head, tail = split(model, "backbone.body")
    reference, at_output = captured(model, "backbone.body", images)
    h = head(images)
    assert list(h) == list(at_output) and all(torch.equal(h[k], at_output[k]) for k in h)
    got = tail(h, images)
    assert len(got) == len(reference) == 1
    assert got[0].keys() == reference[0].keys()
    assert all(torch.equal(got[0][k], reference[0][k]) for k in reference[0])
    assert tail.needs_input
    with pytest.raises(TypeError, match=r"call tail\(h, x\)"):
        tail(h)
    assert head.get_submodule("backbone") is model.backbone


def test_fx_method_names_the_tracing_error_and_hooks(built_once):
    model, _ = detector(built_once)
    with pytest.raises(SplitTraceError, match=r"could not trace FasterRCNN.*TraceError.*method='hooks'"):
        split(model, "backbone.body", method="fx")


@pytest.mark.parametrize("training", [False, True])
@torch.no_grad()
def test_hooks_method_on_a_traceable_model(training, built_once):
    model = built(built_once, "resnet18").train(training)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head, tail = split(model, "layer2", method="hooks")
    reference, at_output = captured(model, "layer2", x)
    h = head(x)
    assert torch.equal(h, at_output)
    assert torch.equal(tail(h, x), reference)
    # the output of `at` really is replaced by h
    assert not torch.equal(tail(torch.zeros_like(h), x), reference)
    assert {id(p) for p in head.parameters()} == {id(p) for p in model.parameters()}


def test_unknown_name_lists_close_names(built_once):
    model = built(built_once, "resnet18")
    with pytest.raises(ValueError, match=r"no submodule named 'layer5'.*layer4"):
        split(model, "layer5")
    with pytest.raises(ValueError, match=r"'layer1\.0\.con1'.*layer1\.0\.conv1"):
        split(model, "layer1.0.con1")


def test_root_and_bad_arguments_are_refused():
    model = Skip()
    with pytest.raises(ValueError, match="model itself"):
        split(model, "")
    with pytest.raises(ValueError, match="method must be one of"):
        split(model, "b", method="trace")
    with pytest.raises(TypeError, match="qualified name"):
        split(model, model.b)


class Detour(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.never = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        self.unused(x)  # output discarded
        return self.c(self.a(self.a(x)))  # `a` called twice


@pytest.mark.parametrize("at, message", [
    ("unused", "does not reach the model's output"),
    ("a", "calls 'a' 2 times"),
    ("never", "never calls 'never'"),
])
def test_split_points_that_do_not_cut_the_model(at, message):
    with pytest.raises(ValueError, match=message):
        split(Detour(), at)


def test_import_needs_only_torch():
    code = ("import sys, afan.split; loaded = {'torchvision', 'timm'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
