"""The normalization engine: one stateless function for BN, ghost BN, BRN, MABN and every ablation.

Every layer of this package is a point of one family (see :class:`mabn.NormConfig`):

* the *form*: centered (``(x - mu) / sigma``, BatchNorm) or uncentered (``x / chi``, MABN);
* the *forward statistics*: the statistics of the normalization group (``"batch"``) or their simple
  moving average over the last ``window`` groups (``"sma"``), optionally renormalized towards the
  exponential moving average with clipped ``r`` (and ``d`` in the centered form);
* the *backward statistics*: ``g`` (centered only) and ``Psi`` of the group (``"batch"``) or their
  simple moving average over the last ``window`` groups (``"sma"``).

A training call makes two passes over the activations forward (statistics, normalization) and two
or three backward (one reduction, the gradient), all in :mod:`mabn._kernels`. Everything else is
per-channel vector work, and it is linear in the window entries, the new statistics and the running
statistics; :mod:`mabn._stream` tabulates the coefficients, so a call computes every statistic it
uses with one matrix product whose coefficients its counters select. Counters stay tensors: no host
synchronization and no Python branching on tensor values. The whole mathematics of the family is
written out in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _kernels, _sync, recompute
from ._kernels import HALF, group_view, per_group_channel, stat_dtype
from ._stream import TableSpec, backward_coefficients, constant, forward_coefficients, forward_layout, window_means
from .config import STAT_MODES, NormConfig

__all__ = [
    "NormConfig",
    "NormState",
    "stream_norm",
    "STAT_MODES",
    "STATISTICS_FIELDS",
    "COUNTER_FIELDS",
    "STREAM_FIELDS",
    "ACCUMULATION_FIELDS",
    "window_means",
]

#: The fields of :class:`NormState` that hold statistics (kept in float32 at least).
STATISTICS_FIELDS = ("running_mean", "running_var", "forward_window", "backward_window", "accum_sum")
#: The fields that count (``torch.long``).
COUNTER_FIELDS = ("num_batches_tracked", "forward_steps", "backward_steps", "backward_calls", "accum_calls")
#: The moving-average windows and their counters (present when the configuration has an ``"sma"``).
STREAM_FIELDS = ("forward_window", "forward_steps", "backward_window", "backward_steps", "backward_calls")
#: The pending sums of an optimizer step under gradient accumulation (never saved: per step).
ACCUMULATION_FIELDS = ("accum_sum", "accum_calls")


class NormState(NamedTuple):
    """The buffers a layer owns; the engine reads them and updates them in place.

    ``running_mean`` exists for the centered form only. The windows hold the last ``window``
    per-group statistics in chronological order (newest last), ``*_steps`` count the groups
    pushed so far (so that a short stream averages over fewer entries) and ``backward_calls``
    counts backward passes for the backward warm-up. With gradient accumulation
    (``config.accumulate > 1``) ``accum_sum`` sums the running-statistics targets of the step's calls
    (last row: how many) and ``accum_calls`` is the position of the next call in its step.
    Build one with :meth:`zeros`.
    """

    running_mean: Tensor | None
    running_var: Tensor
    num_batches_tracked: Tensor
    forward_window: Tensor | None = None
    forward_steps: Tensor | None = None
    backward_window: Tensor | None = None
    backward_steps: Tensor | None = None
    backward_calls: Tensor | None = None
    accum_sum: Tensor | None = None
    accum_calls: Tensor | None = None

    @classmethod
    def zeros(
        cls,
        num_features: int,
        config: NormConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> NormState:
        """The initial state of a layer: running mean 0, running variance 1, empty windows, counters 0.

        Statistics are kept in ``dtype`` (default: torch's default dtype), float32 for half precision.

        Example::

            >>> import torch
            >>> from mabn import NormConfig, NormState
            >>> state = NormState.zeros(4, NormConfig(window=8))
            >>> state.forward_window.shape, state.running_mean is None
            (torch.Size([8, 1, 4]), True)
        """
        config = config if config is not None else NormConfig()
        floats = {"device": device, "dtype": stat_dtype(dtype if dtype is not None else torch.get_default_dtype())}
        longs = {"device": device, "dtype": torch.long}
        m, c = config.window, num_features
        sma_f, sma_b = config.forward_stats == "sma", config.backward_stats == "sma"
        accumulating = config.accumulate > 1
        return cls(
            running_mean=torch.zeros(c, **floats) if config.centered else None,
            running_var=torch.ones(c, **floats),
            num_batches_tracked=torch.tensor(0, **longs),
            forward_window=torch.zeros(m, config.num_forward_stats, c, **floats) if sma_f else None,
            forward_steps=torch.tensor(0, **longs) if sma_f else None,
            backward_window=torch.zeros(m, config.num_backward_stats, c, **floats) if sma_b else None,
            backward_steps=torch.tensor(0, **longs) if sma_b else None,
            backward_calls=torch.tensor(0, **longs) if sma_b else None,
            accum_sum=torch.zeros(config.num_forward_stats + 1, c, **floats) if accumulating else None,
            accum_calls=torch.tensor(0, **longs) if accumulating else None,
        )


def check_input(
    input: Any, num_features: int, norm_batch_size: int | None, training: bool, synced: bool = False
) -> int:
    """Validate ``input`` of shape (N, C, *) and return the number of normalization groups ``G = N / B``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating point tensor, got dtype {input.dtype}")
    n, c = input.shape[0], input.shape[1]
    if c != num_features:
        raise ValueError(f"expected {num_features} channels (num_features), got input with C={c}")
    if not training:
        return 1
    if input.numel() == 0:
        if synced and norm_batch_size is None:
            return 1  # an empty rank still joins the collective of its one group
        what = "an empty batch (N=0)" if n == 0 else f"an empty input (shape {tuple(input.shape)})"
        raise ValueError(f"cannot compute batch statistics of {what} in training mode")
    b = n if norm_batch_size is None else norm_batch_size
    if n % b != 0:
        raise ValueError(f"the batch size N={n} is not divisible by norm_batch_size B={b}")
    return n // b


def _check_state(state: NormState, config: NormConfig) -> None:
    if config.forward_stats == "sma" and state.forward_window is None:
        raise ValueError("forward_stats='sma' needs state.forward_window and state.forward_steps")
    if config.backward_stats == "sma" and state.backward_window is None:
        raise ValueError("backward_stats='sma' needs state.backward_window, backward_steps and backward_calls")
    if config.centered and state.running_mean is None:
        raise ValueError("the centered form needs state.running_mean")
    if config.accumulate > 1 and state.accum_sum is None:
        raise ValueError("accumulate > 1 needs state.accum_sum and state.accum_calls")


@dataclasses.dataclass
class _Step:
    """What one training call is, besides its tensors.

    ``group_numel`` is the number of values per channel in a normalization group: an int, or a
    (G,) tensor of the union's counts when the statistics are synced over ``process_group``.
    ``verify_sync`` reads the ranks' fingerprints after each collective and ``probe_sync`` also
    compares them in a collective of their own first (see :mod:`mabn._sync`). ``last_call`` (a
    0-dim bool tensor, None without accumulation) says whether the call ends its optimizer step.
    """

    num_groups: int
    group_numel: int | Tensor
    local_numel: int
    process_group: Any = None
    fingerprint: int = 0
    verify_sync: bool = False
    probe_sync: bool = False
    last_call: Tensor | None = None


class _Used(NamedTuple):
    """The statistics a training call normalizes with, each (G, C): what its backward needs."""

    var_eps: Tensor  # the variance (second moment) plus eps
    mean: Tensor  # rows of zeros in the uncentered form (what the native kernels subtract)
    r: Tensor | None
    d: Tensor | None


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: no inf or NaN in ``t`` (the largest magnitude is finite; NaN propagates through max)."""
    return t.abs().max() < math.inf


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a * b where None stands for 1."""
    if a is None:
        return b
    return a if b is None else a * b


def _sum_groups(v: Tensor) -> Tensor:
    """(G, C) -> (C,): the sum over groups (a view for one group)."""
    return v[0] if v.shape[0] == 1 else v.sum(0)


def _native_ok(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether the native kernels take ``x`` with per-channel vectors in ``dtype``."""
    return x.dtype == dtype or (x.dtype in HALF and dtype == torch.float32)


class _NormFunction(torch.autograd.Function):
    """y = gamma * r * (x - mu) / sqrt(var + eps) + gamma * d + beta per (group, channel).

    The per-(group, channel) statistics come precomputed (:class:`_Used`); the backward reduces
    ``dy`` once, forms ``g``/``Psi`` (optionally averaged over the backward window, which it
    advances in place), and writes ``dx``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, used, state, config, step):
        var, mean, r, d = used
        gamma, beta = _cast(weight, var.dtype), _cast(bias, var.dtype)
        if d is not None:
            gd = d if gamma is None else gamma * d
            beta = gd if beta is None else beta + gd
        gr = _times(gamma, r)  # (C,) or (G, C): dL/dz = gr * dL/dy, z the normalized input
        ctx.save_for_backward(x, weight, gr, *used)
        ctx.state, ctx.config, ctx.step, ctx.first_backward = state, config, step, None
        if _kernels.choose("normalize", x, step.num_groups) == "native" and _native_ok(x, var.dtype):
            # The native inference kernel: (x - mean) / sqrt(var_eps) * w + b in one pass on every
            # layout, into a fresh tensor in the input's memory format.
            w = gr[0] if gr is not None and gr.dim() == 2 else gr
            b = beta[0] if beta is not None and beta.dim() == 2 else beta
            return torch.native_batch_norm(x, w, b, mean[0], var[0], False, 0.0, 0.0)[0]
        return _grouped_normalize(x, var, mean if config.centered else None, gr, beta, step.num_groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, gr, var, mean, r, d = ctx.saved_tensors
        config, step = ctx.config, ctx.step
        if _native_training_backward_ok(x, dy, var, config, step):
            grad_x, sum_dy_xhat, sum_dy = _native_training_backward(ctx, dy, x, gr, var, mean)
        else:
            grad_x, sum_dy_xhat, sum_dy = _stream_backward(ctx, dy, x, gr, var, mean)
        grad_weight = grad_bias = None
        # The affine gradients are this process's own (DDP averages them over the ranks).
        if weight is not None and ctx.needs_input_grad[1]:
            gw = sum_dy_xhat if r is None else r * sum_dy_xhat
            if d is not None:
                gw = gw + d * sum_dy
            grad_weight = _sum_groups(gw).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = _sum_groups(sum_dy).to(dy.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _grouped_normalize(
    x: Tensor, var_eps: Tensor, mean: Tensor | None, scale: Tensor | None, beta: Tensor | None, groups: int
) -> Tensor:
    """The normalization of G groups with one ``addcmul`` on a group view (``mean`` None: uncentered)."""
    factor = torch.rsqrt(var_eps)
    if scale is not None:
        factor = factor * scale
    if mean is None:
        shift = beta.expand_as(factor) if beta is not None else torch.zeros_like(factor)
    else:
        shift = -factor * mean
        if beta is not None:
            shift = shift + beta
    xv = group_view(x, groups)
    nd = xv.dim()
    # Written through a view into a fresh tensor, so the output is not a view (in-place ops such as
    # ReLU(inplace=True) may follow) and keeps the input's memory format.
    y = torch.empty_like(x)
    affine = (per_group_channel(shift, nd), xv, per_group_channel(factor, nd))
    if y.dtype == factor.dtype:
        torch.addcmul(*affine, out=group_view(y, groups))
    else:
        group_view(y, groups).copy_(torch.addcmul(*affine))
    return y


def _native_training_backward_ok(x: Tensor, dy: Tensor, var: Tensor, config: NormConfig, step: _Step) -> bool:
    """BatchNorm's own backward applies: centered, batch statistics backward, one local group."""
    return (
        config.centered
        and config.backward_stats == "batch"
        and step.num_groups == 1
        and step.process_group is None
        and x.dtype == var.dtype
        and dy.dtype == var.dtype
        and x.numel() > 0
    )


def _native_training_backward(
    ctx: Any, dy: Tensor, x: Tensor, gr: Tensor | None, var_eps: Tensor, mean: Tensor
) -> tuple[Tensor | None, Tensor, Tensor]:
    """dx, sum(dy * x_hat) and sum(dy) of one centered group with batch statistics, in one native call."""
    invstd = torch.rsqrt(var_eps[0])
    w = gr[0] if gr is not None and gr.dim() == 2 else gr
    mask = [ctx.needs_input_grad[0], True, True]
    grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, mean[0], invstd, True, 0.0, mask
    )
    return grad_x, sum_dy_xhat.unsqueeze(0), sum_dy.unsqueeze(0)


def _stream_backward(
    ctx: Any, dy: Tensor, x: Tensor, gr: Tensor | None, var: Tensor, mean: Tensor
) -> tuple[Tensor | None, Tensor, Tensor]:
    """dx from this call's (g, Psi) or their moving averages; returns dx and the local sums."""
    config, step = ctx.config, ctx.step
    groups = step.num_groups
    fused = (
        groups == 1
        and ctx.needs_input_grad[0]
        and x.numel() > 0
        and x.dtype == var.dtype == dy.dtype
        and _kernels.choose("grad_input", x, groups, dy) == "fused"
    )
    center = mean if config.centered else None
    partial, (sum_dy, sum_dy_xhat) = _gradient_sums(dy, x, gr, var, mean, center, step, fused)
    local = (sum_dy, sum_dy_xhat)
    if step.process_group is not None:
        sum_dy, sum_dy_xhat = _sync.reduce_backward(
            sum_dy, sum_dy_xhat, step.process_group, step.fingerprint, step.verify_sync
        )
    n = step.group_numel.to(var.dtype).view(-1, 1) if isinstance(step.group_numel, Tensor) else step.group_numel
    gr_n = gr / n if gr is not None else None
    psi = sum_dy_xhat * gr_n if gr_n is not None else sum_dy_xhat / n
    if config.centered:
        g = sum_dy * gr_n if gr_n is not None else sum_dy / n
        stats = torch.cat([g, psi])  # statistic-major: (2G, C)
    else:
        stats = psi
    if config.backward_stats == "sma":
        # The stream advances on every backward, whether or not this call needs dL/dx.
        stats = _advance_backward_stream(ctx, stats)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(dy, x, gr, var, mean, stats, config, groups, partial)
    return grad_x, local[1], local[0]


def _gradient_sums(
    dy: Tensor,
    x: Tensor,
    gr: Tensor | None,
    var_eps: Tensor,
    mean: Tensor,
    center: Tensor | None,
    step: _Step,
    fused: bool,
) -> tuple[Tensor | None, tuple[Tensor, Tensor]]:
    """Per-group sums of dL/dy and dL/dy * x_hat, (G, C) each; with ``fused`` also ``gr * invstd * dy``.

    ``mean`` is what the native kernels subtract (zeros in the uncentered form), ``center`` the
    mean or None. The fused form is one native backward call in evaluation mode: it reduces and
    writes the first term of dx in the same call.
    """
    groups = step.num_groups
    if x.numel() == 0:
        zeros = torch.zeros(groups, x.shape[1], dtype=var_eps.dtype, device=var_eps.device)
        return None, (zeros, zeros.clone())
    if fused:
        w = gr[0] if gr is not None and gr.dim() == 2 else gr
        partial, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, mean[0], var_eps[0], None, None, False, 0.0, [True, True, True]
        )
        return partial, (sum_dy.unsqueeze(0), sum_dy_xhat.unsqueeze(0))
    invstd = torch.rsqrt(var_eps)
    path = _kernels.choose("grad_sums", x, groups, dy)
    return None, _kernels.grad_sums(dy, x, center, invstd, groups, path)


def _grad_input(
    dy: Tensor,
    x: Tensor,
    gr: Tensor | None,
    var_e: Tensor,
    mean: Tensor,
    stats: Tensor,
    config: NormConfig,
    groups: int,
    partial: Tensor | None,
) -> Tensor:
    """dx = a * dy + b * x + c per (group, channel), with b = -Psi / (var + eps), c = -(b * mean + g * invstd)."""
    psi = stats[-groups:]
    b = psi / var_e  # the negative of b
    c = None
    if config.centered:
        c = b * mean - stats[:groups] * var_e.rsqrt()
    if partial is not None:  # a * dy already written by the native call (one group)
        grad = partial.addcmul_(x, per_group_channel(b, x.dim() + 1)[0], value=-1)
        return grad if c is None else grad.add_(per_group_channel(c, x.dim() + 1)[0])
    a = _times(gr, var_e.rsqrt()) if gr is not None else var_e.rsqrt()
    dyv, xv = group_view(dy, groups), group_view(x, groups)
    nd = xv.dim()
    if c is not None:
        grad = torch.addcmul(per_group_channel(c, nd), dyv, per_group_channel(a, nd))
    else:
        grad = torch.mul(dyv, per_group_channel(a, nd))
    if grad.dtype != var_e.dtype:
        grad = grad.to(var_e.dtype)
    grad.addcmul_(xv, per_group_channel(b, nd), value=-1)
    grad_x = grad.flatten(0, 1)
    return grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)


