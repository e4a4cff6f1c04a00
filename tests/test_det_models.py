"""Detection models: the release's C4 structure, ImageNet backbone files, building, the
payload round trip, torchvision state dicts, errors."""
import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import afan
from afan_harness.checkpoint import CheckpointError, save_checkpoint
from Detection.models import MODEL_NAMES, checkpoint_payload, create_model, family, load_model

TINY = {"min_size": 64, "max_size": 96}


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]


def randomize_norm_buffers(model, seed=0):
    """Random BN statistics and affines, so that loading them wrongly would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and (".bn" in name or "downsample.1" in name):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)


def assert_same_detections(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def voc_model(built_once):
    """``voc_model(name)``: a fresh copy of ``create_model(name, 21)``, built once per module."""
    return lambda name: built_once.get(name, lambda: create_model(name, 21))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_name_builds(name, voc_model):
    model = voc_model(name)
    assert model.arch == name and model.num_classes == 21
    c4 = family(name) == "c4"
    assert model.split_points == ("layer1", "layer2", "layer3") + (() if c4 else ("layer4",))
    assert all(hasattr(model.backbone.body, at) for at in model.split_points)
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    sides = ((600,), 1000) if c4 else ((800,), 1333)  # the VOC release / torchvision
    assert (model.transform.min_size, model.transform.max_size) == sides


@pytest.mark.parametrize("name, channels, width", [("fasterrcnn_resnet50_c4", 1024, 2048),
                                                   ("fasterrcnn_resnet101_c4", 1024, 2048),
                                                   ("fasterrcnn_resnet18_c4", 256, 512)])
def test_c4_model_is_the_released_detector(name, channels, width, voc_model):
    """The release's R-C4 (its Detection/model.py, backbone/resnet50.py, roi/pooler.py and
    config/*.py), part by part."""
    model = voc_model(name)
    body, heads, rpn = model.backbone.body, model.roi_heads, model.rpn
    assert list(body) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert dict(body.return_layers) == {"layer3": "0"} and model.backbone.out_channels == channels
    # Frozen: conv1, bn1, layer1 and every BatchNorm; trained: layer2, layer3 and layer4.
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.") and not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # bn1 is a FrozenBatchNorm2d: buffers, no parameters
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith(("backbone.body.conv1", "backbone.body.layer1")))
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in heads.box_head.layer4.modules())
    # Stride 16: a 320 x 480 image gives a 20 x 30 map.
    model.eval()
    with torch.no_grad():
        images = model.transform([torch.rand(3, 600, 900)])[0]
        assert images.tensors.shape[-2:] == (608, 928)  # padded to a multiple of 32
        feature = model.backbone(images.tensors)["0"]
    assert feature.shape[1:] == (channels, 38, 58)
    # RPN: anchors 128/256/512 x ratios 1:2, 1:1, 2:1 on that one map; a 3x3 conv to 512.
    assert rpn.anchor_generator.sizes == ((128, 256, 512),)
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),)
    conv = rpn.head.conv[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (channels, 512, (3, 3))
    assert rpn.head.cls_logits.out_channels == 9 and rpn.head.bbox_pred.out_channels == 36
    assert rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert rpn._post_nms_top_n == {"training": 2000, "testing": 300}
    assert rpn.smooth_l1_beta == heads.smooth_l1_beta == 1.0
    assert rpn.fg_bg_sampler.batch_size_per_image == 256 and rpn.fg_bg_sampler.positive_fraction == 0.5
    assert heads.fg_bg_sampler.batch_size_per_image == 128 and heads.fg_bg_sampler.positive_fraction == 0.25
    assert heads.nms_thresh == 0.3
    # RoIAlign 14 x 14 on the layer3 map, max-pooled to 7 x 7, layer4, max-pooled to `width`.
    assert heads.box_roi_pool.featmap_names == ["0"] and heads.box_roi_pool.output_size == (14, 14)
    assert heads.box_roi_pool.sampling_ratio == 0
    rois = torch.rand(3, channels, 14, 14)
    reference = torch.nn.functional.max_pool2d(rois, 2)
    reference = torch.amax(heads.box_head.layer4(reference), dim=(2, 3))
    with torch.no_grad():
        assert torch.equal(heads.box_head(rois), reference) and reference.shape == (3, width)
    assert heads.box_predictor.cls_score.in_features == heads.box_predictor.bbox_pred.in_features == width
    assert heads.box_predictor.bbox_pred.out_features == 21 * 4


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_c4", "fasterrcnn_resnet18_fpn"])
@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_imagenet_backbone_file_loads_exactly(tmp_path, name, norm):
    """A torchvision ImageNet ResNet ``state_dict()`` (here with random weights and statistics)
    becomes the detector's ResNet: every tensor equal, layer4 in the RoI head for C4."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    randomize_norm_buffers(resnet)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(resnet.state_dict(), path)
    model = create_model(name, 3, norm=norm, backbone_weights=path)
    state = model.state_dict()
    prefix = {"layer4": "roi_heads.box_head." if family(name) == "c4" else "backbone.body."}
    compared = 0
    for key, value in resnet.state_dict().items():
        if key.startswith("fc.") or (norm == "frozen" and key.endswith("num_batches_tracked")):
            continue
        target = prefix.get(key.split(".")[0], "backbone.body.") + key
        assert torch.equal(state[target], value), key
        compared += 1
    # ... and every tensor of the detector's ResNet came from the file.
    assert compared == len([k for k in state if k.startswith(("backbone.body.", "roi_heads.box_head.layer4."))])
    # Frozen stages stay frozen after loading.
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad


def test_foreign_missing_or_truncated_backbone_files_are_one_clear_error(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match=r"resnet18\.pth does not fit the resnet50 of fasterrcnn_resnet50_c4: "
                                              r".*shape mismatches.*resnet50-0676ba61\.pth"):
        create_model("fasterrcnn_resnet50_c4", 3, backbone_weights=tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match=r"nowhere\.pth does not exist"):
        create_model("fasterrcnn_resnet18_c4", 3, backbone_weights=tmp_path / "nowhere.pth")
    data = (tmp_path / "resnet18.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: the file may be truncated"):
        create_model("fasterrcnn_resnet18_c4", 3, backbone_weights=tmp_path / "cut.pth")
    detector = create_model("fasterrcnn_resnet18_c4", 3)
    torch.save(detector.state_dict(), tmp_path / "detector.pth")  # a whole detector, not a ResNet
    with pytest.raises(CheckpointError, match=r"detector\.pth does not fit the resnet18.*unexpected keys"):
        create_model("fasterrcnn_resnet18_c4", 3, backbone_weights=tmp_path / "detector.pth")


def test_options():
    model = create_model("fasterrcnn_resnet18_fpn", 3, norm="bn", anchor_sizes=[64, 128, 256, 512], **TINY)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert list(model.backbone.body.return_layers) == ["layer2", "layer3", "layer4"]
    model.eval()
    with torch.no_grad():
        model(images())  # 4 anchor sizes fit the 4 FPN levels
    frozen = create_model("fasterrcnn_resnet18_fpn", 3, trainable_layers=1, **TINY)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    trainable = {n.split(".")[2] for n, p in frozen.named_parameters() if p.requires_grad and n.startswith("backbone.body")}
    assert trainable == {"layer4"}


@pytest.mark.parametrize("bad, message", [
    ({"name": "fasterrcnn_resnet5_fpn"}, "Did you mean 'fasterrcnn_resnet50_fpn'"),
    ({"num_classes": 1}, "num_classes counts the background"), ({"norm": "gn"}, "norm must be one of"),
    ({"anchor_sizes": [32]}, "2 to 5 FPN levels"), ({"trainable_layers": 6}, r"trainable_layers must be an integer in \[0, 5\]"),
    ({"representation_size": 0}, "representation_size must be a positive integer"),
    ({"rpn_pre_nms_top_n": [100]}, r"rpn_pre_nms_top_n must be \[training, test\]"),
    ({"roi_smooth_l1_beta": 0}, "roi_smooth_l1_beta must be a positive number"),
    ({"name": "fasterrcnn_resnet18_c4", "representation_size": 256}, "representation_size is the FPN box head's width"),
    ({"name": "fasterrcnn_resnet18_c4", "anchor_sizes": [[16, 32], [64]]}, "positive sizes for its one feature map"),
])
def test_bad_arguments(bad, message):
    kwargs = {"name": "fasterrcnn_resnet18_fpn", "num_classes": 3, **TINY, **bad}
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


@pytest.mark.parametrize("name, options", [
    ("fasterrcnn_resnet18_fpn", {"anchor_sizes": [16, 32, 64, 128, 256], "representation_size": 128}),
    ("fasterrcnn_resnet18_c4", {"anchor_sizes": [16, 32, 64], "roi_batch_size": 32, "box_nms_thresh": 0.4}),
])
def test_payload_round_trip_drops_aux_bn(tmp_path, name, options):
    torch.manual_seed(0)
    model = create_model(name, 4, norm="bn", **options, **TINY)
    if "representation_size" in options:
        assert model.roi_heads.box_head.fc7.out_features == model.roi_heads.box_predictor.cls_score.in_features == 128
    randomize_norm_buffers(model)
    afan.convert_aux_bn(model, after="backbone.body.layer2")
    save_checkpoint(checkpoint_payload(model), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert not loaded.training and loaded.arch == model.arch and loaded.num_classes == 4
    assert loaded.model_kwargs == model.model_kwargs
    assert not any(isinstance(m, afan.AuxBatchNorm2d) for m in loaded.modules())
    plain = afan.strip_aux_bn(model).eval()
    with torch.no_grad():
        assert_same_detections(loaded(images()), plain(images()))


def test_plain_torchvision_state_dict_predicts_identically(tmp_path):
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    reference = FasterRCNN(backbone, num_classes=5, **TINY).eval()
    randomize_norm_buffers(reference)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    loaded = load_model(tmp_path / "tv.pth", name="fasterrcnn_resnet18_fpn", **TINY)
    assert loaded.num_classes == 5  # read from the classifier weight
    with torch.no_grad():
        expected, got = reference(images(1)), loaded(images(1))
    assert sum(len(d["boxes"]) for d in expected) > 0
    assert_same_detections(got, expected)


def test_torchvision_builder_keys_load(tmp_path):
    # torchvision's own resnet50 builder (untrained: nn.BatchNorm2d with step counters).
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    loaded = load_model(tmp_path / "r50.pth", name="fasterrcnn_resnet50_fpn")
    assert loaded.num_classes == 3
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_errors_name_the_file(tmp_path):
    model = create_model("fasterrcnn_resnet18_fpn", 3, **TINY)
    save_checkpoint(checkpoint_payload(model), tmp_path / "payload.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not the requested fasterrcnn_resnet50_fpn"):
        load_model(tmp_path / "payload.pt", name="fasterrcnn_resnet50_fpn")
    with pytest.raises(CheckpointError, match=r"plain\.pth.*--model NAME on the command line"):
        load_model(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain\.pth does not fit fasterrcnn_resnet50_fpn.*(missing|unexpected) keys"):
        load_model(tmp_path / "plain.pth", name="fasterrcnn_resnet50_fpn")
    with pytest.raises(CheckpointError, match="3 classes"):
        load_model(tmp_path / "payload.pt", num_classes=21)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(tmp_path / "plain.pth", name="fasterrcnn_resnet18_fpn", anchor_sizes=[[16, 32]] * 5)
    with pytest.raises(ValueError, match="Valid names"):
        load_model(tmp_path / "plain.pth", name="resnet18")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pth", name="fasterrcnn_resnet18_fpn")
