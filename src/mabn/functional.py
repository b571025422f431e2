"""The normalization engine: one stateless function for BN, ghost BN, BRN, MABN and every ablation.

Every layer of this package is a point of one family (see :class:`mabn.NormConfig`):

* the *form*: centered (``(x - mu) / sigma``, BatchNorm) or uncentered (``x / chi``, MABN);
* the *forward statistics*: the statistics of the normalization group (``"batch"``) or their simple
  moving average over the last ``window`` groups (``"sma"``), optionally renormalized towards the
  exponential moving average with clipped ``r`` (and ``d`` in the centered form);
* the *backward statistics*: ``g`` (centered only) and ``Psi`` of the group (``"batch"``) or their
  simple moving average over the last ``window`` groups (``"sma"``).

The heavy passes over activations live in :mod:`mabn._kernels` (one pass for the statistics and one
elementwise pass forward, one gradient reduction and two elementwise passes backward); everything
here works on per-channel vectors. Counters and schedules are tensors, so there is no host
synchronization and no Python branching on tensor values.
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
from .config import STAT_MODES, NormConfig

__all__ = ["NormConfig", "NormState", "stream_norm", "STAT_MODES"]


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
        fdt = stat_dtype(dtype if dtype is not None else torch.get_default_dtype())
        f = {"device": device, "dtype": fdt}
        long = {"device": device, "dtype": torch.long}
        m, c = config.window, num_features
        sma_f, sma_b = config.forward_stats == "sma", config.backward_stats == "sma"
        accumulating = config.accumulate > 1
        return cls(
            torch.zeros(c, **f) if config.centered else None,
            torch.ones(c, **f),
            torch.tensor(0, **long),
            torch.zeros(m, config.num_forward_stats, c, **f) if sma_f else None,
            torch.tensor(0, **long) if sma_f else None,
            torch.zeros(m, config.num_backward_stats, c, **f) if sma_b else None,
            torch.tensor(0, **long) if sma_b else None,
            torch.tensor(0, **long) if sma_b else None,
            torch.zeros(config.num_forward_stats + 1, c, **f) if accumulating else None,
            torch.tensor(0, **long) if accumulating else None,
        )


def check_input(
    input: Any, num_features: int, norm_batch_size: int | None, training: bool, synced: bool = False
) -> int:
    """Validate ``input`` of shape (N, C, *) and return the number of groups ``G = N / B``."""
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
    if n == 0:
        if synced and norm_batch_size is None:
            return 1  # an empty rank still joins the collective of its one group
        raise ValueError("cannot compute batch statistics of an empty batch (N=0) in training mode")
    b = n if norm_batch_size is None else norm_batch_size
    if n % b != 0:
        raise ValueError(f"the batch size N={n} is not divisible by norm_batch_size B={b}")
    return n // b


def _sliding_mean(window: Tensor, steps: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Moving averages of a stream after pushing ``new`` (G, k, C) onto ``window`` (m, k, C).

    Returns the mean over the window ending at each new entry (G, k, C) and the window after the
    push. Entries before the start of the stream are zeros and are left out of the count. The
    entries are divided by m before they are summed, so the averages of finite entries are finite.
    """
    m, g = window.shape[0], new.shape[0]
    seq = torch.cat([window, new if new.dtype == window.dtype else new.to(window.dtype)], dim=0)
    scaled = seq / m
    if g == 1:
        sums = scaled[1:].sum(dim=0, keepdim=True)
        count = (steps + 1).clamp_(max=m)
    else:
        sums = scaled.unfold(0, m, 1)[1:].sum(dim=-1)  # (G, k, C): over the m entries ending at each new one
        count = (steps + torch.arange(1, g + 1, device=steps.device)).clamp_(max=m).view(g, 1, 1)
    return sums / count * m, seq[g:]  # the integer count promotes to the sums' dtype


def _all_finite(*tensors: Tensor | None) -> Tensor:
    """0-dim bool: no inf or NaN in any of ``tensors`` (NaN fails the comparison)."""
    flags = [t.abs().lt(math.inf).all() for t in tensors if t is not None]
    result = flags[0]
    for flag in flags[1:]:
        result = result & flag
    return result