def _advance_backward_stream(ctx: Any, stats: Tensor) -> Tensor:
    """Push this backward's statistics (statistic-major, (k * G, C)) into the backward window and
    return the ones to use.

    A further backward pass through the same graph (``retain_graph=True``) pushes nothing: it uses the
    linear part of the moving average (its own statistics over the count the first pass saw) and adds
    its statistics to the entries the first pass pushed, so that two passes give the gradients and
    the window of one pass over the summed losses.
    """
    state, config, step = ctx.state, ctx.config, ctx.step
    window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
    m, k, c = window.shape
    g = step.num_groups
    entries = stats.view(k, g, c).transpose(0, 1)  # (G, k, C)
    if ctx.first_backward is not None:
        return _repeat_backward(ctx, entries, stats)
    coefficients = backward_coefficients(TableSpec.of(config), g, calls, steps, stats.dtype)
    seq = torch.cat([window.view(m * k, c).to(stats.dtype), entries.reshape(g * k, c)])
    used = torch.mm(coefficients, seq)
    finite = _all_finite(used)
    # (The backward runs without gradient recording: in-place updates need no guard.)
    new_window = seq[g * k :].view(m, k, c)
    torch.where(finite, new_window.to(window.dtype), window, out=window)
    counted = finite if step.last_call is None else finite & step.last_call
    _increment([(steps, finite, g), (calls, counted, 1)])
    # The window's version counter tells a second backward whether anything changed it since.
    ctx.first_backward = (coefficients, finite, window._version)
    return used


