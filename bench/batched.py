"""``python -m bench --batched``: the A-FAN step with its strengths one tail pass each against
one pass over all of them (``afan.batch_strengths``), on models where that is exact.

Two cases, each a torchvision ResNet-18 split at ``layer2`` as detection's SE is, with the
detection release's strengths (``n`` 4, mask ``0011``): ``groupnorm`` (GroupNorm, 32 groups)
and ``frozenbn`` (``FrozenBatchNorm2d``, as detection backbones freeze theirs). Both modes run
the step of ``afan.AFAN`` (``per_strength``: one tail pass per strength; ``batched``:
``AFAN(batched=True)``, one joined pass, ``afan.batch_strengths``).
Settings: ``batch_size``, ``image_size``, ``n``, ``steps`` as ``KEY=VALUE``. A third case,
``detection``, times the detection task's own A-FAN step with ``afan.batched`` off and on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import afan
from bench import cases
from bench.cases import Case

MODES = ("per_strength", "batched")
SETTINGS = {"batch_size": 8, "image_size": 64, "n": 4, "steps": 1}
AT = "layer2"
TINY = {"groupnorm": ["batch_size=2", "image_size=16"], "frozenbn": ["batch_size=2", "image_size=16"],
        "detection": cases.TINY["detection"]}


def settings_of(overrides) -> dict:
    settings = dict(SETTINGS)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise ValueError(f"bench --batched: unknown setting {item!r}; choose from {', '.join(SETTINGS)}")
        settings[key] = int(value)
    return settings


def _case(norm_layer, name: str, mode: str, device, overrides) -> Case:
    settings = settings_of(overrides)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=norm_layer).to(device).train()
    n = settings["n"]
    mask = "0" * (n // 2) + "1" * (n - n // 2)  # half plain, half mixed: detection's 0011
    objective = afan.AFAN(model, AT, steps=settings["steps"], n=n, mask=mask, batched=mode == "batched")
    size, batch = settings["image_size"], settings["batch_size"]
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        loss = objective.loss(x, y, F.cross_entropy)
        loss.backward()
        return loss

    return Case(model, step, {}, f"ResNet-18 ({name}), batch {batch} of {size} px, SE after {AT}, "
                                 f"n {settings['n']}, {settings['steps']} PGD step(s)")


def groupnorm(mode: str, device, overrides=()) -> Case:
    return _case(lambda channels: nn.GroupNorm(32, channels), "GroupNorm", mode, device, overrides)


def frozenbn(mode: str, device, overrides=()) -> Case:
    return _case(FrozenBatchNorm2d, "FrozenBatchNorm2d", mode, device, overrides)


def detection(mode: str, device, overrides=()) -> Case:
    """The detection task's A-FAN step (``bench.cases.detection``: the Shapes R-18-C4, with its
    BatchNorm frozen as the release's detector has it) with ``afan.batched`` off or on; its
    settings as ``KEY=VALUE`` config overrides."""
    case = cases.detection("afan", device, ["model.norm=frozen", *overrides,
                                            f"afan.batched={str(mode == 'batched').lower()}"])
    return Case(case.model, case.step, {}, case.description + ("; strengths joined" if mode == "batched" else ""))


BUILDERS = {"groupnorm": groupnorm, "frozenbn": frozenbn, "detection": detection}