def _unpack(packed: Tensor, config: NormConfig) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(var, r, mean, d), each (G, C) or None, from the rows of ``packed`` that ``config`` has."""
    rows = iter(packed.unbind(0))
    var = next(rows)
    r = next(rows) if config.renorm else None
    mean = next(rows) if config.centered else None
    d = next(rows) if config.centered and config.renorm else None
    return var, r, mean, d


def _sum_groups(v: Tensor) -> Tensor:
    """(G, C) -> (C,): the sum over groups (a view for one group)."""
    return v[0] if v.shape[0] == 1 else v.sum(0)


def _product(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a * b where None stands for 1."""
    if a is None:
        return b
    return a if b is None else a * b


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


@dataclasses.dataclass
class _Step:
    """What the backward of one training call needs besides tensors saved for it.

    ``count`` is the number of elements per channel in a group: an int, or a (G,) tensor of the
    union's counts when the statistics are synced over ``group``. ``last_call`` (a 0-dim bool
    tensor, None without accumulation) says whether the call ends its optimizer step.
    """

    groups: int
    count: int | Tensor
    group: Any = None
    fingerprint: int = 0
    check: bool | str = False
    last_call: Tensor | None = None


class _NormFunction(torch.autograd.Function):
    """y = gamma * r * (x - mu) / sqrt(var + eps) + gamma * d + beta per (group, channel).

    Forward inputs are the activations and affine parameters; the per-(group, channel) statistics
    come precomputed in ``packed`` (see :func:`_unpack`). The backward reduces ``dy`` once, forms
    ``g``/``Psi`` (optionally averaged over the backward window, which it advances in place), and
    writes ``dx`` in two elementwise passes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, packed, state, config, step):
        var, r, mean, d = _unpack(packed, config)
        ctx.save_for_backward(x, weight, packed)
        ctx.state, ctx.config, ctx.step, ctx.first_backward = state, config, step, None
        gamma, beta = _cast(weight, var.dtype), _cast(bias, var.dtype)
        if d is not None:
            gd = d if gamma is None else gamma * d
            beta = gd if beta is None else beta + gd
        groups = step.groups
        native_ok = x.dtype == var.dtype or (x.dtype in HALF and var.dtype == torch.float32)
        if native_ok and _kernels.choose("normalize", x, groups) == "native":
            # One group: the native inference kernel computes (x - mean) / sqrt(var + eps) * w + b in
            # one pass on every layout and returns a fresh tensor in the input's format.
            center = mean[0] if mean is not None else torch.zeros_like(var[0])
            w = _product(gamma, r[0] if r is not None else None)
            b = beta[0] if beta is not None and beta.dim() == 2 else beta
            return torch.native_batch_norm(x, w, b, center, var[0], False, 0.0, config.eps)[0]
        invstd = torch.rsqrt(var + config.eps)
        scale = _product(_product(invstd, r), gamma)  # (G, C)
        shift = -scale * mean if mean is not None else torch.zeros_like(scale)
        if beta is not None:
            shift = shift + beta
        xv = group_view(x, groups)
        nd = xv.dim()
        # Written through a view into a fresh tensor, so the output is not a view (in-place ops
        # such as ReLU(inplace=True) may follow) and keeps the input's memory format.
        y = torch.empty_like(x)
        affine = (per_group_channel(shift, nd), xv, per_group_channel(scale, nd))
        if y.dtype == scale.dtype:
            torch.addcmul(*affine, out=group_view(y, groups))
        else:
            group_view(y, groups).copy_(torch.addcmul(*affine))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, packed = ctx.saved_tensors
        config, step = ctx.config, ctx.step
        groups = step.groups
        var, r, mean, d = _unpack(packed, config)
        invstd = torch.rsqrt(var + config.eps)
        (sum_dy, sum_dy_xhat), (local_dy, local_dy_xhat) = _grad_sums(dy, x, mean, invstd, step)

        grad_x = grad_weight = grad_bias = None
        gamma = _cast(weight, var.dtype)
        gr = _product(gamma, r)  # dL/dz = gamma * r * dL/dy, z the normalized input
        count = step.count.to(var.dtype).view(-1, 1) if isinstance(step.count, Tensor) else step.count
        gr_n = gr / count if gr is not None else None
        psi = sum_dy_xhat * gr_n if gr_n is not None else sum_dy_xhat / count
        if config.centered:
            g = sum_dy * gr_n if gr_n is not None else sum_dy / count
            stats = torch.stack([g, psi], dim=1)
        else:
            stats = psi.unsqueeze(1)
        if config.backward_stats == "sma":
            # The stream advances on every backward, whether or not this call needs dL/dx.
            stats = _advance_backward_stream(ctx, stats)
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(dy, x, gr, invstd, mean, stats, groups, config.centered)
        # The affine gradients are this process's own (DDP averages them over the ranks).
        if weight is not None and ctx.needs_input_grad[1]:
            gw = local_dy_xhat if r is None else r * local_dy_xhat
            if d is not None:
                gw = gw + d * local_dy
            grad_weight = _sum_groups(gw).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = _sum_groups(local_dy).to(dy.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, step: _Step
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Per-group sums of dL/dy and dL/dy * x_hat: (the union's over the ranks when synced, this process's)."""
    groups = step.groups
    if x.numel() == 0:
        zeros = torch.zeros(groups, x.shape[1], dtype=invstd.dtype, device=invstd.device)
        local = (zeros, zeros.clone())
    else:
        path = _kernels.choose("grad_sums", x, groups, dy)
        local = _kernels.grad_sums(dy, x, mean, invstd, groups, path)
    if step.group is None:
        return local, local
    return _sync.reduce_backward(*local, step.group, step.fingerprint, step.check), local


