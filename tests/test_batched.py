"""afan.batch_strengths: one tail pass over the strengths joined gives the per-strength passes'
losses and gradients (float64) where every layer treats samples on its own, and refuses, naming
the layer, where one does not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import afan


def conv_net(norm) -> nn.Sequential:
    """conv-norm-ReLU twice, pooled, and a linear; ``norm(channels)`` makes the norm layers."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def eval_bn(channels):
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


def frozen_bn(channels):
    bn = FrozenBatchNorm2d(channels)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    return bn


class TokenNet(nn.Module):
    """Tokens [B, N, C]: a linear, LayerNorm and GELU per token, pooled over the tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.block(self.embed(x)).mean(1))


class SkipNet(nn.Module):
    """A tail that also reads the input (a skip from it), so ``split`` gives ``tail(h, x)``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.skip = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc((self.body(self.stem(x)) + self.skip(x)).mean((2, 3)))


def strengths_of(model, head, x, n=3, mask="011", dim=1):
    """``n`` strengths from the clean feature (kept attached, so gradients reach the head too)
    and an adversarial one, mixed by ``mask`` as A-FAN does."""
    h = head(x)
    h_adv = h.detach() + 0.3 * torch.randn_like(h)
    return [afan.mixed_strength(h, h_adv, i, mask, dim=dim) for i in range(1, n + 1)]


def losses_and_grads(model, losses):
    total = torch.stack(losses).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack(losses).detach(), torch.autograd.grad(total, params)


CONV_CASES = {
    "groupnorm": lambda: conv_net(lambda c: nn.GroupNorm(2, c)),
    "eval_bn": lambda: conv_net(eval_bn),
    "frozen_bn": lambda: conv_net(frozen_bn),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_one_joined_pass_gives_the_per_strength_losses_and_gradients(case):
    torch.manual_seed(0)
    model = CONV_CASES[case]().double().train()
    if case == "eval_bn":
        model.eval()  # its BatchNorms read the running statistics
    head, tail = model[:3], model[3:]
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (4,))
    torch.manual_seed(1)  # the same adversarial feature for both
    batched = afan.batch_strengths(tail, strengths_of(model, head, x), F.cross_entropy, y)
    torch.manual_seed(1)
    per_strength = [F.cross_entropy(tail(f), y) for f in strengths_of(model, head, x)]
    (want, want_grads), (got, got_grads) = losses_and_grads(model, per_strength), losses_and_grads(model, batched)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_layer_norm_tokens_with_a_summed_criterion():
    """Token features [B, N, C] mixed over the channels, and a criterion that sums: the output
    is split per strength, so each strength's sum is its own."""
    torch.manual_seed(0)
    model = TokenNet().double()
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 4, (3,))

    def feats():
        torch.manual_seed(1)  # the same adversarial feature for both
        return strengths_of(model, model.embed, x, n=2, mask="01", dim=-1)

    def tail(h):
        return model.out(model.block(h).mean(1))

    def criterion(logits, target):
        return F.cross_entropy(logits, target, reduction="sum")

    want = losses_and_grads(model, [criterion(tail(f), y) for f in feats()])
    got = losses_and_grads(model, afan.batch_strengths(tail, feats(), criterion, y))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_split_tail_that_reads_the_input_gets_it_once_per_strength_inside_backward_each():
    """With afan.split's ``tail(h, x)`` and through afan.backward_each, as A-FAN's step runs
    its strengths: the same total and gradients (towards the clean feature too)."""
    torch.manual_seed(0)
    model = SkipNet().double()
    head, tail = afan.split(model, "stem")
    assert tail.needs_input
    x, y = torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (2,))
    h_adv = head(x).detach() + 0.3 * torch.randn(2, 8, 6, 6, dtype=torch.float64)

    def strength_loss(i):
        return lambda clean: F.cross_entropy(tail(afan.mixed_strength(clean, h_adv, i, "01"), x), y)

    def joined(clean):
        feats = [afan.mixed_strength(clean, h_adv, i, "01") for i in (1, 2)]
        return torch.stack(afan.batch_strengths(tail, feats, F.cross_entropy, y, x, model=model)).sum()

    results = []
    for passes in ([strength_loss(1), strength_loss(2)], [joined]):
        h = head(x)
        total, _ = afan.backward_each([h], passes, model.parameters())
        results.append((total.detach(), torch.autograd.grad(total, [h, *model.parameters()])))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_training_mode_batch_norm_is_refused_by_name_before_it_runs():
    torch.manual_seed(0)
    model = conv_net(nn.BatchNorm2d).train()
    head, tail = model[:3], model[3:]
    x, y = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2,))
    before = model[4].running_mean.clone()
    with pytest.raises(ValueError, match=r"'4' \(BatchNorm2d\) normalises with the statistics of its batch.*"
                                         r"one pass per strength.*FrozenBatchNorm2d"):
        afan.batch_strengths(tail, strengths_of(model, head, x), F.cross_entropy, y, model=model)
    assert torch.equal(model[4].running_mean, before) and model[4].num_batches_tracked == 0
    with afan.frozen_bn_stats(model), pytest.raises(ValueError, match="statistics of its batch"):
        afan.batch_strengths(tail, strengths_of(model, head, x), F.cross_entropy, y, model=model)


