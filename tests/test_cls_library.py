"""Any torchvision or timm classifier by name (``tv:NAME``, ``timm:NAME``) in Classification:
split exactly at a named module, trained with A-FAN, saved and read back."""
import pytest
import torch
import torchvision

from afan_harness.config import ConfigError, load_config
from Classification import train as cls_train
from Classification.models import create_model, load_model
from Classification.train import TrainConfig

SHAPES = ["data.name=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.workers=0",
          "batch_size=16", "device=cpu", "epochs=1", "afan.steps=1", "mode=afan"]


@pytest.mark.parametrize("name, at", [("tv:resnet18", "layer2"), ("tv:mobilenet_v3_small", "features.6"),
                                      ("timm:convnext_atto", "stages.1")])
def test_library_models_split_exactly(name, at):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    assert at in model.split_points
    assert torch.equal(model.tail(model.head(x, at), at), model(x))


def test_a_plain_torchvision_state_dict_loads_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = load_model(tmp_path / "r18.pth", name="tv:resnet18")
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), net((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize("name, at, extra", [("tv:resnet18", "layer3", []),
                                             ("timm:convnext_atto", "stages.1", ["afan.aux_bn=true"])])
def test_train_and_test_a_library_model(tmp_path, name, at, extra):
    out = tmp_path / "run"
    summary = cls_train.run(load_config(TrainConfig, overrides=[*SHAPES, f"model={name}", f"afan.layer={at}",
                                                                f"out={out}", *extra]))
    model = load_model(out / "best.pth")
    assert model.arch == name and not any(".aux_bn." in key for key in model.state_dict())
    assert 0 <= summary["test_acc"] <= 1


def test_bad_library_names_and_split_points_are_named(tmp_path):
    with pytest.raises(ConfigError, match="resnet18"):
        cls_train.run(load_config(TrainConfig, overrides=[*SHAPES, "model=tv:resnet1", f"out={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match="closest: .*layer2"):
        cls_train.run(load_config(TrainConfig, overrides=[*SHAPES, "model=tv:resnet18", "afan.layer=layer22",
                                                          f"out={tmp_path / 'b'}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
