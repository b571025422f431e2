"""Statistics across steps: gradient accumulation and activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import mabn

F64 = torch.float64
SCHEDULE = dict(window=4, warmup_iters=3, renorm_warmup_iters=5, r_max=1.5, d_max=0.5)


@pytest.mark.parametrize("preset", ["mabn", "bn", "brn", "bn_ema_sma", "uncentered_ema"])
@pytest.mark.parametrize(("micro", "k"), [(2, 4), (1, 3), (4, 2)])
def test_accumulated_micro_batches_are_the_stream_of_one_large_batch(preset, micro, k):
    # K calls of B samples with accumulate=K equal one call of K*B samples with norm_batch_size=B:
    # outputs, input gradients, accumulated affine gradients and every buffer, over the warm-ups.
    if micro == 1 and preset in ("bn", "brn", "bn_ema_sma"):
        micro = 2  # the centered form needs two values per channel... per sample it has 20: fine either way
    big = mabn.GeneralBatchNorm2d.from_preset(preset, 3, norm_batch_size=micro, **SCHEDULE, dtype=F64)
    with torch.no_grad():
        big.weight.uniform_(0.5, 1.5)
        big.bias.normal_()
    small = copy.deepcopy(big)
    small.accumulate = k
    for step in range(10):
        x = torch.randn(k * micro, 3, 5, 4, dtype=F64) * (1 + step % 3) + 0.2
        w = torch.randn_like(x)
        xa = x.clone().requires_grad_()
        ya = big(xa)
        (ya * w).sum().backward()
        xb = x.clone().requires_grad_()
        for i in range(k):
            part = slice(i * micro, (i + 1) * micro)
            yb = small(xb[part])
            assert_close(yb, ya[part].detach())
            (yb * w[part]).sum().backward()
        assert_close(xb.grad, xa.grad)
        assert_close(small.weight.grad, big.weight.grad)
        assert_close(small.bias.grad, big.bias.grad)
        for key, value in big.state_dict().items():
            assert_close(small.state_dict()[key], value, msg=f"step {step}: {key}")


def test_accumulate_is_validated_and_shown():
    with pytest.raises(ValueError, match="accumulate must be >= 1, got 0"):
        mabn.MABN2d(3, accumulate=0)
    layer = mabn.MABN2d(3, accumulate=4)
    assert "accumulate=4" in repr(layer) and "accum_sum" not in layer.state_dict()
    layer.accumulate = 1
    assert not hasattr(layer, "accum_sum")


def _net(norm: str = "mabn") -> nn.Sequential:
    torch.manual_seed(1)
    kw = dict(norm_batch_size=2, window=4, warmup_iters=3, renorm_warmup_iters=5) if norm == "mabn" else {}
    kw = {"norm_batch_size": 2, **kw}
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        mabn.create_norm_layer(norm, 6, **kw),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        mabn.create_norm_layer(norm, 6, **kw),
        nn.ReLU(),
    ).double()


class _Model(nn.Module):
    """A stem, a checkpointed block (or not) and a head."""

    def __init__(self, wrap):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1).double()
        self.block = _net()
        self.wrap = wrap

    def forward(self, x):
        x = self.stem(x)
        return self.wrap(self.block, x) if self.wrap is not None else self.block(x)


@pytest.mark.parametrize("norm", ["mabn", "brn", "bn"])
def test_checkpointed_segment_is_bit_identical_to_the_plain_one(norm):
    plain = _Model(None)
    plain.block = _net(norm)
    wrapped = copy.deepcopy(plain)
    wrapped.wrap = mabn.checkpoint
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    for step in range(25):  # past warm-up (3) and renorm warm-up (5)
        x = torch.randn(4, 3, 6, 6, dtype=F64) * (1 + step % 4)
        outs = []
        for model, opt in ((plain, opt_a), (wrapped, opt_b)):
            opt.zero_grad()
            y = model(x)
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1]), step
        for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
            assert torch.equal(a.grad, b.grad), (step, name)
        for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
            assert torch.equal(a, b), (step, name)
    assert int(wrapped.block[1].num_batches_tracked) == 25


def test_context_fn_works_with_torch_checkpoint_directly():
    plain = _net()
    wrapped = copy.deepcopy(plain)
    x = torch.randn(4, 3, 6, 6, dtype=F64, requires_grad=True)
    y = torch_checkpoint(wrapped, x, use_reentrant=False, context_fn=mabn.checkpoint_context)
    y.sum().backward()
    plain(x).sum().backward()
    assert torch.equal(wrapped[1].forward_window, plain[1].forward_window)
    assert int(wrapped[1].num_batches_tracked) == 1


def test_without_the_context_the_stream_advances_twice():
    # What the docs warn about: torch's checkpoint alone runs the forward twice.
    model = _net()
    x = torch.randn(4, 3, 6, 6, dtype=F64, requires_grad=True)
    torch_checkpoint(model, x, use_reentrant=False).sum().backward()
    assert int(model[1].num_batches_tracked) == 2 and int(model[1].forward_steps) == 4


def test_mabn_checkpoint_rejects_its_own_keywords():
    with pytest.raises(TypeError, match="sets use_reentrant itself"):
        mabn.checkpoint(_net(), torch.randn(2, 3, 4, 4, dtype=F64), use_reentrant=True)
