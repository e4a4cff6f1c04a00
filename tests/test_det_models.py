"""Detection models: building, the payload round trip, torchvision state dicts, errors."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import afan
from afan.checkpoint import CheckpointError, save_checkpoint
from Detection.models import MODEL_NAMES, checkpoint_payload, create_model, load_model

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


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_name_builds(name):
    model = create_model(name, 21)
    assert model.arch == name and model.num_classes == 21
    assert model.split_points == ("layer1", "layer2", "layer3", "layer4")
    assert all(hasattr(model.backbone.body, at) for at in model.split_points)
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


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


@pytest.mark.parametrize("bad", [{"name": "fasterrcnn_resnet5_fpn"}, {"num_classes": 1}, {"norm": "gn"},
                                 {"anchor_sizes": [32]}, {"trainable_layers": 6}, {"representation_size": 0}])
def test_bad_arguments(bad):
    kwargs = {"name": "fasterrcnn_resnet18_fpn", "num_classes": 3, **TINY, **bad}
    with pytest.raises(ValueError):
        create_model(**kwargs)


def test_payload_round_trip_drops_aux_bn(tmp_path):
    torch.manual_seed(0)
    model = create_model("fasterrcnn_resnet18_fpn", 4, norm="bn", anchor_sizes=[16, 32, 64, 128, 256],
                         representation_size=128, **TINY)
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
    with pytest.raises(CheckpointError, match=r"plain\.pth.*pass name="):
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
