"""The engine against references: autograd, torch's BatchNorm, a naive float64 model, formulas."""

import copy
import dataclasses
import itertools

import pytest
import torch
from reference import NaiveNorm
from torch import nn
from torch.testing import assert_close

import mabn

F64 = torch.float64


def _fields(config):
    """The keywords of a NormConfig that the naive reference takes."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "accumulate"}


def _randomize_affine(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.rand_like(layer.weight) + 0.5)
        layer.bias.copy_(torch.randn_like(layer.bias))


@pytest.mark.parametrize("norm_batch_size", [None, 2, 1])
@pytest.mark.parametrize("forward_stats", ["batch", "sma"])
def test_gradcheck_uncentered_window_one(forward_stats, norm_batch_size):
    # With m = 1 and r = 1 the estimator is the exact gradient of gamma * x / sqrt(E[x^2] + eps) + beta.
    layer = mabn.GeneralBatchNorm2d(
        3,
        centered=False,
        forward_stats=forward_stats,
        renorm=False,
        backward_stats=forward_stats,
        window=1,
        warmup_iters=0,
        norm_batch_size=norm_batch_size,
        dtype=F64,
    )
    _randomize_affine(layer)
    x = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: mabn.stream_norm(x, w, b, layer.state(), layer.config, True), (x, layer.weight, layer.bias)
    )


def test_gradcheck_mabn_window_one_before_renorm():
    layer = mabn.MABN2d(3, window=1, norm_batch_size=2, warmup_iters=0, renorm_warmup_iters=10**9, dtype=F64)
    _randomize_affine(layer)
    x = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


@pytest.mark.parametrize("norm_batch_size", [None, 2])
def test_gradcheck_centered_batch(norm_batch_size):
    layer = mabn.GhostBatchNorm2d(3, norm_batch_size=norm_batch_size, dtype=F64)
    _randomize_affine(layer)
    x = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: mabn.stream_norm(x, w, b, layer.state(), layer.config, True), (x, layer.weight, layer.bias)
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ghost_bn_whole_batch_is_torch_batchnorm(dims, dtype):
    shapes = {1: (8, 5, 7), 2: (8, 5, 6, 6), 3: (8, 5, 3, 4, 4)}
    ours = getattr(mabn, f"GhostBatchNorm{dims}d")(5, dtype=dtype)
    ref = getattr(nn, f"BatchNorm{dims}d")(5, dtype=dtype)
    _randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    tol = {} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    for _ in range(6):
        x = torch.randn(*shapes[dims], dtype=dtype) * 3 + 1
        dy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, **tol)
        assert_close(xa.grad, xb.grad, **tol)
        assert_close(ours.weight.grad, ref.weight.grad, **tol)
        assert_close(ours.bias.grad, ref.bias.grad, **tol)
        opt_ours.step()
        opt_ref.step()
        opt_ours.zero_grad()
        opt_ref.zero_grad()
    for name, value in ref.state_dict().items():
        assert_close(ours.state_dict()[name], value, **tol)
    ours.eval()
    ref.eval()
    x = torch.randn(*shapes[dims], dtype=dtype)
    assert_close(ours(x), ref(x), **tol)


def test_ghost_bn_groups_are_torch_batchnorm_per_group():
    ours = mabn.GhostBatchNorm2d(4, norm_batch_size=2, dtype=F64)
    _randomize_affine(ours)
    x = torch.randn(6, 4, 5, 5, dtype=F64, requires_grad=True)
    dy = torch.randn_like(x)
    y = ours(x)
    y.backward(dy)
    per_group_stats = []
    weight_grad = bias_grad = None
    for g in range(3):
        ref = nn.BatchNorm2d(4, dtype=F64)
        ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k in ref.state_dict()}, strict=False)
        ref.running_mean.zero_()
        ref.running_var.fill_(1)
        xg = x.detach()[2 * g : 2 * g + 2].clone().requires_grad_()
        yg = ref(xg)
        yg.backward(dy[2 * g : 2 * g + 2])
        assert_close(y[2 * g : 2 * g + 2], yg)
        assert_close(x.grad[2 * g : 2 * g + 2], xg.grad)
        per_group_stats.append((ref.running_mean, ref.running_var))
        weight_grad = weight_grad + ref.weight.grad if g else ref.weight.grad
        bias_grad = bias_grad + ref.bias.grad if g else ref.bias.grad
    assert_close(ours.weight.grad, weight_grad)
    assert_close(ours.bias.grad, bias_grad)
    # Once per call with the mean over the groups: (1 - m) * 1 + m * mean(var_g) etc.
    assert_close(ours.running_mean, sum(s[0] for s in per_group_stats) / 3)
    assert_close(ours.running_var, sum(s[1] for s in per_group_stats) / 3)


COMBOS = list(itertools.product([False, True], ["batch", "sma"], [False, True], ["batch", "sma"]))


@pytest.mark.parametrize("centered,forward_stats,renorm,backward_stats", COMBOS)
def test_family_matches_naive_reference(centered, forward_stats, renorm, backward_stats):
    # m > 1, B < N, 40 calls crossing the warm-up (5) and renorm warm-up (12), r and d clipping.
    kw = dict(
        centered=centered,
        forward_stats=forward_stats,
        renorm=renorm,
        backward_stats=backward_stats,
        norm_batch_size=2,
        window=4,
        warmup_iters=5,
        renorm_warmup_iters=12,
        r_max=1.5,
        d_max=0.5,
        momentum=0.1,
    )
    layer = mabn.GeneralBatchNorm2d(3, **kw, dtype=F64)
    _randomize_affine(layer)
    ref = NaiveNorm(3, **kw)
    clipped = 0
    for step in range(40):
        x = (torch.randn(6, 3, 4, 4, dtype=F64) * (0.3 + (step % 7) * 0.4) + 0.02 * step).requires_grad_()
        dy = torch.randn_like(x)
        y = layer(x)
        y.backward(dy)
        y_ref, saved = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach())
        dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, saved, layer.weight.detach())
        assert_close(y, y_ref)
        assert_close(x.grad, dx_ref)
        assert_close(layer.weight.grad, dgamma_ref)
        assert_close(layer.bias.grad, dbeta_ref)
        assert_close(layer.running_var, ref.running_var)
        if centered:
            assert_close(layer.running_mean, ref.running_mean)
        layer.zero_grad()
        if renorm and step + 1 > 12:  # r (and d) actually clipped at some step: the bounds are exercised
            r = torch.stack([s[2] for s in saved])
            clipped += int(((r - 1.5).abs() < 1e-12).any() or ((r - 1 / 1.5).abs() < 1e-12).any())
    assert clipped > 0 or not renorm


def test_mabn_module_matches_naive_reference():
    layer = mabn.MABN2d(3, norm_batch_size=2, window=4, warmup_iters=5, renorm_warmup_iters=12, r_max=1.5, dtype=F64)
    _randomize_affine(layer)
    ref = NaiveNorm(
        3,
        **_fields(mabn.PRESETS["mabn"])
        | dict(norm_batch_size=2, window=4, warmup_iters=5, renorm_warmup_iters=12, r_max=1.5),
    )
    for step in range(40):
        x = (torch.randn(4, 3, 5, 5, dtype=F64) * (0.5 + (step % 5) * 0.5)).requires_grad_()
        dy = torch.randn_like(x)
        layer(x).backward(dy)
        _, saved = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach())
        dx_ref, _, _ = ref.backward(dy, saved, layer.weight.detach())
        assert_close(x.grad, dx_ref)
        assert_close(layer.running_var, ref.running_var)


def test_batch_renorm_equals_its_formula():
    layer = mabn.BatchRenorm2d(3, r_max=1.2, d_max=0.3, renorm_warmup_iters=2, dtype=F64)
    _randomize_affine(layer)
    running_mean = torch.zeros(3, dtype=F64)
    running_var = torch.ones(3, dtype=F64)
    saw_clipping = False
    for step in range(6):
        x = torch.randn(4, 3, 5, 5, dtype=F64) * (1 + step) + step
        dy = torch.randn_like(x)
        xa = x.clone().requires_grad_()
        ya = layer(xa)
        ya.backward(dy)

        xb = x.clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        mu = xb.mean((0, 2, 3))
        var = xb.var((0, 2, 3), unbiased=False)
        sigma = torch.sqrt(var + layer.eps)
        running_sigma = torch.sqrt(running_var + layer.eps)
        if step + 1 > 2:
            r_raw = (sigma / running_sigma).detach()
            d_raw = ((mu - running_mean) / running_sigma).detach()
            r, d = r_raw.clamp(1 / 1.2, 1.2), d_raw.clamp(-0.3, 0.3)
            saw_clipping |= bool((r != r_raw).any() and (d != d_raw).any())
        else:
            r, d = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        yb = v(w) * ((xb - v(mu)) / v(sigma) * v(r) + v(d)) + v(b)
        yb.backward(dy)
        assert_close(ya, yb)
        assert_close(xa.grad, xb.grad)
        assert_close(layer.weight.grad, w.grad)
        assert_close(layer.bias.grad, b.grad)
        n = x.numel() / 3
        running_mean = 0.9 * running_mean + 0.1 * mu.detach()
        running_var = 0.9 * running_var + 0.1 * var.detach() * n / (n - 1)
        assert_close(layer.running_mean, running_mean)
        assert_close(layer.running_var, running_var)
        layer.zero_grad()
    assert saw_clipping


@pytest.mark.parametrize("cls", [mabn.MABN2d, mabn.BatchRenorm2d, mabn.GhostBatchNorm2d])
def test_state_dict_resume_is_bit_identical(cls):
    kwargs = dict(norm_batch_size=2)
    if cls is mabn.MABN2d:
        kwargs.update(window=4, warmup_iters=3, renorm_warmup_iters=6)
    if cls is mabn.BatchRenorm2d:
        kwargs.update(renorm_warmup_iters=6)
    inputs = [torch.randn(4, 3, 4, 4) * (1 + i % 3) for i in range(16)]
    grads = [torch.randn(4, 3, 4, 4) for _ in range(16)]

    def run(layer, opt, steps):
        outs = []
        for x, dy in steps:
            x = x.clone().requires_grad_()
            y = layer(x)
            y.backward(dy)
            opt.step()
            opt.zero_grad()
            outs.append((y.detach(), x.grad))
        return outs

    full = cls(3, **kwargs)
    opt = torch.optim.SGD(full.parameters(), lr=0.05, momentum=0.9)
    reference = run(full, opt, zip(inputs, grads))

    first = cls(3, **kwargs)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    run(first, opt1, zip(inputs[:8], grads[:8]))
    second = cls(3, **kwargs)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    opt2 = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    resumed = run(second, opt2, zip(inputs[8:], grads[8:]))
    for (ya, ga), (yb, gb) in zip(reference[8:], resumed):
        assert torch.equal(ya, yb) and torch.equal(ga, gb)
    for name, value in full.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
