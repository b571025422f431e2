"""The per-channel vector work of a training call: every statistic from one matrix product, and the
buffer writes it makes.

Everything here is linear algebra on C-length vectors (see :mod:`mabn._stream` for the rows and the
coefficient tables) plus a few elementwise operations (``r``, ``d``, the running statistics'
EMA). The functions return what they compute: the statistics a call normalizes with and the
updates of its buffers, which the caller commits once the call's output exists, so an error
before then leaves the layer as it was. The decisions that depend on tensor values (is it finite,
which phase of the warm-ups) go through the plan's control (:mod:`mabn._control`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ._control import Flag
from ._plan import Plan
from ._stream import constant
from .config import NormConfig

if TYPE_CHECKING:  # the engine's entry imports this module
    from .functional import NormState

__all__ = [
    "Used",
    "Forward",
    "Call",
    "check_group_size",
    "forward_step",
    "backward_stream",
    "repeat_backward",
    "commit",
]


class Call(NamedTuple):
    """What one training call is, besides its tensors.

    ``numel``: values per channel in each normalization group, an int or (synced) a (G,) tensor of
    the union's counts. ``sync``: ``(process_group, fingerprint, verify)`` or None. ``last``: whether
    the call ends its optimizer step (with ``accumulate > 1``; None otherwise).
    """

    numel: int | Tensor
    sync: tuple[Any, int, bool] | None
    last: Flag


class Used(NamedTuple):
    """The statistics a training call normalizes with, each (G, C): what its backward needs."""

    var_eps: Tensor  # the variance (second moment) plus eps
    mean: Tensor  # zeros in the uncentered form (what the native kernels subtract)
    r: Tensor | None
    d: Tensor | None


class Forward(NamedTuple):
    """A call's statistics and the buffer writes it makes once its output exists."""

    used: Used
    updates: list[tuple[Tensor, Tensor, Flag]]  # (buffer, new value, flag)
    increments: list[tuple[Tensor, Flag, int]]  # (counter, flag, amount)


def check_group_size(numel: int | Tensor, local_numel: int, config: NormConfig, synced: bool) -> None:
    """The centered form needs two values per channel in a group; synced, the union's count decides."""
    if not config.centered:
        return
    n = numel
    if isinstance(n, Tensor):
        # Read only when this rank alone has fewer than two values: then every rank reads the same union.
        if local_numel >= 2 or int(n.min()) >= 2:
            return
        n = int(n.min())
    if n < 2:
        raise ValueError(
            f"the centered form needs more than 1 value per channel in a normalization group, got {n}"
            + (" over the ranks of the process group" if synced else "")
        )


def forward_step(batch: Tensor, state: NormState, plan: Plan, call: Call) -> Forward:
    """The statistics of a call from its groups' statistics ``batch`` (G, k, C), and its buffer writes."""
    config, ctl, layout = plan.config, plan.control, plan.layout
    groups, k, c = batch.shape
    running = [state.running_mean, state.running_var] if config.centered else [state.running_var]
    rows = _rows(batch, state, running, plan)
    steps = state.forward_steps if config.forward_stats == "sma" else None
    coefficients = ctl.coefficients(
        plan.forward_table, plan.forward_bounds, state.num_batches_tracked, steps, config.window
    )
    out = torch.mm(coefficients, rows)
    if config.centered:
        _unbias(out[layout.target], call.numel)
    old_running = rows[-k - 1 : -1]
    if config.accumulate > 1:
        ok, stored, updates = _accumulate(out, old_running, state, plan, call)
    else:
        torch.lerp(old_running, out[layout.target], _ema_weight(state, config, out.dtype), out=out[layout.running])
        ok = stored = ctl.finite(out)
        updates = []
    # With accumulation the running statistics may move at a call whose own statistics are not finite.
    updates += [(buffer, value, stored) for buffer, value in zip(running, out[layout.running])]
    # A call whose statistics are not finite outputs NaN: the loss shows it and a scaler skips it.
    out = ctl.masked(ok, out)
    increments = [(state.num_batches_tracked, stored, 1)]
    if steps is not None:
        m = state.forward_window.shape[0]
        updates.append((state.forward_window, rows[groups * k : (m + groups) * k].view(m, k, c), ok))
        increments.append((steps, ok, groups))
    return Forward(_used(out, plan), updates, increments)


def _rows(batch: Tensor, state: NormState, running: list[Tensor], plan: Plan) -> Tensor:
    """The rows ``[window; new statistics; running statistics; ones]`` of the forward product."""
    groups, k, c = batch.shape
    parts = [
        batch.view(groups * k, c),
        *(t.view(1, c) for t in running),
        constant("one", (1, c), plan.dtype, batch.device),
    ]
    if plan.config.forward_stats == "sma":
        parts.insert(0, state.forward_window.view(-1, c))
    if any(p.dtype != plan.dtype for p in parts):
        parts = [p.to(plan.dtype) for p in parts]
    return torch.cat(parts)


def _unbias(targets: Tensor, numel: int | Tensor) -> None:
    """Bessel's correction n / (n - 1) of the running-variance target, in place (n values per group).

    Synced, ``n`` is the union's count, the same for every group of the call.
    """
    n = numel[0].to(targets.dtype) if isinstance(numel, Tensor) else numel
    targets[-1].mul_(n / (n - 1))


def _ema_weight(state: NormState, config: NormConfig, dtype: torch.dtype) -> float | Tensor:
    """The weight of the new value in the running statistics: ``momentum``, or 1 / count (cumulative)."""
    if config.momentum is not None:
        return config.momentum
    return (state.num_batches_tracked + 1).to(dtype).reciprocal()


