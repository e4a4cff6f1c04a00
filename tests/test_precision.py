"""Mixed precision: the switches, A-FAN's numerics in bf16 against float32, and training runs
in bf16 and in fp16 with a grad scaler (checkpointed and resumed), on the CPU and on CUDA."""
import pytest
import torch

from afan_harness.checkpoint import load_checkpoint
from afan_harness.config import load_config
from afan_harness.runtime import autocast, grad_scaler, resolve_precision
from Classification import train as cls_train
from Classification.config import AfanConfig as ClsAfanConfig
from Classification.models import create_model as create_classifier
from Classification.steps import afan_step as cls_afan_step
from Detection import train as det_train
from Segmentation import train as seg_train
from Segmentation.config import AfanConfig
from Segmentation.models import create_model
from Segmentation.steps import afan_step

CPU = torch.device("cpu")


def test_precision_switches():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="precision='half' is not valid; choose one of auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU)
    with autocast("bf16", CPU):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", CPU):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert grad_scaler("fp16", CPU).is_enabled() and not grad_scaler("bf16", CPU).is_enabled()


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_segmentation_afan_step_in_bf16_is_close_to_float32(device):
    torch.manual_seed(0)
    model = create_model("deeplabv3plus_mobilenet", 7).train().to(device)
    model.classifier.aspp.project[-1].p = 0.0  # CUDA's dropout masks depend on the dtype
    images, masks = torch.rand(2, 3, 48, 48, device=device), torch.randint(0, 7, (2, 48, 48), device=device)
    cfg = AfanConfig(gamma_se=2.0, gamma_sd=2.0)
    full = afan_step(model, images, masks, cfg)
    with autocast("bf16", device):
        half = afan_step(model, images, masks, cfg)
    assert half.perturbation.dtype == torch.float32  # the perturbation itself is kept in float32
    with torch.no_grad():
        h, _ = model.head(images, cfg.se_layer)
        aspp = model.encode(h, cfg.se_layer)
    # The adversarial features (SE and SD); the signs of gradients near zero may differ.
    assert _relative(h + half.perturbation, h + full.perturbation) < 2e-2
    assert _relative(aspp + half.sd_perturbation, aspp + full.sd_perturbation) < 2e-2
    for key, loss in full.losses.items():
        assert abs(half.losses[key].item() - loss.item()) / loss.item() < 2e-2, key


def test_classification_afan_step_in_bf16_is_close_to_float32(device):
    torch.manual_seed(0)
    model = create_classifier("resnet20", 6).train().to(device)
    x, y = torch.rand(8, 3, 32, 32, device=device), torch.randint(0, 6, (8,), device=device)
    cfg = ClsAfanConfig(steps=3, gamma=1.0)
    full = cls_afan_step(model, x, y, cfg)
    with autocast("bf16", device):
        half = cls_afan_step(model, x, y, cfg)
    assert abs(half.loss.item() - full.loss.item()) / full.loss.item() < 2e-2
    h = model.head(x, cfg.layer)
    assert _relative(h + half.perturbation, h + full.perturbation) < 2e-2


TINY = ["model.name=deeplabv3plus_mobilenet", "data.name=shapes", "data.image_size=32", "data.train_size=8",
        "data.val_size=2", "data.crop_size=0", "data.scale_range=[1.0,1.0]", "data.workers=0", "batch_size=2",
        "log_every=1", "eval.batch_size=2", "eval.save_images=0", "mode=afan"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_segmentation_trains_and_resumes_in_mixed_precision(tmp_path, precision, device):
    settings = [*TINY, f"device={device}", f"precision={precision}", "iterations=2", "checkpoint_every=1"]
    summary = seg_train.run(load_config(seg_train.TrainConfig, overrides=[*settings, f"out={tmp_path}/run"]))
    assert 0 <= summary["miou"] <= 1
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert ("scaler" in state) == (precision == "fp16")  # the fp16 loss scale is part of the state
    resumed = seg_train.run(load_config(seg_train.TrainConfig, overrides=[*settings[:-2], "iterations=3",
                                                                          f"out={tmp_path}/run"]), resume=True)
    assert resumed["iterations"] == 3 and load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 3


def test_classification_trains_in_bf16(tmp_path, device):
    cfg = load_config(cls_train.TrainConfig, overrides=[
        "data.name=shapes", "data.train_size=16", "data.val_size=4", "data.test_size=4", "data.workers=0",
        "model=resnet20", "batch_size=8", "epochs=1", f"device={device}", "precision=bf16", "mode=afan",
        f"out={tmp_path}/run"])
    assert 0 <= cls_train.run(cfg)["test_acc"] <= 1


def test_detection_trains_in_bf16(tmp_path, device):
    cfg = load_config(det_train.TrainConfig, overrides=[
        "model.name=fasterrcnn_resnet18_c4", "model.min_size=64", "model.max_size=64", "model.roi_batch_size=16",
        "model.anchor_sizes=[16,32,64]",
        "data.name=shapes", "data.image_size=64", "data.train_size=4", "data.val_size=2",
        f"data.root={tmp_path / 'data'}", "data.workers=0", "batch_size=2", "iterations=2", "draw_images=0",
        f"device={device}", "precision=bf16", "mode=afan", "afan.n=2", "afan.mask=01", f"out={tmp_path}/run"])
    summary = det_train.run(cfg)
    assert 0 <= summary["mAP"] <= 1