def _repeat_backward(ctx: Any, entries: Tensor, stats: Tensor) -> Tensor:
    """A second backward pass through the same call (see :func:`_advance_backward_stream`)."""
    window = ctx.state.backward_window
    m, k, c = window.shape
    g = entries.shape[0]
    coefficients, pushed, version = ctx.first_backward
    used = torch.mm(coefficients[:, m * k :], entries.reshape(g * k, c))
    if window._version != version:
        return used  # another call advanced the window since: its entries are not this call's any more
    j = min(m, g)
    addition = torch.zeros_like(window)
    addition[m - j :] = entries[g - j :].to(window.dtype)
    window.add_(torch.where(pushed & _all_finite(stats), addition, 0.0))
    ctx.first_backward = (coefficients, pushed, window._version)
    return used


def _eval_forward(input: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, eps: float) -> Tensor:
    """The per-channel affine of evaluation mode, with every per-channel vector in one dtype.

    The native kernel takes float16/bfloat16 input with float32 vectors and otherwise wants the
    input's dtype, so a float64 input meets float64 statistics and a half input float32 ones.
    """
    dtype = stat_dtype(input.dtype)
    running_var = _cast(state.running_var, dtype)
    running_mean = state.running_mean
    running_mean = torch.zeros_like(running_var) if running_mean is None else _cast(running_mean, dtype)
    return torch.nn.functional.batch_norm(
        input, running_mean, running_var, _cast(weight, dtype), _cast(bias, dtype), False, 0.0, eps
    )


