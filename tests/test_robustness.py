"""Nothing poisons a layer: overflow, half precision, dtypes, repeated backward passes, bad input, bad state dicts.

Each test here failed on the version-1 layers; the statements they check are the ones the layer
docstrings make (see ``mabn.MABN2d``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import state_copy
from torch import nn
from torch.testing import assert_close

import mabn

DATA = Path(__file__).parent / "data"
PRESETS = ["mabn", "bn", "brn", "bn_ema_sma", "uncentered", "uncentered_ema"]


def _layer(preset: str, **kw) -> mabn.StreamNorm:
    kw = {"norm_batch_size": 2, "window": 4, "warmup_iters": 2, "renorm_warmup_iters": 3, **kw}
    return mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kw)


def _all_finite(layer: nn.Module) -> bool:
    return all(torch.isfinite(v).all() for v in layer.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("preset", PRESETS)
def test_one_large_half_precision_batch_does_not_poison_the_layer(preset):
    # RMS ~300: E[x^2] ~ 9e4 is beyond float16 (65504); the statistics live in float32.
    layer = _layer(preset, dtype=torch.float16)
    for i in range(12):
        scale = 300.0 if i == 5 else 1.0
        x = (torch.randn(4, 3, 6, 6) * scale).half().requires_grad_()
        y = layer(x)
        assert torch.isfinite(y).all(), i
        y.float().square().mean().backward()
        assert _all_finite(layer), i
    assert layer.running_var.dtype == torch.float32 and layer.weight.dtype == torch.float16
    assert torch.isfinite(layer.eval()(torch.randn(2, 3, 6, 6).half())).all()


@pytest.mark.parametrize("preset", ["mabn", "uncentered_ema", "bn_ema_sma"])
def test_sustained_huge_activations_keep_the_statistics_finite(preset):
    # Each E[x^2] (2.5e37) fits float32 but a window of 16 of them does not: averages are taken scaled.
    layer = _layer(preset, window=16, warmup_iters=1, renorm_warmup_iters=1)
    for _ in range(20):
        layer(torch.randn(4, 3, 4, 4) * 5e18).sum().backward()
        assert _all_finite(layer)
    for _ in range(20):
        y = layer(torch.randn(4, 3, 4, 4))
        y.sum().backward()
    assert _all_finite(layer) and torch.isfinite(y).all()
    assert torch.isfinite(layer.eval()(torch.randn(2, 3, 4, 4))).all()


def test_second_moment_whose_sum_of_squares_overflows_is_exact():
    # |x| ~ 1e18 on 4x3x16x16: the sum of squares over a channel (~1e39) overflows float32, E[x^2] does not.
    x = torch.randn(4, 3, 16, 16) * 1e18
    layer = mabn.MABN2d(3, warmup_iters=1)
    y = layer(x)
    expected = x.double() / (x.double().square().mean(dim=(0, 2, 3), keepdim=True) + 1e-5).sqrt()
    assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(layer.running_var).all() and int(layer.num_batches_tracked) == 1
    # torch's BatchNorm on the same batch: zeros out and an infinite running variance.
    bn = nn.BatchNorm2d(3)
    bn(x)
    assert not torch.isfinite(bn.running_var).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_statistics_beyond_the_dtype_give_nan_and_leave_the_buffers(preset):
    # E[x^2] ~ 1e44 cannot be represented in float32: the output says so (NaN), the buffers do not move.
    layer = _layer(preset)
    for _ in range(3):
        layer(torch.randn(4, 3, 4, 4)).sum().backward()
    before = state_copy(layer)
    x = (torch.randn(4, 3, 4, 4) * 1e22).requires_grad_()
    y = layer(x)
    assert torch.isnan(y).all()
    y.sum().backward()
    after = state_copy(layer)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("preset", ["mabn", "bn"])
def test_training_and_evaluation_take_the_same_dtypes(preset, layer_dtype, input_dtype):
    layer = _layer(preset, dtype=layer_dtype)
    x = torch.randn(4, 3, 4, 4).to(input_dtype).requires_grad_()
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == input_dtype and x.grad.dtype == input_dtype
    layer.eval()
    z = layer(torch.randn(4, 3, 4, 4).to(input_dtype))
    assert z.dtype == input_dtype and torch.isfinite(z).all()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("steps", [1, 6])
def test_two_backward_passes_equal_one_pass_of_the_summed_losses(preset, steps):
    # steps=1: in warm-up; steps=6: past the warm-ups, the moving averages are in use.
    one = _layer(preset, dtype=torch.float64)
    with torch.no_grad():
        one.weight.uniform_(0.5, 1.5)
    for _ in range(steps - 1):
        one(torch.randn(4, 3, 4, 4, dtype=torch.float64)).sum().backward()
    one.zero_grad(set_to_none=True)
    two = copy.deepcopy(one)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    w1, w2 = torch.randn_like(x), torch.randn_like(x)
    xa = x.clone().requires_grad_()
    ya = one(xa)
    ((ya * w1).sum() + (ya * w2).sum()).backward()
    xb = x.clone().requires_grad_()
    yb = two(xb)
    (yb * w1).sum().backward(retain_graph=True)
    (yb * w2).sum().backward()
    assert_close(xb.grad, xa.grad)
    assert_close(two.weight.grad, one.weight.grad)
    assert_close(two.bias.grad, one.bias.grad)
    for k, v in one.state_dict().items():
        assert_close(two.state_dict()[k], v, msg=k)


def test_non_tensor_input_is_a_type_error():
    layer = mabn.MABN2d(3)
    for bad in ([[1.0]], (torch.randn(2, 3, 4, 4),), 3.0):
        with pytest.raises(TypeError, match="MABN2d takes a Tensor, got"):
            layer(bad)
    with pytest.raises(TypeError, match="got ndarray"):
        layer(np.zeros((2, 3, 4, 4), dtype=np.float32))


def test_refused_state_dict_leaves_the_layer_as_it_was():
    layer = mabn.MABN2d(4)
    for _ in range(3):
        layer(torch.randn(4, 4, 3, 3)).sum().backward()
    before = state_copy(layer)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.fill_(7.0)
        bn.running_var.fill_(3.0)
    refused = "MABN2d: state dict refused, nothing loaded: missing .*; unexpected running_mean .*mabn.convert_model"
    with pytest.warns(UserWarning, match=refused), pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict(bn.state_dict())
    after = state_copy(layer)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # A wrong shape is refused the same way, before anything is copied.
    bad = {k: v.clone() for k, v in before.items()}
    bad["forward_window"] = torch.zeros(3, 1, 4)
    bad["weight"] = torch.full((4,), 9.0)
    with pytest.raises(RuntimeError, match="size mismatch forward_window"):
        layer.load_state_dict(bad)
    assert torch.equal(layer.weight, before["weight"])
    # A partial state dict: all of the layer's keys or none, strictly or not.
    with pytest.warns(UserWarning, match="missing .*bias"), pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"weight": torch.full((4,), 2.0)})
    assert torch.equal(layer.weight, before["weight"])
    with pytest.warns(UserWarning, match="nothing loaded: missing .*bias"):
        result = layer.load_state_dict({"weight": torch.full((4,), 2.0)}, strict=False)
    assert "bias" in result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, before["weight"])
    # A layer the state dict does not hold at all is reported missing, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = layer.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == sorted(before)


def test_version_1_state_dicts_load_into_the_current_layers():
    frozen = torch.load(DATA / "layers_v1.pt", weights_only=True)
    builders = {
        "mabn2d": lambda: mabn.MABN2d(4, norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=3),
        "mabn2d_half": lambda: mabn.MABN2d(
            4, norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=3, dtype=torch.float16
        ),
        "ghost2d": lambda: mabn.GhostBatchNorm2d(4, norm_batch_size=2),
        "brn2d": lambda: mabn.BatchRenorm2d(4, norm_batch_size=2, renorm_warmup_iters=2),
        "bn_ema_sma2d": lambda: mabn.GeneralBatchNorm2d.from_preset("bn_ema_sma", 4, norm_batch_size=2, window=4),
        "mabn1d_noaffine": lambda: mabn.MABN1d(4, affine=False, window=4),
    }
    for name, build in builders.items():
        state = frozen["state_dicts"][name]
        assert state._metadata[""]["version"] == 1
        layer = build()
        layer.load_state_dict(state)
        for key, value in state.items():
            assert_close(layer.state_dict()[key].to(value.dtype), value, msg=f"{name}.{key}")
        x, y = frozen["inputs"][name]
        assert_close(layer.eval()(x), y, msg=name)
        # and the layer trains on from there
        layer.train()(torch.randn(4, 4, 3, 3) if x.dim() == 4 else torch.randn(4, 4)).sum()
    assert mabn.MABN2d(4, dtype=torch.float16).state_dict()["running_var"].dtype == torch.float32


def test_version_1_half_state_dict_with_poisoned_statistics_is_repaired():
    state = torch.load(DATA / "layers_v1.pt", weights_only=True)["state_dicts"]["mabn2d_half"]
    state = copy.copy(state)
    state["forward_window"] = state["forward_window"].clone()
    state["forward_window"][1, 0, 2] = float("inf")  # what one large batch stored in version 1
    state["running_var"] = state["running_var"].clone().fill_(float("nan"))
    layer = mabn.MABN2d(4, norm_batch_size=2, window=4, dtype=torch.float16)
    with pytest.warns(UserWarning, match="non-finite statistics"):
        layer.load_state_dict(state)
    assert _all_finite(layer) and int(layer.forward_steps) == 0 and torch.equal(layer.running_var, torch.ones(4))
