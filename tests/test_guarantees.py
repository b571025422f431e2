"""What the layers guarantee under interrupted steps, nesting, extreme inputs and repeated backward passes.

Each test states a contract as a user sees it and checks that nothing else changed: outputs,
gradients, every buffer (the step's pending sums included), counters and windows. The invariants,
each enforced at one place:

* accumulation state is per step and never outlives a load or a setting change
  (``StreamNorm._register_accumulation``);
* recomputation replays each recorded forward exactly once per backward, for any nesting and any
  number of backward passes (``mabn.recompute``);
* every statistics kernel path survives the same range of inputs (``mabn.kernels``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, buffer_copy, snapshot
from reference import NaiveNorm
from torch import nn
from torch.testing import assert_close

import mabn
from mabn.kernels import use_paths

F64 = torch.float64


def _assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    ba, bb = buffer_copy(a), buffer_copy(b)
    assert ba.keys() == bb.keys()
    for key, value in ba.items():
        assert torch.equal(value, bb[key]), key


def _accumulating(**kw) -> mabn.MABN2d:
    return mabn.MABN2d(3, norm_batch_size=2, accumulate=2, warmup_iters=2, renorm_warmup_iters=3, window=4, **kw)


def _micro_batches(steps: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 4, 4) * (1 + i % 3) for i in range(2 * steps)]


# ---- accumulation -------------------------------------------------------------------------------


def test_setting_accumulate_to_its_value_mid_step_keeps_the_pending_micro_batch():
    plain, touched = _accumulating(), _accumulating()
    batches = _micro_batches(3)
    for i, x in enumerate(batches):
        if i == 3:  # in the middle of the second step
            touched.accumulate = 2
        assert torch.equal(plain(x), touched(x))
        _assert_same_buffers(plain, touched)
    assert int(touched.num_batches_tracked) == 3


def test_changing_accumulate_mid_step_is_refused_and_changes_nothing():
    layer = _accumulating()
    layer(torch.randn(2, 3, 4, 4))
    before = buffer_copy(layer)
    with pytest.raises(ValueError, match=r"cannot change accumulate from 2 to 3 in the middle of an optimizer step"):
        layer.accumulate = 3
    assert layer.accumulate == 2 and layer.config.accumulate == 2
    for key, value in buffer_copy(layer).items():
        assert torch.equal(value, before[key]), key
    layer(torch.randn(2, 3, 4, 4))  # the step ends: now it may change
    layer.accumulate = 3
    assert layer.accumulate == 3 and int(layer.accum_calls) == 0


def test_a_state_loaded_mid_step_continues_like_a_fresh_layer_loaded_with_it():
    source = _accumulating()
    for x in _micro_batches(3):
        source(x)
    state = copy.deepcopy(source.state_dict())

    interrupted = _accumulating()
    for x in _micro_batches(2)[:3]:  # one micro-batch of a step pending
        interrupted(x)
    interrupted.load_state_dict(state)
    fresh = _accumulating()
    fresh.load_state_dict(state)
    _assert_same_buffers(interrupted, fresh)
    for x in _micro_batches(3):
        assert torch.equal(interrupted(x), fresh(x))
    _assert_same_buffers(interrupted, fresh)


@pytest.mark.parametrize("step", ["fused", "composed"])
@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("preset", ["mabn", "bn", "brn"])
def test_a_non_finite_micro_batch_contributes_nothing_wherever_it_falls(preset, position, step):
    # An optimizer step of 3 micro-batches, one of them NaN, leaves every buffer (running statistics,
    # windows, counters, forward and backward) as a step of its 2 finite micro-batches does, wherever
    # the NaN one falls; only its own output is NaN. BatchNorm likewise counts every finite forward.
    kw = dict(norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=2, momentum=0.5)
    nan_step = mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kw)
    finite_step = copy.deepcopy(nan_step)
    with use_paths(step=step):
        for _ in range(3):  # the same history for both, past the warm-ups
            x = torch.randn(2, 3, 4, 4)
            for layer in (nan_step, finite_step):
                layer(x.clone().requires_grad_()).sum().backward()
        nan_step.accumulate, finite_step.accumulate = 3, 2
        finite = [torch.randn(2, 3, 4, 4) * (1 + i) for i in range(2)]
        for x in finite:
            finite_step(x.clone().requires_grad_()).sum().backward()
        batches = [*finite]
        batches.insert(position, torch.full((2, 3, 4, 4), float("nan")))
        for i, x in enumerate(batches):
            y = nan_step(x.clone().requires_grad_())
            y.sum().backward()
            assert bool(torch.isnan(y).all()) == (i == position)
    _assert_same_buffers(finite_step, nan_step)
    assert int(nan_step.num_batches_tracked) == 4


def test_a_refused_load_mid_step_keeps_the_pending_micro_batch():
    layer = _accumulating()
    layer(torch.randn(2, 3, 4, 4))
    before = buffer_copy(layer)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(mabn.MABN2d(4, norm_batch_size=2, window=4).state_dict())
    for key, value in buffer_copy(layer).items():
        assert torch.equal(value, before[key]), key


# ---- recomputation ------------------------------------------------------------------------------


def _block() -> nn.Sequential:
    norm = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=2, renorm_warmup_iters=3, window=4)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), norm, nn.ReLU())


class _Stage(nn.Module):
    """Two blocks, the second checkpointed inside the stage (when ``nested``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _block(), _block()
        self.nested = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return mabn.checkpoint(self.second, x) if self.nested else self.second(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = _Stage()
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mabn.checkpoint(self.stage, x) if self.checkpointed else self.stage(x)


def _pair() -> tuple[_Net, _Net]:
    plain = _Net().double()
    nested = copy.deepcopy(plain)
    nested.checkpointed = nested.stage.nested = True
    return plain, nested


def test_nested_checkpoints_advance_each_layer_once_per_step_and_equal_the_plain_model():
    plain, nested = _pair()
    for _ in range(5):
        x = torch.randn(4, 3, 6, 6, dtype=F64)
        for model in (plain, nested):
            model.zero_grad()
            model(x).square().mean().backward()
        for a, b in zip(plain.parameters(), nested.parameters()):
            assert torch.equal(a.grad, b.grad)
        _assert_same_buffers(plain, nested)
    assert int(nested.stage.second[1].num_batches_tracked) == 5
    assert int(nested.stage.second[1].backward_calls) == 5


@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
def test_two_backward_passes_through_a_checkpointed_segment(with_norm):
    # torch's own checkpoint supports retain_graph; so does mabn.checkpoint, with or without norm layers.
    plain = _block().double() if with_norm else nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).double()
    wrapped = copy.deepcopy(plain)
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    losses = [plain(x).square().mean(), mabn.checkpoint(wrapped, x).square().mean()]
    for loss in losses:
        loss.backward(retain_graph=True)
        loss.backward()
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        assert_close(a.grad, b.grad, rtol=0, atol=0)
    _assert_same_buffers(plain, wrapped)


def test_checkpoint_contexts_can_be_entered_again():
    block = _block().double()
    record, replay = mabn.checkpoint_context()
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    with record:
        expected = block(x)
    steps = int(block[1].num_batches_tracked)
    for _ in range(2):  # one replay per backward pass
        with replay:
            assert torch.equal(block(x), expected)
    assert int(block[1].num_batches_tracked) == steps


# ---- extremes and empty input ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [mabn.MABN2d, mabn.GhostBatchNorm2d, mabn.BatchRenorm2d])
@pytest.mark.parametrize("shape", [(4, 3, 0, 5), (0, 3, 4, 4)])
def test_an_empty_input_in_training_is_refused_and_changes_nothing(cls, shape):
    layer = cls(3, norm_batch_size=2)
    layer(torch.randn(4, 3, 4, 4))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="cannot compute batch statistics of an empty"):
        layer(torch.randn(*shape))
    assert_unchanged(layer, before)
    assert layer.eval()(torch.randn(*shape)).shape == shape  # evaluation maps an empty input to an empty output


