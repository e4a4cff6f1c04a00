"""``afan.AFAN`` and ``afan.AdvProp``, the one-call objectives, against steps written out by
hand in float64 (every pass kept in one graph, one backward), plus DDP, autocast, token
features with auxiliary LayerNorm, and ``import afan`` needing only torch."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import afan


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),  # head: 0..2
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))


def stats(model):
    return [b.clone() for name, b in model.named_buffers() if "running" in name]


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def by_hand_afan(model, x, y, *, steps, step_size, n, mask, freeze):
    """The A-FAN step written out: h = layers 0..2, sign-gradient ascent on h through the tail
    (BN statistics untouched when ``freeze``), strengths from the detached h, mixing with the
    unbiased variance across channels, one graph, one backward."""
    head, tail = model[:3], model[3:]
    h = head(x)
    bns = [m for m in tail if isinstance(m, nn.BatchNorm2d)]
    for bn in bns if freeze else []:
        bn.track_running_stats = False
    h_adv = h.detach()
    for _ in range(steps):
        h_adv = h_adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(tail(h_adv), y), h_adv)
        h_adv = (h_adv + step_size * grad.sign()).detach()
    for bn in bns:
        bn.track_running_stats = True
    clean = h.detach()
    losses = []
    for i in range(1, n + 1):
        feature = clean + i / n * (h_adv - clean)
        if mask[i - 1] == "1":
            mean_c, var_c = clean.mean(1, keepdim=True), clean.var(1, keepdim=True)
            mean_a, var_a = feature.mean(1, keepdim=True), feature.var(1, keepdim=True)
            feature = (clean - mean_c) / (var_c + 1e-5).sqrt() * (var_a + 1e-5).sqrt() + mean_a
        losses.append(F.cross_entropy(tail(feature), y))
    loss = (F.cross_entropy(tail(h), y) + sum(losses) / n) / 2
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "update"])
def test_afan_loss_equals_the_step_written_out(batch, freeze):
    x, y = batch
    model, reference = small_net(), small_net()
    objective = afan.AFAN(model, "2", steps=3, step_size=0.05, n=2, mask="01",
                          attack_norm_stats="frozen" if freeze else "update")
    loss = objective.loss(x, y, F.cross_entropy)
    loss.backward()
    expected = by_hand_afan(reference, x, y, steps=3, step_size=0.05, n=2, mask="01", freeze=freeze)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads(model), grads(reference)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    # BN statistics: the same updates in both (with "update", the attack's three passes more).
    for got, want in zip(stats(model), stats(reference)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("stats_mode, tail_updates", [("frozen", 2 + 1), ("update", 4 + 2 + 1)])
def test_attack_passes_update_statistics_only_when_asked(batch, stats_mode, tail_updates):
    x, y = batch
    model = small_net()
    afan.AFAN(model, "2", steps=4, n=2, mask="01", attack_norm_stats=stats_mode).loss(x, y, F.cross_entropy)
    # The head BN sees the one head pass; the tail BN the strengths and the clean pass, plus
    # the attack's four passes with "update".
    assert (model[1].num_batches_tracked.item(), model[4].num_batches_tracked.item()) == (1, tail_updates)


def test_afan_perturbation_stays_in_its_ball_and_the_step_reports_it(batch):
    x, y = batch
    result = afan.AFAN(small_net(), "2", steps=5, step_size=0.05, eps=0.08).step(x, y, F.cross_entropy)
    assert result.perturbation.abs().max() <= 0.08 + 1e-12 and result.perturbation.abs().max() > 0.05
    assert result.output.shape == (6, 4) and set(result.losses) == {"loss_clean", "loss_1"}


def by_hand_advprop(model, x, y, *, steps, step_size, eps):
    """AdvProp written out: PGD through the auxiliary BN with frozen statistics, inside [0, 1]
    and the eps-ball, then the clean pass (main BN) and the adversarial pass (auxiliary BN)."""
    x_adv = x.clone()
    with afan.frozen_bn_stats(model), afan.use_aux_bn(model):
        for _ in range(steps):
            x_adv = x_adv.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
            x_adv = torch.min(torch.max(x_adv + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1).detach()
    clean = F.cross_entropy(model(x), y)
    with afan.use_aux_bn(model):
        adversarial = F.cross_entropy(model(x_adv), y)
    loss = (clean + adversarial) / 2
    loss.backward()
    return loss.detach()


def test_advprop_loss_equals_the_step_written_out(batch):
    x, y = batch
    model, reference = afan.convert_aux_bn(small_net()), afan.convert_aux_bn(small_net())
    loss = afan.AdvProp(model, steps=2, step_size=2 / 255, eps=3 / 255, random_start=False).loss(x, y, F.cross_entropy)
    loss.backward()
    expected = by_hand_advprop(reference, x, y, steps=2, step_size=2 / 255, eps=3 / 255)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads(model), grads(reference)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    for got, want in zip(stats(model), stats(reference)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_advprop_needs_auxiliary_norms_and_takes_image_lists():
    with pytest.raises(ValueError, match="convert_aux_bn"):
        afan.AdvProp(small_net())
    torch.manual_seed(0)
    images = [torch.rand(3, 5, 7, dtype=torch.float64), torch.rand(3, 4, 4, dtype=torch.float64)]
    weights = torch.randn(3, dtype=torch.float64)
    loss = lambda ims: sum((im * weights[:, None, None]).sum() for im in ims)
    adv = afan.pixel_pgd(images, loss, steps=3, step_size=1 / 255, eps=2 / 255, random_start=False)
    for image, attacked in zip(images, adv):  # each image moved by the sign of its own gradient
        expected = (image + 2 / 255 * weights.sign()[:, None, None]).clamp(0, 1)
        assert attacked.shape == image.shape and torch.allclose(attacked, expected, atol=1e-15)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="name the split point"):
        afan.AFAN(small_net())
    with pytest.raises(ValueError, match="'01x'"):
        afan.AFAN(small_net(), "2", n=3, mask="01x")
    with pytest.raises(ValueError, match="attack_norm_stats='fixed'"):
        afan.AFAN(small_net(), "2", attack_norm_stats="fixed")


def test_afan_on_a_torchvision_classifier_trains_its_parameters():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    objective = afan.AFAN(model, "layer2", steps=2, n=2, mask="01")
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 5, (4,))
    objective.loss(x, y, F.cross_entropy).backward()
    optimizer.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # the head (clean pass)
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def test_token_features_with_auxiliary_layer_norm():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: no gradient would reach the norms
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="dim=-1"):  # [B, N, C]: mixing over dim 1 would mix tokens
        afan.AFAN(vit, "encoder.layers.encoder_layer_0", n=1, mask="1").loss(x, y, F.cross_entropy)
    objective = afan.AFAN(vit, "encoder.layers.encoder_layer_0", n=2, mask="01", mix_dim=-1, aux_norm=True)
    objective.loss(x, y, F.cross_entropy).backward()
    norm = vit.encoder.layers.encoder_layer_1.ln_1
    assert isinstance(norm, afan.AuxNorm)
    assert norm.weight.grad.abs().sum() > 0 and norm.aux_bn[0].weight.grad.abs().sum() > 0


def test_under_ddp_the_step_is_one_forward_with_the_same_gradients(batch, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    x, y = batch
    model, reference = small_net(), small_net()
    afan.AFAN(reference, "2", steps=2, n=2, mask="01").loss(x, y, F.cross_entropy).backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(afan.AFAN(model, "2", steps=2, n=2, mask="01"))
        wrapped(x, y, F.cross_entropy).backward()
    finally:
        dist.destroy_process_group()
    for got, want in zip(grads(model), grads(reference)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_under_bf16_autocast_the_loss_stays_close_to_float32(batch):
    x, y = batch
    model = small_net().float()
    full = afan.AFAN(copy.deepcopy(model), "2", steps=2, n=2, mask="01").loss(x.float(), y, F.cross_entropy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = afan.AFAN(model, "2", steps=2, n=2, mask="01").loss(x.float(), y, F.cross_entropy)
    half.backward()
    assert torch.isfinite(half) and abs(half.item() - full.item()) <= 0.02 * abs(full.item())


def test_import_afan_needs_only_torch():
    """With tqdm, yaml, matplotlib, timm and torchvision made unimportable (after torch, which
    imports some of them itself), ``import afan`` and its objectives still work."""
    code = """
import sys, torch
blocked = ("tqdm", "yaml", "matplotlib", "timm", "torchvision", "PIL", "numpy")
for name in list(sys.modules):
    if name.split(".")[0] in blocked:
        del sys.modules[name]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import afan
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
net(torch.rand(2, 3, 6, 6))
afan.AFAN(net, "1", steps=1).loss(torch.rand(2, 3, 6, 6), torch.tensor([0, 1]), torch.nn.functional.cross_entropy).backward()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
