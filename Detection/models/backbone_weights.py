"""ImageNet-pretrained ResNet weights for a detector, read from a local file.

The release trains from torchvision's ImageNet ResNets (``pretrained=True``). Here the user
names the file they have, torchvision's own ``state_dict()`` of the ResNet (what
``torch.hub`` caches, e.g. ``~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth``), and
nothing is downloaded.
"""
from __future__ import annotations

from afan_harness.checkpoint import CheckpointError, key_mismatches, load_state_dict

# torchvision's IMAGENET1K_V1 files, the original ImageNet weights the release started from.
WEIGHT_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
_C4_HEAD = "roi_heads.box_head."


def _step_counter(key: str) -> bool:
    # FrozenBatchNorm2d keeps no step counter; torchvision's files have one per BatchNorm.
    return key.endswith("num_batches_tracked")


def load_backbone_weights(model, path) -> None:
    """Load the torchvision ImageNet ResNet state dict at ``path`` into ``model``'s ResNet:
    conv1..layer4 into ``backbone.body`` (FPN), or conv1..layer3 there and layer4 into the
    RoI head (C4). The classifier ``fc`` is not used. A missing, unreadable or foreign file is
    a ``CheckpointError`` naming it; then nothing is loaded."""
    resnet = model.resnet_name
    hint = (f"expected torchvision's ImageNet {resnet} state dict, e.g. {WEIGHT_URLS[resnet].rsplit('/', 1)[1]} "
            f"from {WEIGHT_URLS[resnet]}")
    state = load_state_dict(path)

    def target(key: str) -> str:
        return (_C4_HEAD if model.c4 and key.startswith("layer4.") else "backbone.body.") + key

    expected = model.state_dict()
    mapped = {target(k): v for k, v in state.items() if not k.startswith("fc.")}
    mapped = {k: v for k, v in mapped.items() if k in expected or not _step_counter(k)}
    wanted = {k: v for k, v in expected.items() if k.startswith(("backbone.body.", _C4_HEAD + "layer4."))}
    problems = key_mismatches(wanted, mapped, optional=_step_counter)
    if problems:
        raise CheckpointError(f"{path} does not fit the {resnet} of {model.arch}: " + "; ".join(problems) + f"; {hint}")
    model.load_state_dict(mapped, strict=False)  # only the ResNet's keys, each checked above