PRESETS_AT_SCALE = ["bn", "brn", "bn_ema_sma", "uncentered", "uncentered_ema", "mabn"]


@pytest.mark.parametrize("preset", PRESETS_AT_SCALE)
def test_huge_finite_inputs_give_the_right_statistics(preset):
    # x ~ 1e18 (E[x^2] ~ 1e36 fits float32) in groups of 32 samples, whose sums of squares over the
    # group (5e38) do not fit float32 while each sample's (2e37) does: on contiguous CPU input every
    # preset sums per sample in a safe scale, normalizes correctly and keeps the reference's
    # running statistics.
    config = mabn.PRESETS[preset]
    kwargs = dict(norm_batch_size=32, warmup_iters=1, renorm_warmup_iters=1, window=2)
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kwargs)
    fields = {k: v for k, v in vars(config).items() if k != "accumulate"} | kwargs
    naive = NaiveNorm(3, **fields)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    for step in range(3):
        x = (torch.randn(64, 3, 4, 4) + step) * 1e18
        y = layer(x)
        expected, _ = naive.forward(x.double(), ones, zeros)
        assert bool(torch.isfinite(y).all()), (preset, step)
        assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
        assert_close(layer.running_var.double(), naive.running_var, rtol=1e-4, atol=0)


# Every path of each statistics job, with the groups and layout it takes.
STATISTICS_PATHS = [
    ("second_moment", "spatial", 2, False),
    ("second_moment", "native", 1, True),
    ("second_moment", "native_loop", 2, True),
    ("second_moment", "grouped", 2, True),
    ("moments", "per_sample", 2, False),
    ("moments", "native", 1, True),
    ("moments", "native_loop", 2, False),
    ("moments", "grouped", 2, True),
]