def _accumulate(
    out: Tensor, old_running: Tensor, state: NormState, plan: Plan, call: Call
) -> tuple[Flag, Flag, list[tuple[Tensor, Tensor, Flag]]]:
    """With ``accumulate = K``: sum the targets of the step's finite calls, move the running statistics once.

    A call whose statistics are not finite contributes nothing, wherever it falls in the step; the
    running statistics move at the step's last call when any call of the step was finite. Returns
    whether this call's statistics are finite, whether the running statistics move now, and the
    writes of the pending sums (rows: the k target sums, the count of finite calls; the last row,
    the backward's count, belongs to the backward).
    """
    ctl, layout, config = plan.control, plan.layout, plan.config
    k = old_running.shape[0]
    targets = out[layout.target]
    ok = ctl.finite(out[: layout.running.start])
    pending = state.accum_sum[: k + 1]
    entry = torch.cat([targets, torch.ones_like(targets[:1])])
    pending = ctl.choose(ok, pending + entry, pending)
    torch.lerp(
        old_running,
        pending[:k] / pending[k:].clamp(min=1.0),
        _ema_weight(state, config, out.dtype),
        out=out[layout.running],
    )
    any_finite = ctl.positive(pending[k, 0])
    stored = ctl.both(ctl.both(call.last, any_finite), ctl.finite(out[layout.running]))
    fresh = constant("zero", tuple(pending.shape), pending.dtype, pending.device)
    updates = [
        (state.accum_sum[: k + 1], ctl.choose(call.last, fresh, pending), None),
        (state.accum_calls, ctl.cycle(state.accum_calls, config.accumulate), None),
    ]
    return ok, stored, updates


def _used(out: Tensor, plan: Plan) -> Used:
    """The (G, C) statistics of the normalization from the step's output rows (already NaN-masked)."""
    layout, config = plan.layout, plan.config
    var = out[layout.var]
    mean = out[layout.mean] if layout.zero is None else out[layout.zero].expand(plan.groups, -1)
    r = d = None
    if config.renorm:
        den, bounds = out[layout.den], out[layout.bounds]
        r = torch.clamp(var / den, bounds[0], bounds[1]).sqrt_()
        if config.centered:
            d = (out[layout.shift] * den.rsqrt()).clamp_(-config.d_max, config.d_max)
    return Used(var, mean, r, d)


def commit(forward: Forward, plan: Plan) -> None:
    """Write a call's buffer updates and advance its counters."""
    plan.control.write(forward.updates)
    plan.control.count(forward.increments)


# ---- backward ----------------------------------------------------------------------------------


def backward_stream(
    state: NormState, plan: Plan, call: Call, stats: Tensor, table: Tensor
) -> tuple[Tensor, tuple[Any, ...]]:
    """Push a backward's statistics (statistic-major, (k * G, C)) into the backward window.

    Returns the statistics to use (their moving averages) and what a second backward pass through
    the same call needs (:func:`repeat_backward`): the coefficients, whether the push happened and
    the window's version after it.
    """
    ctl = plan.control
    window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
    m, k, c = window.shape
    g = plan.groups
    entries = stats.view(k, g, c).transpose(0, 1)  # (G, k, C)
    coefficients = ctl.coefficients(table, plan.backward_bounds, calls, steps, m)
    seq = torch.cat([window.view(m * k, c).to(stats.dtype), entries.reshape(g * k, c)])
    used = torch.mm(coefficients, seq)
    ok = ctl.finite(used)
    # (The backward runs without gradient recording: in-place updates need no guard.)
    ctl.write([(window, seq[g * k :].view(m, k, c), ok)])
    ctl.count([(steps, ok, g), (calls, _counted(state, plan, call, ok), 1)])
    # The window's version counter tells a second backward whether anything changed it since.
    return used, (coefficients, ok, window._version)


def _counted(state: NormState, plan: Plan, call: Call, ok: Flag) -> Flag:
    """Whether this backward advances the backward call count: every finite one, or with accumulation
    the last of a step in which any backward was finite (in whatever order the finite ones came)."""
    if call.last is None:
        return ok
    ctl = plan.control
    row = state.accum_sum[-1]
    pending = ctl.choose(ok, row + 1, row)
    any_finite = ctl.positive(pending[0])
    ctl.write([(row, ctl.choose(call.last, constant("zero", tuple(row.shape), row.dtype, row.device), pending), None)])
    return ctl.both(call.last, any_finite)


def repeat_backward(
    state: NormState, plan: Plan, first: tuple[Any, ...], stats: Tensor
) -> tuple[Tensor, tuple[Any, ...]]:
    """A second backward pass through the same call (``retain_graph=True``): it pushes nothing.

    It uses the linear part of the moving average (its own statistics over the count the first pass
    saw) and adds its statistics to the entries the first pass pushed, so that two passes give the
    gradients and the window of one pass over the summed losses.
    """
    window = state.backward_window
    m, k, c = window.shape
    g = plan.groups
    coefficients, pushed, version = first
    entries = stats.view(k, g, c).transpose(0, 1)
    used = torch.mm(coefficients[:, m * k :], entries.reshape(g * k, c))
    if window._version != version:
        return used, first  # another call advanced the window since: its entries are not this call's any more
    j = min(m, g)
    addition = torch.zeros_like(window)
    addition[m - j :] = entries[g - j :].to(window.dtype)
    flag = plan.control.both(pushed, plan.control.finite(stats))
    window.add_(plan.control.choose(flag, addition, torch.zeros_like(addition)))
    return used, (coefficients, pushed, window._version)