def _batch_statistics(x: Tensor, state: NormState, config: NormConfig, dtype: torch.dtype, step: _Step) -> Tensor:
    """(G, k, C) statistics of each group, (mean, variance) or (E[x^2],); the union's when synced."""
    groups, c = step.num_groups, x.shape[1]
    if x.numel() == 0:  # an empty rank of a synced layer
        batch = torch.zeros(groups, config.num_forward_stats, c, dtype=dtype, device=x.device)
    elif config.centered:
        mean, var = _kernels.moments(
            x if x.dtype == dtype else x.to(dtype), groups, _kernels.choose("moments", x, groups)
        )
        batch = torch.stack([mean.to(dtype), var.to(dtype)], dim=1)
    else:
        path = _kernels.choose("second_moment", x, groups)
        batch = _kernels.second_moment(x, groups, dtype, path).unsqueeze(1)
    if step.process_group is None:
        return batch
    batch, step.group_numel = _sync.reduce_forward(
        batch,
        step.group_numel,
        _cast(state.running_mean, dtype),
        config,
        step.process_group,
        state.num_batches_tracked,
        step.fingerprint,
        verify=step.verify_sync,
        probe=step.probe_sync,
    )
    return batch


class _ForwardStep(NamedTuple):
    """The statistics a training call uses and the buffer updates it makes once its output exists."""

    used: _Used
    updates: list[tuple[Tensor, Tensor, Tensor | None]]  # (buffer, new value, condition or None: always)
    increments: list[tuple[Tensor, Tensor, int]]  # (counter, condition, amount)