def _grad_input(
    dy: Tensor,
    x: Tensor,
    gr: Tensor | None,
    invstd: Tensor,
    mean: Tensor | None,
    stats: Tensor,
    groups: int,
    centered: bool,
) -> Tensor:
    """dx = a * dy + b * x + c per (group, channel), in two elementwise passes."""
    a = _product(gr, invstd)
    b = invstd.square().mul_(stats[:, -1]).neg_()
    dyv, xv = group_view(dy, groups), group_view(x, groups)
    nd = xv.dim()
    if centered:
        c = -b * mean - invstd * stats[:, 0]
        grad = torch.addcmul(per_group_channel(c, nd), dyv, per_group_channel(a, nd))
    else:
        grad = torch.mul(dyv, per_group_channel(a, nd))
    if grad.dtype != invstd.dtype:
        grad = grad.to(invstd.dtype)
    grad.addcmul_(xv, per_group_channel(b, nd))
    grad_x = grad.flatten(0, 1)
    return grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)


def _advance_backward_stream(ctx: Any, stats: Tensor) -> Tensor:
    """Push this backward's (g, Psi) into the backward window; return the statistics to use.

    A further backward pass through the same graph (``retain_graph=True``) pushes nothing: it uses the
    linear part of the moving average (its own statistics over the count the first pass saw) and adds
    its statistics to the entries the first pass pushed, so that two passes give the gradients and
    the window of one pass over the summed losses.
    """
    state, config, step = ctx.state, ctx.config, ctx.step
    window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
    warmup = config.warmup_iters > 1
    if ctx.first_backward is None:
        in_warmup = calls < config.warmup_iters - 1 if warmup else None
        steps_before = steps.clone()
        sma, new_window = _sliding_mean(window, steps, stats)
        used = torch.where(in_warmup, stats, sma.to(stats.dtype)) if warmup else sma.to(stats.dtype)
        finite = _all_finite(stats, used)
        with torch.no_grad():
            window.copy_(torch.where(finite, new_window, window))
            steps.add_(finite, alpha=stats.shape[0])
            calls.add_(finite if step.last_call is None else finite & step.last_call)
        ctx.first_backward = (steps_before, in_warmup, steps.clone())
        return used
    steps_before, in_warmup, steps_after = ctx.first_backward
    linear = _sliding_mean(torch.zeros_like(window), steps_before, stats)[0].to(stats.dtype)
    used = torch.where(in_warmup, stats, linear) if warmup else linear
    m, g = window.shape[0], stats.shape[0]
    j = min(m, g)
    addition = torch.zeros_like(window)
    addition[m - j :] = stats[g - j :]
    unchanged = (steps == steps_after) & (steps_after > steps_before) & _all_finite(stats)
    with torch.no_grad():
        window.add_(torch.where(unchanged, addition, 0.0))
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


