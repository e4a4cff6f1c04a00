"""``python -m bench --batched``: the A-FAN step with its strengths one tail pass each against
one pass over all of them (``afan.batch_strengths``), on models where that is exact.

Two cases, each a torchvision ResNet-18 split at ``layer2`` as detection's SE is, with the
detection release's strengths (``n`` 4, mask ``0011``): ``groupnorm`` (GroupNorm, 32 groups)
and ``frozenbn`` (``FrozenBatchNorm2d``, as detection backbones freeze theirs). Both modes run
the same step, written once below: feature PGD, the strengths through ``afan.backward_each``
(``per_strength``: one loss per strength; ``batched``: one joined pass), then the clean tail,
as ``afan.AFAN.step`` does (``tests/test_bench.py`` checks the per-strength step against it).
Settings: ``batch_size``, ``image_size``, ``n``, ``steps`` as ``KEY=VALUE``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import afan
from bench.cases import Case

MODES = ("per_strength", "batched")
SETTINGS = {"batch_size": 8, "image_size": 64, "n": 4, "steps": 1}
AT = "layer2"
TINY = {"groupnorm": ["batch_size=2", "image_size=16"], "frozenbn": ["batch_size=2", "image_size=16"]}


def settings_of(overrides) -> dict:
    settings = dict(SETTINGS)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise ValueError(f"bench --batched: unknown setting {item!r}; choose from {', '.join(SETTINGS)}")
        settings[key] = int(value)
    return settings


def afan_step(model, head, tail, x, y, *, n: int, steps: int, batched: bool) -> torch.Tensor:
    """One A-FAN step's loss, backward done: ``(L_clean + mean_i L_i) / 2``, as ``afan.AFAN``
    with ``mask`` half unmixed, half mixed (detection's ``0011``) and its other defaults."""
    mask = "0" * (n // 2) + "1" * (n - n // 2)
    h = head(x)

    def loss_at(feature):
        return F.cross_entropy(tail(feature), y)

    h_adv = afan.feature_pgd(h, loss_at, steps=steps, step_size=0.5 / 255)

    def strengths(clean):
        return [afan.mixed_strength(clean, h_adv, i, mask) for i in range(1, n + 1)]

    if batched:
        passes = [lambda clean: torch.stack(afan.batch_strengths(tail, strengths(clean), F.cross_entropy, y,
                                                                  model=model)).sum()]
    else:
        passes = [lambda clean, i=i: loss_at(afan.mixed_strength(clean, h_adv, i, mask)) for i in range(1, n + 1)]
    adversarial, _ = afan.backward_each([h.detach()], passes, model.parameters())
    loss = (F.cross_entropy(tail(h), y) + adversarial / n) / 2
    loss.backward()
    return loss


def _case(norm_layer, name: str, mode: str, device, overrides) -> Case:
    settings = settings_of(overrides)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=norm_layer).to(device).train()
    head, tail = afan.split(model, AT)
    size, batch = settings["image_size"], settings["batch_size"]
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        return afan_step(model, head, tail, x, y, n=settings["n"], steps=settings["steps"], batched=mode == "batched")

    return Case(model, step, {}, f"ResNet-18 ({name}), batch {batch} of {size} px, SE after {AT}, "
                                 f"n {settings['n']}, {settings['steps']} PGD step(s)")


def groupnorm(mode: str, device, overrides=()) -> Case:
    return _case(lambda channels: nn.GroupNorm(32, channels), "GroupNorm", mode, device, overrides)


def frozenbn(mode: str, device, overrides=()) -> Case:
    return _case(FrozenBatchNorm2d, "FrozenBatchNorm2d", mode, device, overrides)


BUILDERS = {"groupnorm": groupnorm, "frozenbn": frozenbn}
