"""Whole-model half-precision training with overflowing batches injected: the statistics stay finite and
equal to those of a run that never saw the bad batches.

A batch whose activations overflow (inf) gives a non-finite loss; the training loop skips its
optimizer step (by hand, or through ``torch.amp.GradScaler``). The layers must then leave every
buffer as it was, so the run continues exactly as if the batch had not been there.
"""

import copy

import pytest
import torch
from torch import nn

import mabn

STEPS = 240
BAD_STEPS = {30, 31, 90, 150, 200}


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        mabn.create_norm_layer(norm, 8, norm_batch_size=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        mabn.create_norm_layer(norm, 8, norm_batch_size=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _batches(huge: float):
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(4, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        yield step, (x * huge if step in BAD_STEPS else x), y


def _train(model: nn.Module, dtype: torch.dtype, huge: float, skip_bad: bool, scaler: bool) -> int:
    """SGD over the batches; a non-finite loss skips the step. Returns the number of skipped steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6) if scaler else None
    skipped = 0
    for step, x, y in _batches(huge):
        if skip_bad and step in BAD_STEPS:
            continue
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            grad_scaler.scale(loss).backward()
            scale = grad_scaler.get_scale()
            grad_scaler.step(optimizer)
            grad_scaler.update()
            skipped += grad_scaler.get_scale() < scale
            if grad_scaler.get_scale() < scale:  # keep the scale of the clean run: equal gradients
                grad_scaler.update(new_scale=scale)
        else:
            loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
            if not torch.isfinite(loss):
                skipped += 1
                continue
            loss.backward()
            optimizer.step()
    return skipped


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "weight" not in k and "bias" not in k}


@pytest.mark.parametrize("norm", ["mabn", "bn", "brn"])
@pytest.mark.parametrize(
    "dtype,huge",
    # Past each format's largest finite value. (float16 is the slower on the CPU: the fast suite runs bfloat16.)
    [pytest.param(torch.float16, 1e5, marks=pytest.mark.slow), (torch.bfloat16, 3e38)],
)
def test_half_model_skips_overflowing_batches_exactly(norm, dtype, huge):
    bad = _model(norm).to(dtype)
    clean = copy.deepcopy(bad)
    assert _train(bad, dtype, huge, skip_bad=False, scaler=False) == len(BAD_STEPS)
    assert _train(clean, dtype, huge, skip_bad=True, scaler=False) == 0
    for key, value in _stats(bad).items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(value, _stats(clean)[key]), key
    for key, value in bad.state_dict().items():
        assert torch.equal(value, clean.state_dict()[key]), key


@pytest.mark.parametrize("norm", ["mabn", "bn"])
def test_autocast_with_grad_scaler_skips_overflowing_batches(norm):
    bad = _model(norm)
    clean = copy.deepcopy(bad)
    assert _train(bad, torch.bfloat16, 3e38, skip_bad=False, scaler=True) == len(BAD_STEPS)
    _train(clean, torch.bfloat16, 3e38, skip_bad=True, scaler=True)
    for key, value in bad.state_dict().items():
        assert torch.isfinite(value.float()).all(), key
        torch.testing.assert_close(value, clean.state_dict()[key], rtol=0, atol=0, msg=key)