def _batch_statistics(
    x: Tensor, state: NormState, config: NormConfig, groups: int, dtype: torch.dtype, step: _Step
) -> Tensor:
    """(G, k, C) statistics of each group, (mean, variance) or (E[x^2],); the union's when synced."""
    c = x.shape[1]
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
    if step.group is None:
        return batch
    shift = _cast(state.running_mean, dtype)
    batch, step.count = _sync.reduce_forward(
        batch, step.count, shift, config, step.group, state.num_batches_tracked, step.fingerprint, step.check
    )
    return batch


def _renorm_factors(
    used_var: Tensor,
    used_mean: Tensor | None,
    running_var: Tensor,
    running_mean: Tensor | None,
    count: Tensor,
    config: NormConfig,
) -> tuple[Tensor | None, Tensor | None]:
    """The clipped renormalization r (and d, centered) towards the running statistics; None when off."""
    if not config.renorm:
        return None, None
    running_ve = running_var + config.eps
    r = ((used_var + config.eps) / running_ve).sqrt_().clamp_(1.0 / config.r_max, config.r_max)
    d = None
    if config.centered:
        d = ((used_mean - running_mean) * running_ve.rsqrt()).clamp_(-config.d_max, config.d_max)
    if config.renorm_warmup_iters > 0:  # r = 1, d = 0 while the count is at most renorm_warmup_iters
        active = count > config.renorm_warmup_iters
        r = torch.where(active, r, 1.0)
        d = torch.where(active, d, 0.0) if d is not None else None
    return r, d


def _running_updates(
    state: NormState,
    config: NormConfig,
    targets: Tensor,
    running: Tensor,
    count: Tensor,
    finite: Tensor,
    step: _Step,
) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """Buffer updates of the running statistics from this call's ``targets`` (k, C): (var[, mean]).

    Without accumulation the EMA moves once per call. With ``accumulate = K`` the targets of the K
    calls of a step are summed in ``accum_sum`` and the EMA moves once, at the step's last call,
    towards their mean. Returns the counter updates, the new running values and whether to store them.
    """
    weight = config.momentum if config.momentum is not None else count.to(running.dtype).reciprocal()
    nbt = state.num_batches_tracked
    if config.accumulate == 1:
        new = running.lerp(targets, weight)
        ok = finite & _all_finite(new)
        return [(nbt, nbt + ok)], new, ok
    k = targets.shape[0]
    pending = state.accum_sum + torch.where(finite, torch.cat([targets, torch.ones_like(targets[:1])]), 0.0)
    last = step.last_call
    n = pending[k:].clamp(min=1.0)
    new = running.lerp(pending[:k] / n, weight)
    ok = last & (pending[k, 0] > 0) & _all_finite(new)
    updates = [
        (nbt, nbt + ok),
        (state.accum_sum, torch.where(last, torch.zeros_like(pending), pending)),
        (state.accum_calls, (state.accum_calls + 1) % config.accumulate),
    ]
    return updates, new, ok