@pytest.mark.parametrize(("job", "path", "groups", "channels_last"), STATISTICS_PATHS)
def test_every_statistics_path_is_right_while_a_groups_sum_of_squares_fits(job, path, groups, channels_last):
    # The common range of every path: x of scale 5e17-1.5e18 in groups of 64 or 128 values per
    # channel, whose sums of squares (up to about 2e38) fit float32. Each path normalizes right and
    # keeps the reference's running statistics, on the layout it serves.
    preset = "mabn" if job == "second_moment" else "bn_ema_sma"
    kwargs = dict(norm_batch_size=8 // groups, warmup_iters=1, renorm_warmup_iters=1, window=2)
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kwargs)
    naive = NaiveNorm(3, **{k: v for k, v in vars(mabn.PRESETS[preset]).items() if k != "accumulate"} | kwargs)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = ((torch.randn(8, 3, 4, 4) + step) * 1e18 / 2).contiguous(memory_format=fmt)
        with use_paths(**{job: path}):
            y = layer(x)
        expected, _ = naive.forward(x.double(), ones, zeros)
        assert bool(torch.isfinite(y).all()), step
        assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
        assert_close(layer.running_var.double(), naive.running_var, rtol=1e-4, atol=0)


BEYOND = {
    "variance and second moment beyond float32": lambda: torch.randn(4, 3, 4, 4).sign() * 3e38,
    "sums of squares beyond float32": lambda: torch.randn(4, 3, 32, 32) * 1e18,
}


@pytest.mark.parametrize("paths", [{}, {"cpu_specific": False}], ids=["cpu", "generic"])
@pytest.mark.parametrize("make", list(BEYOND.values()), ids=list(BEYOND))
@pytest.mark.parametrize("preset", PRESETS_AT_SCALE)
def test_beyond_the_range_of_a_path_the_call_is_rejected_never_stored_wrong(paths, make, preset):
    # A path that cannot represent the statistics rejects the call: NaN output (the loss shows it, a
    # gradient scaler skips the step) and every buffer as it was. A path that can (the grouped
    # reduction accumulates in float64 on the CPU) is right.
    kwargs = dict(norm_batch_size=2, warmup_iters=1, renorm_warmup_iters=1, window=2)
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kwargs)
    naive = NaiveNorm(3, **{k: v for k, v in vars(mabn.PRESETS[preset]).items() if k != "accumulate"} | kwargs)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    first, x = torch.randn(4, 3, 4, 4), make()
    with use_paths(**paths):
        layer(first)
        naive.forward(first.double(), ones, zeros)
        before = snapshot(layer)
        y = layer(x)
    if bool(torch.isnan(y).all()):
        assert_unchanged(layer, before)
        return
    expected, _ = naive.forward(x.double(), ones, zeros)
    assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
    assert_close(layer.running_var.double(), naive.running_var, rtol=1e-4, atol=0)


# ---- threads --------------------------------------------------------------------------------------


def test_kernel_settings_and_recomputation_contexts_belong_to_their_thread():
    import threading

    from mabn import recompute
    from mabn.kernels import choose_paths, site

    def grad_sums_path() -> str:
        return choose_paths(site(x, 2)).grad_sums

    x = torch.randn(4, 3, 4, 4)
    seen: dict[str, object] = {}
    record, _ = mabn.checkpoint_context()

    def other() -> None:
        seen["path"] = grad_sums_path()
        seen["replay"] = recompute.replayed(12345)

    with use_paths(grad_sums="grouped"), record:
        assert grad_sums_path() == "grouped"
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["path"] == grad_sums_path() != "grouped"
    assert seen["replay"] is None