def _forward_statistics(x: Tensor, state: NormState, config: NormConfig, step: _Step) -> _ForwardStep:
    """Every statistic of a training call from one matrix product, and the buffer updates it makes.

    ``x`` is detached and the buffers need no gradient, so nothing here is recorded by autograd.
    """
    groups, c, k = step.num_groups, x.shape[1], config.num_forward_stats
    dtype = stat_dtype(x.dtype)
    if dtype != state.running_var.dtype:
        dtype = torch.promote_types(dtype, state.running_var.dtype)
    if config.accumulate > 1:
        step.last_call = state.accum_calls == config.accumulate - 1
    batch = _batch_statistics(x, state, config, dtype, step)
    _check_group_size(step, config)
    spec = TableSpec.of(config)
    layout = forward_layout(spec, groups)
    running = [state.running_mean, state.running_var] if config.centered else [state.running_var]
    parts = [batch.reshape(groups * k, c), *(t.view(1, c) for t in running), constant("one", (1, c), dtype, x.device)]
    if state.forward_window is not None and config.forward_stats == "sma":
        parts.insert(0, state.forward_window.view(-1, c))
    rows = torch.cat(parts) if all(p.dtype == dtype for p in parts) else torch.cat([p.to(dtype) for p in parts])
    coefficients = forward_coefficients(spec, groups, state.num_batches_tracked, state.forward_steps, dtype)
    out = torch.mm(coefficients, rows)
    targets = out[layout.target]
    if config.centered:
        _unbias(targets, step)
    old_running = rows[-k - 1 : -1]
    updates: list[tuple[Tensor, Tensor, Tensor | None]] = []
    increments: list[tuple[Tensor, Tensor, int]] = []
    if config.accumulate > 1:
        finite, stored = _accumulate(state, config, out, layout, old_running, step, updates, increments)
    else:
        torch.lerp(old_running, targets, _ema_weight(state, config, dtype), out=out[layout.running])
        finite = stored = _all_finite(out)
    # A call whose statistics are not finite outputs NaN: the loss shows it and a scaler skips it.
    out = torch.where(finite, out, constant("nan", (), out.dtype, out.device))
    used = _used_statistics(out, layout, config, groups)
    for buffer, value in zip(running, out[layout.running]):
        updates.append((buffer, value, stored))
    increments.append((state.num_batches_tracked, stored, 1))
    if config.forward_stats == "sma":
        m = state.forward_window.shape[0]
        updates.append((state.forward_window, rows[groups * k : (m + groups) * k].view(m, k, c), finite))
        increments.append((state.forward_steps, finite, groups))
    return _ForwardStep(used, updates, increments)