def stream_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    state: NormState,
    config: NormConfig,
    training: bool,
    *,
    process_group: Any = None,
    sync_check: bool | None = None,
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
        sync_check: compare the ranks' calls (see :mod:`mabn._sync`): ``True`` also runs a
            two-number collective first, as a layer does on its first training call; ``None``
            reads the fingerprint of CPU collectives only, where it costs nothing extra.
            Default: ``None``.

    Returns:
        The normalized tensor, same shape, dtype and memory format as ``input``.

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
    if config.forward_stats == "sma" and state.forward_window is None:
        raise ValueError("forward_stats='sma' needs state.forward_window and state.forward_steps")
    if config.backward_stats == "sma" and state.backward_window is None:
        raise ValueError("backward_stats='sma' needs state.backward_window, backward_steps and backward_calls")
    if config.centered and state.running_mean is None:
        raise ValueError("the centered form needs state.running_mean")
    if config.accumulate > 1 and state.accum_sum is None:
        raise ValueError("accumulate > 1 needs state.accum_sum and state.accum_calls")
    if not training:
        return _eval_forward(input, weight, bias, state, config.eps)

    key = id(state.running_var)
    replay = recompute.replayed(key)
    if replay is not None:  # the recomputation of a checkpointed segment: the original call's statistics
        packed, step = replay
        return _NormFunction.apply(input, weight, bias, packed, state, config, step)

    step = _Step(groups, input.numel() // (c * groups))
    if config.centered and step.count < 2 and not synced:
        raise ValueError(
            f"the centered form needs more than 1 value per channel in a normalization group, got "
            f"input shape {tuple(input.shape)} with norm_batch_size={config.norm_batch_size}"
        )
    if synced:
        step.group, step.fingerprint = process_group, _sync.fingerprint(c, groups, config)
        step.check = "first" if sync_check else (sync_check is None and input.device.type == "cpu")
    packed, updates = _forward_step(input.detach(), state, config, step)
    output = _NormFunction.apply(input, weight, bias, packed, state, config, step)
    recompute.record(key, (packed, step))
    # The buffers move only once the output exists, so an error above leaves the layer as it was.
    with torch.no_grad():
        for buffer, value in updates:
            buffer.copy_(value)
    return output


@torch.no_grad()
def _forward_step(
    x: Tensor, state: NormState, config: NormConfig, step: _Step
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """The statistics this call uses, packed for the backward, and the buffer updates it makes."""
    groups = step.groups
    dtype = torch.promote_types(stat_dtype(x.dtype), state.running_var.dtype)
    if config.accumulate > 1:
        step.last_call = state.accum_calls == config.accumulate - 1
    batch = _batch_statistics(x, state, config, groups, dtype, step)
    count = state.num_batches_tracked + 1  # this step, 1-based
    stats, new_window = batch, None
    if config.forward_stats == "sma":
        sma, new_window = _sliding_mean(state.forward_window, state.forward_steps, batch)
        sma = _cast(sma, dtype)
        # In warm-up while the count is below warmup_iters, which never holds for warmup_iters <= 1.
        stats = torch.where(count < config.warmup_iters, batch, sma) if config.warmup_iters > 1 else sma
    used_mean = stats[:, 0] if config.centered else None
    used_var = stats[:, -1]
    running_var = _cast(state.running_var, dtype)
    running_mean = _cast(state.running_mean, dtype) if config.centered else None
    r, d = _renorm_factors(used_var, used_mean, running_var, running_mean, count, config)
    rows = [used_var] + ([r] if r is not None else []) + ([used_mean] if config.centered else [])
    # Everything the backward needs in one tensor: torch.compile's partitioner never recomputes a
    # `stack` in the backward, so the backward cannot re-read buffers this forward has updated.
    packed = torch.stack(rows + ([d] if d is not None else []))
    finite = _all_finite(packed)

    # Running (EMA) statistics from the mean over the call's groups (unbiased variance, centered).
    var_target = used_var * _unbiased(step.count, used_var) if config.centered else used_var
    targets = [var_target.mean(0) if groups > 1 else var_target[0]]
    running = [running_var]
    if config.centered:
        targets.append(used_mean.mean(0) if groups > 1 else used_mean[0])
        running.append(running_mean)
    updates, new, ok = _running_updates(state, config, torch.stack(targets), torch.stack(running), count, finite, step)
    keep = finite & _all_finite(new)
    updates.append((state.running_var, torch.where(ok, new[0], running_var)))
    if config.centered:
        updates.append((state.running_mean, torch.where(ok, new[1], running_mean)))
    if new_window is not None:
        updates.append((state.forward_window, torch.where(keep, new_window, state.forward_window)))
        updates.append((state.forward_steps, state.forward_steps.add(keep, alpha=groups)))
    # A call whose statistics are not finite outputs NaN: the loss shows it and a scaler skips it.
    return packed.masked_fill(~finite, math.nan), updates


def _unbiased(count: int | Tensor, like: Tensor) -> Tensor | float:
    """n / (n - 1) per group: Bessel's correction of the running variance (n elements per channel)."""
    if isinstance(count, Tensor):
        n = count.to(like.dtype).view(-1, 1)
        return n / (n - 1)
    return count / (count - 1) if count > 1 else math.inf
