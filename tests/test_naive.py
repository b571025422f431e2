"""The naive MABN of benchmarks/naive.py computes what the engine computes, so the speed-up measured against it is real."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import mabn

_spec = importlib.util.spec_from_file_location("naive", Path(__file__).resolve().parents[1] / "benchmarks" / "naive.py")
naive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive)

#: The settings of the benchmark (benchmarks/layers.py: past both warm-ups from the first call), and
#: short warm-ups so that the batch -> SMA and r = 1 -> clipped r transitions happen within the run.
SETTINGS = [
    pytest.param({"window": 16, "warmup_iters": 1, "renorm_warmup_iters": 1}, id="benchmark"),
    pytest.param({"window": 4, "warmup_iters": 3, "renorm_warmup_iters": 5}, id="warm-ups"),
]
STEPS = 20  # more than the window: the SMAs drop their oldest entries


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("norm_batch_size", [None, 2])
def test_naive_matches_the_engine_step_by_step(settings, norm_batch_size):
    c = 3
    engine = mabn.MABN2d(c, norm_batch_size=norm_batch_size, **settings).double()
    reference = naive.NaiveMABN2d(c, norm_batch_size=norm_batch_size, **settings).double()
    with torch.no_grad():
        weight, bias = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
        for layer in (engine, reference):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    for step in range(STEPS):
        # The scale drifts, so that r moves away from 1 and the clip at r_max = 5 bites at times.
        x = (torch.randn(8, c, 4, 4, dtype=torch.float64) * (0.2 + step) + 0.3).requires_grad_()
        dy = torch.randn(8, c, 4, 4, dtype=torch.float64)
        outputs, grads = [], []
        for layer in (engine, reference):
            xi = x.detach().clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            outputs.append(y.detach())
            grads.append((xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
            layer.zero_grad(set_to_none=True)
        checks = [("output", *outputs), ("running_var", engine.running_var, reference.running_var)]
        checks += [(f"{name} gradient", *pair) for name, *pair in zip(("input", "weight", "bias"), *grads)]
        for what, got, expected in checks:
            assert_close(got, expected, msg=lambda m, what=what, step=step: f"{what} at step {step}: {m}")


def test_naive_differs_when_its_window_is_wrong():
    """The comparison above can fail: a naive layer with another window drifts from the engine."""
    engine = mabn.MABN2d(2, window=4, warmup_iters=1, renorm_warmup_iters=1).double()
    reference = naive.NaiveMABN2d(2, window=2, warmup_iters=1, renorm_warmup_iters=1).double()
    diffs = []
    for step in range(6):
        x = torch.randn(4, 2, 3, 3, dtype=torch.float64) * (1 + step)
        diffs.append((engine(x) - reference(x)).abs().max().item())
    assert max(diffs) > 1e-3
