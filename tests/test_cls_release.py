"""One A-FAN training step of the project against the release's, in float64.

The release's step (``Classification/main_perturb.py``, ``train()``, and ``attack_algo.py``
of VITA-Group/CV_A-FAN) is re-stated here from its facts, on the project's own ResNet-s
modules laid out as the release's ``nn.Sequential`` and run by start/end index as the release
runs its model:

1. ``feature = model[0:k](x)``, detached (``k``: the index after stage 1, 4 + blocks);
2. PGD on the feature: ``steps`` times ``feature += gamma/255 * sign(grad CE(model[k:](f)))``,
   no random start, no clip;
3. ``output_adv = model[k:](feature_adv)``, ``output_clean = model[0:](x)``;
4. ``loss = (CE(output_adv) + CE(output_clean)) / 2``, one backward.

Every pass runs in train mode, so BatchNorm normalises with batch statistics and updates its
running statistics, the attack's passes included. The released run (``cmd/run_perturb.sh``:
``--gamma 0.5``, the defaults ``--steps 5``, ``--perturb_idx 13`` = after stage 1 of
ResNet-56s, no ``--randinit``/``--clip``) is what ``configs/cifar10_resnet56_afan.yaml``
sets; here on ResNet-20s, whose stage 1 ends at index 7.
"""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afan_harness.config import load_config
from Classification.config import AfanConfig, TrainConfig
from Classification.models import create_model
from Classification.steps import afan_step

RELEASED_RUN = Path(__file__).resolve().parents[1] / "Classification" / "configs" / "cifar10_resnet56_afan.yaml"
BLOCKS = 3  # ResNet-20s: three blocks per stage
SPLIT = 4 + BLOCKS  # the release's index after stage 1 (normalize, conv, BN, ReLU, blocks)


@pytest.fixture(autouse=True)
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def release_layout(model) -> nn.Sequential:
    """The project's modules in the release's order (``resnet_s.py``'s ``sequential_model``)."""
    return nn.Sequential(model.normalize, *model.stem, *model.layer1, *model.layer2, *model.layer3,
                         model.pool, nn.Flatten(), model.fc)


def mix_by_hand(clean, adv):
    """Clean content with the adversarial statistics across channels at every position:
    unbiased variance (sum / (C - 1)) plus 1e-5 under the square root."""
    c = clean.shape[1]

    def moments(t):
        mean = t.sum(dim=1, keepdim=True) / c
        return mean, torch.sqrt(((t - mean) ** 2).sum(dim=1, keepdim=True) / (c - 1) + 1e-5)

    (cm, cs), (am, as_) = moments(clean), moments(adv)
    return (clean - cm) / cs * as_ + am


def release_step(model, x, y, *, steps, gamma, n=1, mask="0", from_attached=False):
    """The release's step (see the module docstring); ``n``/``mask``/``from_attached`` are the
    project's extension: ``n`` strengths ``h + (i/n)(h_adv - h)``, those marked ``1`` mixed,
    built from the detached feature (the release's choice) or the attached one. Returns the
    loss, the perturbation (adversarial minus clean feature) and the head BN buffers right
    after the feature pass."""
    seq = release_layout(model)
    head, tail = seq[:SPLIT], seq[SPLIT:]
    attached = head(x)
    feature = attached.detach()
    after_head = {k: v.clone() for k, v in seq[:SPLIT].state_dict().items()}
    adv = feature.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(tail(adv), y), adv)
        adv = adv.detach() + gamma / 255 * grad.sign()
    base = attached if from_attached else feature
    strengths = [base + (i / n) * (adv - base) for i in range(1, n + 1)]
    strengths = [mix_by_hand(base, f) if m == "1" else f for m, f in zip(mask, strengths)]
    adv_loss = sum(F.cross_entropy(tail(f), y) for f in strengths) / n
    clean_loss = F.cross_entropy(seq(x), y)  # the release's clean pass: the whole network again
    loss = (adv_loss + clean_loss) / 2
    loss.backward()
    return loss.detach(), adv - feature, after_head


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def setup(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", 10).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    return model, copy.deepcopy(model), x, y


def compare(ours, theirs, result, release_loss, release_perturbation, after_head):
    assert relative_error(result.loss.detach(), release_loss) < 1e-8
    assert relative_error(result.perturbation, release_perturbation) < 1e-12
    for name, p in ours.named_parameters():
        q = theirs.get_parameter(name)
        assert p.grad is not None and q.grad is not None, name
        assert relative_error(p.grad, q.grad) < 1e-8, name
    # Running statistics: the tail's match the release's (same passes, same order); the
    # head's match the release's after its first head pass. The release then updates them a
    # second time, with the same batch, in its clean full pass; the project reuses the feature.
    release_head = release_layout(theirs)[:SPLIT]
    ours_head = release_layout(ours)[:SPLIT]
    for key, value in ours_head.state_dict().items():
        assert relative_error(value.double(), after_head[key].double()) < 1e-12, key
        if key.endswith("num_batches_tracked"):
            assert release_head.state_dict()[key] == value + 1
    for key, value in release_layout(ours)[SPLIT:].state_dict().items():
        assert relative_error(value.double(), release_layout(theirs)[SPLIT:].state_dict()[key].double()) < 1e-12, key


def test_the_released_run_sets_what_this_test_checks():
    cfg = load_config(TrainConfig, RELEASED_RUN)
    a = cfg.afan
    assert (cfg.mode, cfg.model, a.layer, a.steps, a.gamma) == ("afan", "resnet56", "layer1", 5, 0.5)
    assert (a.random_start, a.project, a.n, a.mask, a.aux_bn) == (False, False, 1, "0", False)
    assert (a.attack_bn_stats, a.se_trains_head) == ("update", False)
    assert len(create_model("resnet56", 10).layer1) + 4 == 13  # the release's --perturb_idx


def test_one_step_equals_the_release_step_in_float64():
    ours, theirs, x, y = setup()
    cfg = AfanConfig(layer="layer1", steps=5, gamma=0.5)
    result = afan_step(ours, x, y, cfg)
    result.loss.backward()
    release = release_step(theirs, x, y, steps=5, gamma=0.5)
    assert result.loss.dtype == torch.float64
    compare(ours, theirs, result, *release)
    # The attack moved the feature: 5 sign steps of 0.5/255 where the gradient is non-zero.
    assert result.perturbation.abs().max().item() == pytest.approx(5 * 0.5 / 255, rel=1e-12)


@pytest.mark.parametrize("se_trains_head", [False, True])
def test_two_strengths_with_a_mask_equal_the_restated_step(se_trains_head):
    """The project's extension of the step (n = 2, mask 01): by default the strengths come
    from the detached feature, as the release builds them in detection and segmentation;
    se_trains_head=True keeps it attached."""
    ours, theirs, x, y = setup(seed=3)
    cfg = AfanConfig(layer="layer1", steps=5, gamma=0.5, n=2, mask="01", se_trains_head=se_trains_head)
    result = afan_step(ours, x, y, cfg)
    result.loss.backward()
    release = release_step(theirs, x, y, steps=5, gamma=0.5, n=2, mask="01", from_attached=se_trains_head)
    compare(ours, theirs, result, *release)
