"""The fused CPU step against the composed one: the same layer, step by step, on every configuration."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import buffer_copy
from torch.testing import assert_close

import mabn
from mabn import _native
from mabn.kernels import use_paths

pytestmark = pytest.mark.skipif(_native.library() is None, reason=f"fused step unavailable: {_native.status()}")

SCHEDULE = dict(window=4, warmup_iters=3, renorm_warmup_iters=5, r_max=1.5, d_max=0.5)
PRESETS = ["mabn", "bn", "brn", "bn_ema_sma", "uncentered", "uncentered_ema"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _layer(preset: str, dtype: torch.dtype, groups: int, dims: int = 2, **kw) -> mabn.StreamNorm:
    cls = {1: mabn.GeneralBatchNorm1d, 2: mabn.GeneralBatchNorm2d, 3: mabn.GeneralBatchNorm3d}[dims]
    layer = cls.from_preset(preset, 3, norm_batch_size=2, **SCHEDULE, **kw, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


def _step(layer, x, dy, step):
    with use_paths(step=step):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
    return y.detach(), x.grad


def _shape(dims: int, n: int) -> tuple[int, ...]:
    return {1: (n, 3, 7), 2: (n, 3, 5, 4), 3: (n, 3, 2, 3, 4)}[dims]


def _assert_same_state(a, b, tol):
    ba, bb = buffer_copy(a), buffer_copy(b)
    assert ba.keys() == bb.keys()
    for key, value in ba.items():
        if value.is_floating_point():
            assert_close(bb[key], value, **tol, msg=key)
        else:
            assert torch.equal(bb[key], value), key
    assert_close(b.weight.grad, a.weight.grad, **tol, equal_nan=True)
    assert_close(b.bias.grad, a.bias.grad, **tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_fused_step_equals_the_composed_one(preset, groups, layout, dtype):
    # Outputs, input gradients, affine gradients and every buffer, across the warm-ups and past them.
    composed = _layer(preset, dtype, groups)
    fused = copy.deepcopy(composed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for step in range(9):
        x = (torch.randn(_shape(2, 2 * groups), dtype=dtype) * (1 + step % 3) + 0.3).contiguous(memory_format=fmt)
        dy = torch.randn_like(x)
        y_composed, dx_composed = _step(composed, x, dy, "composed")
        y_fused, dx_fused = _step(fused, x, dy, "fused")
        assert y_fused.is_contiguous(memory_format=fmt)
        assert_close(y_fused, y_composed, **TOL[dtype])
        assert_close(dx_fused, dx_composed, **TOL[dtype])
        _assert_same_state(composed, fused, TOL[dtype])


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("preset", ["mabn", "bn"])
def test_fused_step_takes_every_rank(preset, dims):
    composed = _layer(preset, torch.float64, 2, dims=dims)
    fused = copy.deepcopy(composed)
    for _ in range(6):
        x, dy = torch.randn(_shape(dims, 4), dtype=torch.float64), torch.randn(_shape(dims, 4), dtype=torch.float64)
        assert_close(_step(fused, x, dy, "fused")[1], _step(composed, x, dy, "composed")[1])
    _assert_same_state(composed, fused, TOL[torch.float64])


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("preset", ["mabn", "bn"])
def test_accumulated_steps_agree_and_skip_a_non_finite_micro_batch(preset, position):
    # accumulate=3: a NaN micro-batch at any position contributes nothing, on both paths alike.
    composed = _layer(preset, torch.float64, 1, accumulate=3)
    fused = copy.deepcopy(composed)
    for step in range(4):
        for i in range(3):
            x = torch.randn(_shape(2, 2), dtype=torch.float64)
            if step == 2 and i == position:
                x[0, 0, 0, 0] = float("nan")
            dy = torch.randn_like(x)
            y_c, _ = _step(composed, x, dy, "composed")
            y_f, _ = _step(fused, x, dy, "fused")
            assert_close(y_f, y_c, equal_nan=True)
        _assert_same_state(composed, fused, TOL[torch.float64])
    assert int(fused.num_batches_tracked) == 4  # every step counted: each had finite micro-batches


@pytest.mark.parametrize("preset", PRESETS)
def test_a_rejected_call_changes_nothing_on_the_fused_path(preset):
    layer = _layer(preset, torch.float32, 1)
    for _ in range(3):
        _step(layer, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), "fused")
    before = buffer_copy(layer)
    y, dx = _step(layer, torch.randn(2, 3, 5, 4) * 1e22, torch.randn(2, 3, 5, 4), "fused")
    assert torch.isnan(y).all()
    after = buffer_copy(layer)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_a_second_backward_pass_agrees_with_the_composed_path():
    composed = _layer("mabn", torch.float64, 2)
    fused = copy.deepcopy(composed)
    for _ in range(5):
        x = torch.randn(4, 3, 5, 4, dtype=torch.float64)
        grads = []
        for layer, path in ((composed, "composed"), (fused, "fused")):
            with use_paths(step=path):
                leaf = x.clone().requires_grad_()
                y = layer(leaf)
                y.pow(2).sum().backward(retain_graph=True)
                (3 * y).sum().backward()
            grads.append(leaf.grad)
        assert_close(grads[1], grads[0])
    _assert_same_state(composed, fused, TOL[torch.float64])


def test_the_plan_takes_the_fused_step_on_cpu_and_the_composed_one_elsewhere():
    from mabn._plan import plan_for

    layer = mabn.MABN2d(3)
    x = torch.randn(2, 3, 4, 4)
    assert plan_for(layer.config, x, 1, torch.float32, False).paths.step == "fused"
    with use_paths(cpu_specific=False):  # what other devices run
        assert plan_for(layer.config, x, 1, torch.float32, False).paths.step == "composed"
    assert plan_for(layer.config, x.half(), 1, torch.float32, False).paths.step == "composed"
    other = x.transpose(2, 3)  # neither contiguous nor channels_last
    assert plan_for(layer.config, other, 1, torch.float32, False).paths.step == "composed"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_the_library_builds_into_its_cache_directory_once(tmp_path):
    code = "import mabn._native as n; print(n.status())"
    first = _python(code, MABN_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("loaded from") and str(tmp_path) in first.stdout
    built = list(tmp_path.glob("mabn_step_*.so"))
    assert len(built) == 1
    second = _python(code, MABN_CACHE_DIR=str(tmp_path))
    assert second.stdout == first.stdout and list(tmp_path.glob("mabn_step_*.so")) == built


def test_without_the_library_the_layers_run_the_composed_step(tmp_path):
    code = (
        "import torch, mabn, mabn._native as n\n"
        "layer = mabn.MABN2d(3)\n"
        "layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()\n"
        "from mabn._plan import _PLANS\n"
        "print(n.status(), {p.paths.step for p in _PLANS.values()})"
    )
    off = _python(code, MABN_NATIVE="0")
    assert off.returncode == 0, off.stderr
    assert "switched off" in off.stdout and "{'composed'}" in off.stdout
    no_compiler = _python(code, CC="/nonexistent/cc", PATH=str(tmp_path), MABN_CACHE_DIR=str(tmp_path))
    assert no_compiler.returncode == 0, no_compiler.stderr
    assert "no C compiler" in no_compiler.stdout and "{'composed'}" in no_compiler.stdout
