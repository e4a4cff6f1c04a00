"""DeepLabv3+: the DeepLabV3Plus-Pytorch layout, predictions against an independent composition
of torchvision parts, the head/encode/fuse/classify cut (the decoder reading the clean
low-level feature), where auxiliary BN goes, the backbone BN momentum, and loading."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v2, resnet50
from torchvision.models._utils import IntermediateLayerGetter

import afan
from afan_harness.checkpoint import CheckpointError
from afan_harness.config import load_config
from Segmentation import train as seg_train
from Segmentation.config import TrainConfig
from Segmentation.models import SPLIT_POINTS, create_model, infer_arch, load_model
from Segmentation.models.loading import checkpoint_payload, load_backbone_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def decoder_keys():
    """The head's keys in DeepLabV3Plus-Pytorch, written out from its module layout."""
    keys = ["classifier.project.0.weight"] + [f"classifier.project.1.{p}" for p in BN]
    for i, (conv, bn) in enumerate([(0, 1), (0, 1), (0, 1), (0, 1), (1, 2)]):  # 1x1, three atrous, pooling
        keys += [f"classifier.aspp.convs.{i}.{conv}.weight"] + [f"classifier.aspp.convs.{i}.{bn}.{p}" for p in BN]
    keys += ["classifier.aspp.project.0.weight"] + [f"classifier.aspp.project.1.{p}" for p in BN]
    keys += ["classifier.classifier.0.weight"] + [f"classifier.classifier.1.{p}" for p in BN]
    return keys + ["classifier.classifier.3.weight", "classifier.classifier.3.bias"]


def mobilenet_backbone_key(key):
    index = int(key.split(".")[1])
    part = "low_level_features" if index < 4 else "high_level_features"
    return f"backbone.{part}.{key.removeprefix('features.')}"


@pytest.fixture(scope="module")
def model_of(built_once):
    """``model_of(name, num_classes)``: a fresh copy of ``create_model(name, num_classes)``, built
    once per module (random weights, training mode)."""
    return lambda name, num_classes: built_once.get((name, num_classes), lambda: create_model(name, num_classes))


def test_state_dict_keys_are_deeplabv3plus_pytorch_ones(model_of):
    resnet = ["backbone." + k for k in resnet50().state_dict() if not k.startswith("fc.")]
    assert set(model_of("deeplabv3plus_resnet50", 21).state_dict()) == set(resnet + decoder_keys())
    mobile = [mobilenet_backbone_key(k) for k in mobilenet_v2().state_dict()
              if k.startswith("features.") and not k.startswith("features.18.")]
    assert set(create_model("deeplabv3plus_mobilenet", 21).state_dict()) == set(mobile + decoder_keys())