def _check_group_size(step: _Step, config: NormConfig) -> None:
    """The centered form needs two values per channel in a group; synced, the union's count decides."""
    if not config.centered:
        return
    n = step.group_numel
    if isinstance(n, Tensor):
        # Read only when this rank alone has fewer than two values: then every rank reads the same union.
        if step.local_numel >= 2 or int(n.min()) >= 2:
            return
        n = int(n.min())
    if n < 2:
        raise ValueError(
            f"the centered form needs more than 1 value per channel in a normalization group, got {n}"
            + (" over the ranks of the process group" if step.process_group is not None else "")
        )


def _unbias(targets: Tensor, step: _Step) -> None:
    """Bessel's correction n / (n - 1) of the running-variance target, in place (n values per group).

    Synced, ``n`` is the union's count, a tensor; it is the same for every group of the call, since
    each rank splits its batch into groups of equal size.
    """
    n = step.group_numel
    if isinstance(n, Tensor):
        n = n[0].to(targets.dtype)
    targets[-1].mul_(n / (n - 1))


def _ema_weight(state: NormState, config: NormConfig, dtype: torch.dtype) -> float | Tensor:
    """The weight of the new value in the running statistics: ``momentum``, or 1 / count (cumulative)."""
    if config.momentum is not None:
        return config.momentum
    return (state.num_batches_tracked + 1).to(dtype).reciprocal()


