"""feature_pgd and interpolate against independent computations and their guarantees."""
import pytest
import torch
import torch.nn.functional as F

import afan


def _loss_fn(net, y):
    return lambda f: F.cross_entropy(net.tail(f), y)


def _grad_by_hand(net, h, y):
    h = h.detach().clone().requires_grad_(True)
    F.cross_entropy(net.tail(h), y).backward()
    return h.grad


def test_one_linf_step_equals_sign_gradient_step(tiny_net, batch):
    x, y = batch
    h = tiny_net.head(x)
    with afan.frozen_bn_stats(tiny_net):
        expected = h.detach() + 0.1 * _grad_by_hand(tiny_net, h, y).sign()
        tiny_net.zero_grad(set_to_none=True)
        adv = afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=1, step_size=0.1)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_one_l2_step_moves_along_the_unit_gradient_of_each_sample(tiny_net, batch):
    x, y = batch
    h = tiny_net.head(x)
    with afan.frozen_bn_stats(tiny_net):
        g = _grad_by_hand(tiny_net, h, y)
        adv = afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=1, step_size=0.5, norm="2")
    unit = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(adv, h.detach() + 0.5 * unit, rtol=0, atol=1e-6)
    step_norms = (adv - h).flatten(1).norm(dim=1)
    torch.testing.assert_close(step_norms, torch.full_like(step_norms, 0.5))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_projection_keeps_every_iterate_inside_the_ball(tiny_net, batch, norm):
    x, y = batch
    h = tiny_net.head(x).detach()
    eps, seen = 0.05, []

    def loss_fn(f):
        seen.append(f.detach().clone())
        return F.cross_entropy(tiny_net.tail(f), y)

    with afan.frozen_bn_stats(tiny_net):
        adv = afan.feature_pgd(h, loss_fn, steps=6, step_size=0.03, eps=eps, norm=norm,
                               random_start=True, project=True)
    assert len(seen) == 6
    for f in seen + [adv]:
        d = (f - h).flatten(1)
        size = d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)
        assert (size <= eps + 1e-6).all()
    # Without projection the same settings leave the ball (the bound is the projection's doing).
    free = afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=6, step_size=0.03, norm=norm)
    d = (free - h).flatten(1)
    assert (d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)).max() > eps


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_random_start_stays_within_eps(norm):
    torch.manual_seed(0)
    h = torch.randn(16, 4, 5, 5)
    start = afan.feature_pgd(h, lambda f: f.sum(), steps=0, step_size=0.0, eps=0.2,
                             norm=norm, random_start=True)
    d = (start - h).flatten(1)
    size = d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)
    assert (size <= 0.2 + 1e-6).all() and (size > 0).all()


def test_parameter_gradients_and_bn_stats_are_untouched(tiny_net, batch):
    x, y = batch
    h = tiny_net.head(x)
    for p in tiny_net.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in tiny_net.named_parameters()}
    buffers = {n: b.clone() for n, b in tiny_net.named_buffers()}
    with afan.frozen_bn_stats(tiny_net):
        afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=3, step_size=0.01)
    for n, p in tiny_net.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for n, b in tiny_net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # The clean feature's graph is still usable afterwards.
    F.cross_entropy(tiny_net.tail(h), y).backward()


def test_attack_raises_the_loss(tiny_net, batch):
    x, y = batch
    h = tiny_net.head(x).detach()
    loss = _loss_fn(tiny_net, y)
    with afan.frozen_bn_stats(tiny_net):
        adv = afan.feature_pgd(h, loss, steps=5, step_size=0.02)
        assert loss(adv) > loss(h)


def test_runs_inside_no_grad(tiny_net, batch):
    x, y = batch
    with torch.no_grad(), afan.frozen_bn_stats(tiny_net):
        h = tiny_net.head(x)
        adv = afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=2, step_size=0.01)
    assert (adv - h).abs().max() > 0


def test_bfloat16_autocast_matches_float32(tiny_net, batch):
    x, y = batch
    tiny_net.eval()  # fixed statistics, so both precisions attack the same function
    h = tiny_net.head(x).detach()
    step = 0.5 / 255
    ref = afan.feature_pgd(h, _loss_fn(tiny_net, y), steps=3, step_size=step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = h.to(torch.bfloat16)
        adv = afan.feature_pgd(h16, _loss_fn(tiny_net, y), steps=3, step_size=step)
    # The perturbation is kept in float32: a 0.002 step survives on a bfloat16 feature.
    assert adv.dtype == torch.float32
    assert (adv - h16.float()).abs().max() == pytest.approx(3 * step, rel=1e-5)
    rel = (adv - ref).norm() / ref.norm()
    assert rel < 1e-2
    loss_ref, loss16 = _loss_fn(tiny_net, y)(ref), _loss_fn(tiny_net, y)(adv)
    assert abs(loss16 - loss_ref) / loss_ref < 1e-2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=-1, step_size=0.1), "steps must be a non-negative integer"),
        (dict(steps=1.5, step_size=0.1), "steps must be a non-negative integer"),
        (dict(steps=1, step_size=-0.1), "step_size must be a non-negative number"),
        (dict(steps=1, step_size=0.1, norm="l1"), "norm must be one of"),
        (dict(steps=1, step_size=0.1, project=True), "pass eps="),
        (dict(steps=1, step_size=0.1, random_start=True), "pass eps="),
        (dict(steps=1, step_size=0.1, eps=-2.0), "eps must be a non-negative number"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        afan.feature_pgd(torch.zeros(2, 3), lambda f: f.sum(), **kwargs)


def test_loss_that_ignores_the_feature_is_reported():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on the feature"):
        afan.feature_pgd(torch.zeros(2, 3), lambda f: (w * 2).sum(), steps=1, step_size=0.1)


def test_interpolate_gives_the_fractions_and_ends_at_adv():
    clean, adv = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    feats = afan.interpolate(clean, adv, 4)
    assert len(feats) == 4
    for i, f in enumerate(feats, start=1):
        torch.testing.assert_close(f, clean + (i / 4) * (adv - clean))
    assert torch.equal(feats[-1], adv)


def test_interpolate_keeps_the_clean_feature_differentiable():
    clean = torch.randn(2, 3, requires_grad=True)
    feats = afan.interpolate(clean, torch.randn(2, 3), 2)
    (feats[0].sum() + feats[1].sum()).backward()
    torch.testing.assert_close(clean.grad, torch.full_like(clean, 0.5))  # (1 - 1/2) + (1 - 1)


def test_interpolate_rejects_bad_n_and_shapes():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        afan.interpolate(torch.zeros(1), torch.zeros(1), 0)
    with pytest.raises(ValueError, match="same shape"):
        afan.interpolate(torch.zeros(1, 2), torch.zeros(2, 1), 1)


def test_bounds_keep_pixel_pgd_in_the_image_range(tiny_net, batch):
    x, y = batch
    loss = lambda images: F.cross_entropy(tiny_net(images), y)  # noqa: E731
    with afan.frozen_bn_stats(tiny_net):
        adv = afan.feature_pgd(x, loss, steps=4, step_size=0.3, eps=0.5, random_start=True,
                               project=True, bounds=(0.0, 1.0))
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (adv - x).abs().max() <= 0.5 + 1e-6
    assert (adv - x).abs().max() > 0.2
    with pytest.raises(ValueError, match="bounds must be"):
        afan.feature_pgd(x, loss, steps=1, step_size=0.1, bounds=(1.0, 0.0))