def test_auxiliary_layers_are_refused_where_their_batch_matters():
    torch.manual_seed(0)
    model = afan.convert_aux_bn(conv_net(nn.BatchNorm2d), after="2").train()
    head, tail = model[:3], model[3:]
    x, y = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2,))
    with afan.use_aux_bn(model), pytest.raises(ValueError, match=r"'4' \(AuxBatchNorm2d\)"):
        afan.batch_strengths(tail, strengths_of(model, head, x), F.cross_entropy, y, model=model)
    norm_model = afan.convert_aux_norm(conv_net(lambda c: nn.GroupNorm(2, c)), after="2").train()
    head, tail = norm_model[:3], norm_model[3:]
    with afan.use_aux_bn(norm_model):  # auxiliary GroupNorm: still per sample
        afan.batch_strengths(tail, strengths_of(norm_model, head, x), F.cross_entropy, y, model=norm_model)
    with afan.use_aux_bn(norm_model, split=2), pytest.raises(ValueError, match=r"cuts its batch into 2 chunks"):
        afan.batch_strengths(tail, strengths_of(norm_model, head, x), F.cross_entropy, y, model=norm_model)


def test_outputs_that_cannot_be_split_per_strength_are_refused():
    feats = [torch.randn(2, 3), torch.randn(2, 3)]
    with pytest.raises(ValueError, match="keep the samples along dim 0"):
        afan.batch_strengths(lambda h: h.sum(), feats, lambda out, t: out, None)
    with pytest.raises(ValueError, match="one shape"):
        afan.batch_strengths(lambda h: h, [torch.randn(2, 3), torch.randn(3, 3)], lambda out, t: out.sum(), None)
    parts = afan.batch_strengths(lambda h: {"a": h, "b": (h * 2, h * 3)}, feats, lambda out, t: out, None)
    assert torch.equal(parts[1]["b"][1], feats[1] * 3) and torch.equal(parts[0]["a"], feats[0])


AFAN_CASES = {
    "groupnorm": (lambda: conv_net(lambda c: nn.GroupNorm(2, c)), "2", {}),
    "eval_bn": (lambda: conv_net(eval_bn).eval(), "2", {}),
    "frozen_bn": (lambda: conv_net(frozen_bn), "2", {}),
    "tokens": (TokenNet, "embed", {"mix_dim": -1}),
    "skip_tail": (SkipNet, "stem", {}),
}


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("case", sorted(AFAN_CASES))
def test_afan_batched_gives_the_per_strength_step(case, train_head):
    """``afan.AFAN(batched=True)``: the same loss, loss terms and parameter gradients (float64)
    as one tail pass per strength, the adversarial feature found the same way."""
    build, at, options = AFAN_CASES[case]
    x = torch.rand(3, 5, 6, dtype=torch.float64) if case == "tokens" else torch.rand(3, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    results = []
    for batched in (False, True):
        torch.manual_seed(0)
        model = build().double()
        objective = afan.AFAN(model, at, steps=2, step_size=0.05, n=3, mask="011", strengths_train_head=train_head,
                              batched=batched, **options)
        step = objective.step(x, y, F.cross_entropy)
        grads = torch.autograd.grad(step.loss, list(model.parameters()))
        results.append((step, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.perturbation, want.perturbation, rtol=0, atol=0)
    assert list(got.losses) == list(want.losses) == ["loss_clean", "loss_1", "loss_2", "loss_3"]
    for key in want.losses:
        torch.testing.assert_close(got.losses[key], want.losses[key], rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_afan_batched_refuses_a_tail_that_normalises_with_its_batch():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2,))
    trainable = afan.AFAN(conv_net(nn.BatchNorm2d).train(), "2", n=2, mask="01", batched=True)
    with pytest.raises(ValueError, match=r"'4' \(BatchNorm2d\) normalises with the statistics of its batch"):
        trainable.loss(x, y, F.cross_entropy)
    auxiliary = afan.AFAN(conv_net(nn.BatchNorm2d).train(), "2", n=2, mask="01", aux_norm=True, batched=True)
    with pytest.raises(ValueError, match=r"'4' \(AuxBatchNorm2d\)"):
        auxiliary.loss(x, y, F.cross_entropy)