def _accumulate(
    state: NormState,
    config: NormConfig,
    out: Tensor,
    layout: Any,
    old_running: Tensor,
    step: _Step,
    updates: list,
    increments: list,
) -> tuple[Tensor, Tensor]:
    """With ``accumulate = K``: sum the targets of the step's calls, move the running statistics once.

    Returns whether the call's statistics are finite and whether the running statistics move now.
    """
    k = old_running.shape[0]
    targets = out[layout.target]
    stats_finite = _all_finite(out[: layout.running.start])
    entry = torch.cat([targets, torch.ones_like(targets[:1])])
    pending = state.accum_sum + torch.where(stats_finite, entry, 0.0)
    count = pending[k:].clamp(min=1.0)
    torch.lerp(old_running, pending[:k] / count, _ema_weight(state, config, out.dtype), out=out[layout.running])
    finite = _all_finite(out)
    last = step.last_call
    stored = last & (pending[k, 0] > 0) & finite
    updates.append((state.accum_sum, torch.where(last, 0.0, pending), None))
    calls = state.accum_calls
    updates.append((calls, (calls + 1) % config.accumulate, None))
    return finite, stored


def _used_statistics(out: Tensor, layout: Any, config: NormConfig, groups: int) -> _Used:
    """The (G, C) statistics of the normalization from the step's output rows (already NaN-masked)."""
    var = out[layout.var]
    mean = out[layout.mean] if layout.zero is None else out[layout.zero].expand(groups, -1)
    r = d = None
    if config.renorm:
        den, bounds = out[layout.den], out[layout.bounds]
        r = torch.clamp(var / den, bounds[0], bounds[1]).sqrt_()
        if config.centered:
            d = (out[layout.shift] * den.rsqrt()).clamp_(-config.d_max, config.d_max)
    return _Used(var, mean, r, d)


