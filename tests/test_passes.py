"""afan.backward_each: the same sum and gradients as back-propagating the plain sum, each
pass's graph freed before the next, and the fp16 loss scale applied to the early gradients."""
import gc
import weakref

import torch
from torch import nn

import afan


class Parts(nn.Module):
    """A head giving two shared features, a tail reading both, and a layer no pass uses."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 6)
        self.tail = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)

    def shared(self, x):
        h = torch.tanh(self.head(x))
        return h, h[:, :3] * 2


def _passes(model, weights, kept=None):
    def one(w):
        def loss(h, low):
            out = model.tail(h * w) + low
            if kept is not None:
                kept.append(weakref.ref(out))
            return out.pow(2).mean()
        return loss
    return [one(w) for w in weights]


def test_sum_and_gradients_equal_the_plain_sum():
    torch.manual_seed(0)
    model, x, weights = Parts(), torch.randn(4, 5), [0.5, 1.0, 2.0]
    constant = torch.randn(4, 3)  # an input that needs no gradient
    total, values = afan.backward_each([*model.shared(x)], _passes(model, weights), model.parameters())
    (total * 3).backward()
    taken = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    plain = sum(loss(*model.shared(x)) for loss in _passes(model, weights))
    (plain * 3).backward()
    torch.testing.assert_close(total, plain)
    torch.testing.assert_close(torch.stack(values), torch.stack([loss(*model.shared(x)).detach()
                                                                 for loss in _passes(model, weights)]))
    assert set(taken) == {n for n, p in model.named_parameters() if p.grad is not None} == {
        "head.weight", "head.bias", "tail.weight", "tail.bias"}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(taken[name], p.grad)
    with_constant, _ = afan.backward_each([model.shared(x)[0], constant], _passes(model, weights), model.parameters())
    assert with_constant.requires_grad


def test_each_pass_graph_is_freed_before_the_next_and_no_grad_is_written():
    torch.manual_seed(0)
    model, kept = Parts(), []
    afan.backward_each([*model.shared(torch.randn(4, 5))], _passes(model, [1.0, 2.0], kept), model.parameters())
    gc.collect()
    assert len(kept) == 2 and all(ref() is None for ref in kept)
    assert all(p.grad is None for p in model.parameters())


def test_the_loss_scale_keeps_small_half_precision_gradients():
    weight = torch.ones(8, requires_grad=True)

    def tiny_loss():
        return (weight.half() * 1e-4).sum() * 1e-4  # gradient 1e-8: below float16's smallest number

    def gradient(scale):
        weight.grad = None
        with afan.loss_scale(scale):
            total, _ = afan.backward_each([], [tiny_loss], [weight])
        total.backward()
        return weight.grad

    assert torch.equal(gradient(1.0), torch.zeros(8))
    torch.testing.assert_close(gradient(2.0 ** 12), torch.full((8,), 1e-8), rtol=1e-3, atol=0)
    # Too large a scale overflows: the gradient is inf (the grad scaler skips that step and
    # lowers its scale), while the loss itself stays finite.
    with afan.loss_scale(2.0 ** 40):
        total, _ = afan.backward_each([], [lambda: (weight.half() * 1e3).sum()], [weight])
    weight.grad = None
    total.backward()
    assert torch.isfinite(total) and torch.isinf(weight.grad).all()
