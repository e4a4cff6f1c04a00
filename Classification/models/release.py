"""Reading the original A-FAN classification release's checkpoints.

The release stored a CIFAR ResNet-s as one ``nn.Sequential`` called ``sequential_model``:
0 input normalisation (buffers ``mean``, ``std``), 1 conv, 2 BN, 3 ReLU, then the ``3n``
basic blocks, then average pool, flatten and linear; next to it sat an unused parameter
``w``. ``convert_release_state_dict`` renames these entries to ``CifarResNet``'s keys.
"""
from __future__ import annotations

import re

import torch

PREFIX = "sequential_model."
_ENTRY = re.compile(r"sequential_model\.(\d+)\.(.+)")


def is_release_state_dict(state: dict) -> bool:
    return any(key.startswith(PREFIX) for key in state)


def convert_release_state_dict(state: dict):
    """``(arch, num_classes, state, mean, std)`` for a release state dict.

    ``state`` has our key names; entries that fit no slot keep their original names so
    that the caller's key check reports them. ``mean``/``std`` are None when absent.
    Raises ValueError when the blocks do not form a ResNet-s.
    """
    entries = {}
    for key, value in state.items():
        match = _ENTRY.fullmatch(key)
        if match:
            entries[(int(match.group(1)), match.group(2))] = (key, value)
    block_indices = sorted(i for i, rest in entries if rest == "conv1.weight")
    per_stage, remainder = divmod(len(block_indices), 3)
    if not block_indices or remainder or block_indices != list(range(4, 4 + len(block_indices))):
        raise ValueError(
            f"its blocks sit at indices {block_indices}, but a ResNet-s has 3n blocks at "
            "indices 4, 5, ..."
        )
    linear = 4 + len(block_indices) + 2  # after average pool and flatten

    def rename(index: int, rest: str):
        if index == 1:
            return f"stem.0.{rest}"
        if index == 2:
            return f"stem.1.{rest}"
        if index in block_indices:
            block = index - 4
            return f"layer{block // per_stage + 1}.{block % per_stage}.{rest}"
        if index == linear:
            return f"fc.{rest}"
        return None

    converted = {}
    for key, value in state.items():
        match = _ENTRY.fullmatch(key)
        if key == "w" or (match and int(match.group(1)) == 0):
            continue  # the unused parameter and the normalisation buffers
        new = rename(int(match.group(1)), match.group(2)) if match else None
        converted[new or key] = value
    classifier = converted.get("fc.weight")
    num_classes = classifier.shape[0] if isinstance(classifier, torch.Tensor) else None
    mean, std = state.get(f"{PREFIX}0.mean"), state.get(f"{PREFIX}0.std")
    return f"resnet{6 * per_stage + 2}", num_classes, converted, mean, std
