"""Segmentation checkpoints: this project's payload, DeepLabV3Plus-Pytorch's and plain state dicts.

``checkpoint_payload(model)`` is what training saves. ``load_model`` reads it, a
DeepLabV3Plus-Pytorch checkpoint (``{'model_state': ...}``, the format the original A-FAN
segmentation code wrote) or a plain state dict into an evaluation model with plain BatchNorm.
Files that do not record the architecture have it read off their keys. Every problem becomes
one ``CheckpointError`` naming the file; nothing is loaded partially.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights, ResNet101_Weights

from afan_harness.checkpoint import (EXAMPLE_KEYS, CheckpointError, ModelFormat, key_mismatches, load_checkpoint,
                                     load_model_file, model_payload, unpack_model_file)

from .deeplab import MODEL_NAMES, DeepLabV3Plus, check_name, create_model

# torchvision's ImageNet weights of each backbone (IMAGENET1K_V1: the ones the release started
# from), named when the file is missing so users know what to fetch.
IMAGENET_WEIGHTS = {"deeplabv3plus_resnet50": ResNet50_Weights.IMAGENET1K_V1,
                    "deeplabv3plus_resnet101": ResNet101_Weights.IMAGENET1K_V1,
                    "deeplabv3plus_mobilenet": MobileNet_V2_Weights.IMAGENET1K_V1}

checkpoint_payload = model_payload  # what training saves, load_model reads back

def _unpack(path: Path, checkpoint: Mapping):
    """``(state, arch, num_classes, model_kwargs)``; unknown entries are None / {}."""
    if isinstance(checkpoint.get("model_state"), Mapping):  # DeepLabV3Plus-Pytorch
        return dict(checkpoint["model_state"]), None, None, {}
    return unpack_model_file(path, checkpoint, "segmentation",
                             "DeepLabV3Plus-Pytorch's {'model_state': state_dict}, or a plain state dict")


def infer_arch(state: Mapping) -> Optional[str]:
    """The architecture a DeepLabv3+ state dict belongs to, from its keys (None if unknown):
    MobileNetV2 has ``backbone.high_level_features``; ResNet-101 has 23 ``layer3`` blocks,
    ResNet-50 six."""
    if any(k.startswith("backbone.high_level_features.") for k in state):
        return "deeplabv3plus_mobilenet"
    if "backbone.layer3.22.conv1.weight" in state:
        return "deeplabv3plus_resnet101"
    if "backbone.layer3.5.conv1.weight" in state:
        return "deeplabv3plus_resnet50"
    return None


FORMAT = ModelFormat(names=MODEL_NAMES, check_name=check_name, unpack=_unpack,
                     classifier=lambda name, state: state.get(DeepLabV3Plus.classifier_key),
                     build=create_model,
                     infer_arch=infer_arch)


def load_model(path, name: Optional[str] = None, num_classes: Optional[int] = None,
               output_stride: Optional[int] = None) -> DeepLabV3Plus:
    """The DeepLabv3+ stored at ``path``, in eval mode, with plain BatchNorm
    (``afan_harness.checkpoint.load_model_file``). ``output_stride`` is not visible in the weights
    (the same weights run at 8 or 16): it defaults to the one recorded by training, else 16."""
    return load_model_file(path, FORMAT, name, num_classes,
                           **({"output_stride": output_stride} if output_stride else {}))


def _backbone_key(arch: str, key: str) -> str:
    """A torchvision ImageNet key as this model's backbone names it (MobileNetV2's
    ``features.<i>`` are split into low- and high-level parts, keeping their indices)."""
    if arch == "deeplabv3plus_mobilenet" and key.startswith("features."):
        index = int(key.split(".")[1])
        return f"{'low' if index < 4 else 'high'}_level_features.{key.removeprefix('features.')}"
    return key


def load_backbone_weights(model: DeepLabV3Plus, path) -> None:
    """Load a torchvision ImageNet state dict (``resnet50-*.pth``, ``mobilenet_v2-*.pth``,
    read from disk, nothing downloaded) into ``model.backbone``. The classifier (``fc``,
    ``classifier``) and MobileNetV2's last 1x1 block, which DeepLabv3+ does not use, are
    skipped; anything else that does not fit, a missing or unreadable file included, is a
    ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        weights = IMAGENET_WEIGHTS[model.arch]
        reason = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"the ImageNet backbone weights {path} (model.backbone_weights) {reason}; download "
            f"{weights.url} (torchvision's {type(weights).__name__}.IMAGENET1K_V1) to that path, or set "
            "model.backbone_weights= (empty) to start from random weights")
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint.get("state_dict"), Mapping) else checkpoint
    expected = model.backbone.state_dict()
    unused = ("fc.", "classifier.", "features.18.")
    mapped = {_backbone_key(model.arch, k): v for k, v in
              ((k.removeprefix("module."), v) for k, v in state.items()) if not k.startswith(unused)}
    problems = key_mismatches(expected, mapped, examples=EXAMPLE_KEYS)
    if problems:
        raise CheckpointError(f"{path} is not a torchvision ImageNet backbone for {model.arch}; " + "; ".join(problems))
    model.backbone.load_state_dict(mapped, strict=True)