def random_weights(model):
    """Random values for every parameter and BN statistic, so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        else:
            state[key] = value.clone()
    return state


def test_deeplabv3plus_pytorch_checkpoint_loads_and_predicts_like_a_torchvision_composition(tmp_path, model_of):
    model = model_of("deeplabv3plus_resnet50", 21)
    state = random_weights(model)
    path = tmp_path / "best_deeplabv3plus_resnet50_voc_os16.pth"
    torch.save({"cur_itrs": 30000, "model_state": state, "optimizer_state": {}, "best_score": 0.77}, path)
    loaded = load_model(path)  # architecture and class count read off the file
    assert loaded.arch == "deeplabv3plus_resnet50" and loaded.num_classes == 21 and not loaded.training

    # The same network, composed independently from torchvision's parts.
    net = resnet50(replace_stride_with_dilation=[False, False, True])
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")},
                        strict=False)
    getter = IntermediateLayerGetter(net, {"layer1": "low", "layer4": "out"}).eval()
    head = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
    aspp = model_of("deeplabv3plus_resnet50", 21).classifier.aspp.eval()
    aspp.load_state_dict({k.removeprefix("aspp."): v for k, v in head.items() if k.startswith("aspp.")})

    def bn(x, prefix):
        return F.batch_norm(x, head[prefix + ".running_mean"], head[prefix + ".running_var"],
                            head[prefix + ".weight"], head[prefix + ".bias"], False, 0.0, 1e-5)

    x = torch.rand(2, 3, 49, 57)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = getter((x - mean) / std)
        low = F.relu(bn(F.conv2d(feats["low"], head["project.0.weight"]), "project.1"))
        up = F.interpolate(aspp(feats["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(bn(F.conv2d(torch.cat([low, up], 1), head["classifier.0.weight"], padding=1), "classifier.1"))
        y = F.conv2d(y, head["classifier.3.weight"], head["classifier.3.bias"])
        expected = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)


def test_mobilenet_pads_block_inputs_as_deeplabv3plus_pytorch_does():
    """Its stem convolution has no padding (65 -> 32), and each block zero-pads its input
    before the expansion convolution, which differs from padding inside the depth-wise one."""
    model = create_model("deeplabv3plus_mobilenet", 5).eval()
    stem = model.backbone.low_level_features[0]
    assert stem(torch.rand(1, 3, 65, 65)).shape[-1] == 32
    block = model.backbone.low_level_features[2]  # expansion 6, stride 2
    for layer in block.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):  # non-trivial BN so padded zeros do not stay zero
            layer.running_mean.uniform_(-1, 1)
            layer.bias.data.uniform_(-1, 1)
    x = torch.rand(1, 16, 9, 9)
    pw, dw, linear, norm = block.conv
    with torch.no_grad():
        expected = norm(linear(dw(pw(F.pad(x, (1, 1, 1, 1))))))
        torch.testing.assert_close(block(x), expected)
        inside = F.conv2d(pw(x), dw[0].weight, stride=2, padding=1, groups=dw[0].groups)  # torchvision's way
        assert not torch.allclose(block(x), norm(linear(dw[2](dw[1](inside)))), atol=1e-3)


@pytest.mark.parametrize("name,output_stride", [("deeplabv3plus_mobilenet", 16), ("deeplabv3plus_mobilenet", 8),
                                                ("deeplabv3plus_resnet50", 8)])
def test_head_encode_decode_is_the_forward_pass(name, output_stride):
    torch.manual_seed(0)
    model = create_model(name, 4, output_stride=output_stride).eval()
    x = torch.rand(2, 3, 41, 45)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 4, 41, 45)
        for at in SPLIT_POINTS:
            feature, low_level = model.head(x, at)
            torch.testing.assert_close(model.tail(feature, at, low_level, x.shape[-2:]), y, rtol=0, atol=0)


def test_the_decoder_reads_the_clean_low_level_feature_even_after_layer1():
    """As released (the backbone's ``tail`` branch): the decoder gets the low-level feature the
    caller passes, the clean one, also when the perturbed feature is layer1's output itself."""
    model = create_model("deeplabv3plus_mobilenet", 4).eval()
    x = torch.rand(1, 3, 33, 33)
    feature, low_level = model.head(x, "layer1")
    assert feature is low_level
    changed = feature + 0.5
    with torch.no_grad():
        via_tail = model.tail(changed, "layer1", low_level, x.shape[-2:])
        torch.testing.assert_close(via_tail, model.decode(model.encode(changed, "layer1"), low_level, x.shape[-2:]),
                                   rtol=0, atol=0)
        assert not torch.allclose(via_tail, model.decode(model.encode(changed, "layer1"), changed, x.shape[-2:]))


def test_decode_is_fuse_then_classify_on_the_304_channel_feature():
    torch.manual_seed(0)
    model = create_model("deeplabv3plus_resnet50", 4).eval()
    x = torch.rand(2, 3, 41, 45)
    with torch.no_grad():
        feature, low_level = model.head(x, "layer3")
        aspp = model.encode(feature, "layer3")
        fused = model.fuse(aspp, low_level)
        assert fused.shape == (2, 304, *low_level.shape[-2:])
        torch.testing.assert_close(model.classify(fused, x.shape[-2:]), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("at,split", [("layer1", "backbone.low_level_features.3"),
                                      ("layer3", "backbone.high_level_features.13")])
def test_aux_bn_goes_where_the_adversarial_passes_perturb(at, split, model_of):
    """Exactly the backbone after the split point, the ASPP and the decoder's convolutions; not
    the low-level projection, which reads the clean feature in every pass (as released)."""
    model = model_of("deeplabv3plus_mobilenet", 3)
    names = [n for n, _ in model.named_modules()]
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = {n for n in bns if n.startswith("backbone.") and names.index(n) > names.index(split)
                and not n.startswith(split + ".")}
    expected |= {n for n in bns if n.startswith("classifier.aspp.")} | {"classifier.classifier.1"}
    model.convert_aux_bn(at)
    assert {n for n, m in model.named_modules() if isinstance(m, afan.AuxBatchNorm2d)} == expected
    assert "classifier.project.1" in bns and len(expected) > 10


def test_backbone_bn_momentum_reaches_every_backbone_bn_and_its_aux_branch():
    cfg = load_config(TrainConfig, overrides=["model.name=deeplabv3plus_mobilenet", "mode=afan", "afan.aux_bn=true",
                                              "afan.se_layer=layer2", "channels_last=false"])
    assert cfg.model.backbone_bn_momentum == 0.01  # the release's default
    model = seg_train.build_model(cfg, 3, torch.device("cpu"))
    backbone = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(isinstance(m, afan.AuxBatchNorm2d) for m in backbone)  # converted after the momentum was set
    assert {m.momentum for m in backbone} == {0.01}  # main and auxiliary branches
    assert {m.momentum for m in model.classifier.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    plain = seg_train.build_model(load_config(TrainConfig, overrides=["model.name=deeplabv3plus_mobilenet",
                                                                      "model.backbone_bn_momentum=0.1"]), 3, "cpu")
    assert {m.momentum for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


def test_normalisation_is_not_in_the_state_dict_and_output_stride_sets_the_aspp_rates(model_of):
    model = create_model("deeplabv3plus_mobilenet", 3, output_stride=8)
    assert not [k for k in model.state_dict() if "normalize" in k or k.endswith(("mean", "std")) and "running" not in k]
    assert [c[0].dilation[0] for c in model.classifier.aspp.convs[1:4]] == [12, 24, 36]
    assert [c[0].dilation[0] for c in model_of("deeplabv3plus_mobilenet", 3).classifier.aspp.convs[1:4]] == [6, 12, 18]


def test_payload_round_trip_keeps_output_stride_and_drops_aux_bn(tmp_path):
    model = create_model("deeplabv3plus_mobilenet", 6, output_stride=8)
    model.convert_aux_bn("layer3")
    torch.save(checkpoint_payload(model), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.model_kwargs == {"output_stride": 8} and loaded.num_classes == 6
    plain = afan.strip_aux_bn(model).eval()
    x = torch.rand(1, 3, 37, 37)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)


def test_plain_state_dicts_and_data_parallel_prefixes_load(tmp_path, model_of):
    model = model_of("deeplabv3plus_mobilenet", 3)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "plain.pth")
    assert load_model(tmp_path / "plain.pth").arch == "deeplabv3plus_mobilenet"
    assert infer_arch(create_model("deeplabv3plus_resnet101", 3).state_dict()) == "deeplabv3plus_resnet101"


def test_loading_errors_name_the_problem(tmp_path, model_of):
    model = model_of("deeplabv3plus_mobilenet", 3)
    torch.save(checkpoint_payload(model), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="3 classes, but num_classes=21"):
        load_model(tmp_path / "m.pth", num_classes=21)
    with pytest.raises(CheckpointError, match="holds a deeplabv3plus_mobilenet model, not the requested deeplabv3plus_resnet50"):
        load_model(tmp_path / "m.pth", name="deeplabv3plus_resnet50")
    state = model.state_dict()
    del state["classifier.project.0.weight"]
    state["classifier.extra.weight"] = torch.zeros(1)
    torch.save({"model_state": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): classifier.project.0.weight.*unexpected keys"):
        load_model(tmp_path / "broken.pth")
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint"):
        load_model(tmp_path / "other.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="does not say which architecture"):
        load_model(tmp_path / "unknown.pth")


def test_create_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Did you mean 'deeplabv3plus_resnet50'"):
        create_model("deeplabv3plus_resnet5", 21)
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        create_model("deeplabv3plus_mobilenet", 21, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("deeplabv3plus_mobilenet", 1)
    with pytest.raises(ValueError, match="unknown split point 'layer5'"):
        create_model("deeplabv3plus_mobilenet", 2).head(torch.rand(1, 3, 33, 33), "layer5")


def test_imagenet_backbone_weights_load_from_torchvision_files(tmp_path, model_of):
    torch.manual_seed(0)
    source = mobilenet_v2()
    torch.save(source.state_dict(), tmp_path / "mobilenet_v2.pth")
    model = model_of("deeplabv3plus_mobilenet", 3)
    load_backbone_weights(model, tmp_path / "mobilenet_v2.pth")
    assert torch.equal(getattr(model.backbone.high_level_features, "7").conv[0][0].weight, source.features[7].conv[0][0].weight)
    assert torch.equal(model.backbone.low_level_features[0][0].weight, source.features[0][0].weight)
    torch.save(resnet50().state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError, match="not a torchvision ImageNet backbone for deeplabv3plus_mobilenet"):
        load_backbone_weights(model, tmp_path / "resnet50.pth")