def stream_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    state: NormState,
    config: NormConfig,
    training: bool,
    *,
    process_group: Any = None,
    probe_sync: bool = False,
    verify_sync: bool = False,
) -> Tensor:
    r"""Normalize ``input`` (N, C, \*) with the member of the family that ``config`` names.

    In training mode the batch is split into ``G = N / B`` consecutive groups, each one step of the
    layer's statistics stream; the buffers in ``state`` (running statistics, windows, counters) are
    updated in place, once the whole call has been computed. In evaluation mode the result is the
    per-channel affine ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta`` (no mean in the
    uncentered form).

    Non-finite values: a training call whose statistics (the group's, the moving averages, ``r``,
    ``d`` or the new running statistics) are not finite outputs NaN and leaves every buffer
    untouched, so one bad batch (an inf or NaN in ``input``, a second moment beyond the range of the
    statistics dtype, an fp16 overflow that a gradient scaler then skips) cannot poison the running
    statistics or the windows, and the loss shows it. The backward window likewise ignores
    non-finite gradients. Statistics are computed and kept in float32 for float16/bfloat16 input
    and in the input's dtype otherwise; E[x^2] is finite whenever it fits that dtype.

    Args:
        input: activations of shape (N, C, \*).
        weight: per-channel scale gamma (C,) or ``None``.
        bias: per-channel shift beta (C,) or ``None``.
        state: the layer's buffers (:class:`NormState`), updated in place in training mode.
        config: the member of the family and its hyper-parameters (:class:`NormConfig`).
        training: batch statistics and buffer updates (True) or the running statistics (False).
        process_group: a ``torch.distributed`` process group over which the statistics of each
            normalization group are synced (the union of the matching groups of every rank), or
            ``None`` for this process's statistics only. Default: ``None``.
        probe_sync: compare the ranks' calls in a two-number collective of its own before the
            statistics are reduced (see :mod:`mabn._sync`), as a layer does on its first synced
            training call. Default: ``False``.
        verify_sync: read the fingerprint that travels with the reduced statistics and raise if the
            ranks' calls differ. The layers pass ``True`` on every CPU call, where it costs nothing
            extra (on a GPU it is a host read). Default: ``False``: no check.

    Returns:
        The normalized tensor, same shape, dtype and memory format as ``input``.

    Raises:
        ValueError: an input whose shape does not fit (channels, N not divisible by the normalization
            batch, an empty input in training mode), or a centered group of one value per channel.

    Example::

        >>> import torch
        >>> from mabn import NormConfig, NormState, stream_norm
        >>> config = NormConfig(norm_batch_size=2)
        >>> state = NormState.zeros(4, config)
        >>> y = stream_norm(torch.randn(8, 4, 5, 5), None, None, state, config, True)
        >>> y.shape, int(state.forward_steps)
        (torch.Size([8, 4, 5, 5]), 4)
    """
    c = int(state.running_var.shape[0])
    synced = process_group is not None and training and _sync.world_size(process_group) > 1
    groups = check_input(input, c, config.norm_batch_size, training, synced)
    _check_state(state, config)
    if not training:
        return _eval_forward(input, weight, bias, state, config.eps)

    key = id(state.running_var)
    replay = recompute.replayed(key)
    if replay is not None:  # the recomputation of a checkpointed segment: the original call's statistics
        recompute.record(key, replay)  # for a segment checkpointed inside this one
        used, step = replay
        return _NormFunction.apply(input, weight, bias, used, state, config, step)

    numel = input.numel() // (c * groups)
    step = _Step(groups, numel, numel)
    if synced:
        step.process_group, step.fingerprint = process_group, _sync.fingerprint(c, groups, config)
        step.probe_sync = probe_sync
        step.verify_sync = verify_sync or probe_sync
    elif config.centered and numel < 2:
        _check_group_size(step, config)
    device_type = input.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # The statistics stay in their own dtype: autocast would run the stream's products in half.
        with torch.autocast(device_type, enabled=False):
            forward = _forward_statistics(input.detach(), state, config, step)
    else:
        forward = _forward_statistics(input.detach(), state, config, step)
    output = _NormFunction.apply(input, weight, bias, forward.used, state, config, step)
    recompute.record(key, (forward.used, step))
    # The buffers move only once the output exists, so an error above leaves the layer as it was.
    _commit(forward)
    return output


def _commit(forward: _ForwardStep) -> None:
    for buffer, value, condition in forward.updates:
        if value.dtype != buffer.dtype:
            value = value.to(buffer.dtype)
        if condition is None:
            buffer.copy_(value)
        else:
            torch.where(condition, value, buffer, out=buffer)
    _increment(forward.increments)


def _increment(increments: list[tuple[Tensor, Tensor, int]]) -> None:
    """counter += amount * condition for each entry, in one operation when the amounts agree."""
    counters = [counter for counter, _, _ in increments]
    _, first, amount = increments[0]
    if all(c is first and a == amount for _, c, a in increments):
        torch._foreach_add_(counters, first, alpha=amount)
    else:
        torch._foreach_add_(counters, [c if a == 1 else c * a for _, c, a in increments])
