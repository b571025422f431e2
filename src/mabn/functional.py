"""The normalization engine: one stateless function for BN, ghost BN, BRN, MABN and every ablation.

Every layer of this package is a point of one family (see ``NormConfig``):

* the *form*: centered (``(x - mu) / sigma``, BatchNorm) or uncentered (``x / chi``, MABN);
* the *forward statistics*: the statistics of the normalization group (``"batch"``) or their simple
  moving average over the last ``window`` groups (``"sma"``), optionally renormalized towards the
  exponential moving average with clipped ``r`` (and ``d`` in the centered form);
* the *backward statistics*: ``g`` (centered only) and ``Psi`` of the group (``"batch"``) or their
  simple moving average over the last ``window`` groups (``"sma"``).

The heavy passes over activations use PyTorch's native batch-norm kernels (statistics, gradient
reductions) and a single fused elementwise op each way; everything in between works on per-channel
vectors. Counters and schedules are tensors, so there is no host synchronization and no Python
branching on tensor values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["NormConfig", "NormState", "stream_norm", "STAT_MODES"]

STAT_MODES = ("batch", "sma")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Which member of the family a layer is, and its hyper-parameters.

    Args:
        centered: subtract the mean (BatchNorm) or normalize by the second moment only (MABN).
        forward_stats: ``"batch"`` (statistics of the group) or ``"sma"`` (moving average over
            the window). Default: ``"sma"``.
        renorm: renormalize the forward statistics towards the running (EMA) ones with clipped
            ``r`` (and ``d`` when centered), as Batch Renormalization. Default: ``True``.
        backward_stats: ``"batch"`` or ``"sma"`` for ``g`` and ``Psi``. Default: ``"sma"``.
        eps: added to the variance (second moment). Default: ``1e-5``.
        momentum: weight of the new value in the running statistics, PyTorch's convention.
        norm_batch_size: samples per normalization group ``B``; ``None`` is the whole batch.
        window: number ``m`` of groups in the moving averages. Default: 16.
        r_max: clip ``r`` to ``[1 / r_max, r_max]``. Default: 5.
        d_max: clip ``d`` to ``[-d_max, d_max]`` (centered form only). Default: 5.
        warmup_iters: training calls that use the group's statistics before the moving averages
            take over (a call is in warm-up while its 1-based count is below this). Default: 100.
        renorm_warmup_iters: ``r = 1`` and ``d = 0`` while the 1-based call count is at most this.
            Default: 1000.
    """

    centered: bool = False
    forward_stats: str = "sma"
    renorm: bool = True
    backward_stats: str = "sma"
    eps: float = 1e-5
    momentum: float = 0.02
    norm_batch_size: int | None = None
    window: int = 16
    r_max: float = 5.0
    d_max: float = 5.0
    warmup_iters: int = 100
    renorm_warmup_iters: int = 1000

    def __post_init__(self) -> None:
        for name in ("centered", "renorm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("forward_stats", "backward_stats"):
            if getattr(self, name) not in STAT_MODES:
                raise ValueError(f"{name} must be one of {STAT_MODES}, got {getattr(self, name)!r}")
        eps = _check_float("eps", self.eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        momentum = _check_float("momentum", self.momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if self.norm_batch_size is not None:
            _check_int("norm_batch_size", self.norm_batch_size, 1)
        _check_int("window", self.window, 1)
        for name in ("r_max", "d_max"):
            value = _check_float(name, getattr(self, name))
            if name == "r_max" and value < 1:
                raise ValueError(f"r_max must be >= 1, got {value}")
            if name == "d_max" and value < 0:
                raise ValueError(f"d_max must be >= 0, got {value}")
        _check_int("warmup_iters", self.warmup_iters, 0)
        _check_int("renorm_warmup_iters", self.renorm_warmup_iters, 0)

    @property
    def num_forward_stats(self) -> int:
        """Statistics per channel in the forward stream: (mu, sigma^2) or (chi^2,)."""
        return 2 if self.centered else 1

    @property
    def num_backward_stats(self) -> int:
        """Statistics per channel in the backward stream: (g, Psi) or (Psi,)."""
        return 2 if self.centered else 1


class NormState(NamedTuple):
    """The buffers a layer owns; the engine reads them and updates them in place.

    ``running_mean`` exists for the centered form only. The windows hold the last ``window``
    per-group statistics in chronological order (newest last), ``*_steps`` count the groups
    pushed so far (so that a short stream averages over fewer entries) and ``backward_calls``
    counts backward passes for the backward warm-up.
    """

    running_mean: Tensor | None
    running_var: Tensor
    num_batches_tracked: Tensor
    forward_window: Tensor | None = None
    forward_steps: Tensor | None = None
    backward_window: Tensor | None = None
    backward_steps: Tensor | None = None
    backward_calls: Tensor | None = None


def check_input(input: Tensor, num_features: int, norm_batch_size: int | None, training: bool) -> int:
    """Validate ``input`` of shape (N, C, *) and return the number of groups ``G = N / B``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got shape {tuple(input.shape)}")
    if not (input.is_floating_point()):
        raise TypeError(f"input must be a floating point tensor, got dtype {input.dtype}")
    n, c = input.shape[0], input.shape[1]
    if c != num_features:
        raise ValueError(f"expected {num_features} channels (num_features), got input with C={c}")
    if not training:
        return 1
    if n == 0:
        raise ValueError("cannot compute batch statistics of an empty batch (N=0) in training mode")
    b = n if norm_batch_size is None else norm_batch_size
    if n % b != 0:
        raise ValueError(f"the batch size N={n} is not divisible by norm_batch_size B={b}")
    return n // b


def _sliding_mean(window: Tensor, steps: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Moving averages of a stream after pushing ``new`` (G, k, C) onto ``window`` (m, k, C).

    Returns the mean over the window ending at each new entry (G, k, C) and the window after the
    push. Entries before the start of the stream are zeros and are left out of the count.
    """
    m, g = window.shape[0], new.shape[0]
    seq = torch.cat([window, new.to(window.dtype)], dim=0)
    sums = seq.unfold(0, m, 1)[1:].sum(dim=-1)  # (G, k, C): sum over the m entries ending at each new one
    position = steps + torch.arange(1, g + 1, device=steps.device)
    count = position.clamp(max=m).to(sums.dtype).view(g, 1, 1)
    return sums / count, seq[g:]


def _group_slices(x: Tensor, groups: int) -> list[Tensor]:
    b = x.shape[0] // groups
    return [x[i * b : (i + 1) * b] for i in range(groups)]


def _group_view(t: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (G, B, C, *) without a copy."""
    return t.unflatten(0, (groups, t.shape[0] // groups))


def _per_group_channel(v: Tensor, ndim: int) -> Tensor:
    """(G, C) -> (G, 1, C, 1, ...) broadcastable against a (G, B, C, *) view."""
    return v.view(v.shape[0], 1, v.shape[1], *([1] * (ndim - 3)))


def _group_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel mean and biased variance, each (G, C), in one native pass a group."""
    pairs = [torch.batch_norm_update_stats(xg, None, None, 0.0) for xg in _group_slices(x, groups)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _group_second_moment(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """Per-group, per-channel E[x^2], (G, C), accumulated in ``dtype``."""
    if x.is_contiguous():
        # One strided reduction over all groups; the fastest pass on the (N, C, *) layout.
        xv = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)
        norm = torch.linalg.vector_norm(xv, 2, dim=(1, 3), dtype=dtype)
        return norm * norm / (xv.shape[1] * xv.shape[3])
    # Channels-last and other layouts: the native batch-norm statistics kernel, mean^2 + var.
    mean, var = _group_moments(x.to(dtype) if dtype != x.dtype else x, groups)
    mean, var = mean.to(dtype), var.to(dtype)
    return var + mean * mean


def _group_grad_sums(dy: Tensor, x: Tensor, mean: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel sum(dy) and sum(dy * (x - mean)), each (G, C)."""
    # The native kernel wants its vectors in the activations' statistics dtype (float32 for halves).
    out_dtype = mean.dtype
    mean = mean.to(torch.promote_types(_stat_dtype(x), _stat_dtype(dy)))
    ones = torch.ones_like(mean[0])
    sum_dy, sum_dy_xmu = [], []
    for i, (dyg, xg) in enumerate(zip(_group_slices(dy, groups), _group_slices(x, groups))):
        # The native backward with mask (False, True, True) only reduces: grad_weight is
        # sum(dy * (x - mean)) * invstd and grad_bias is sum(dy).
        _, dw, db = torch.ops.aten.native_batch_norm_backward(
            dyg, xg, None, None, None, mean[i], ones, True, 0.0, [False, True, True]
        )
        sum_dy_xmu.append(dw)
        sum_dy.append(db)
    return torch.stack(sum_dy).to(out_dtype), torch.stack(sum_dy_xmu).to(out_dtype)


_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Statistics of half-precision activations are accumulated and kept in float32.
    return torch.float32 if x.dtype in _HALF else x.dtype


class _NormFunction(torch.autograd.Function):
    """y = x * scale + shift per (group, channel), with the family's backward estimator.

    Forward inputs are the activations and affine parameters; the per-(group, channel) statistics
    come precomputed. The backward reduces ``dy`` once, forms ``g``/``Psi`` (optionally averaged
    over the backward window, which it advances in place), and writes ``dx`` in one fused pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, packed, state, config, groups):
        invstd, r, mean, d = packed.unbind(0)
        if not config.centered:
            mean = d = None
        gamma = weight.to(invstd.dtype) if weight is not None else torch.ones_like(invstd[0])
        scale = invstd * r * gamma  # (G, C)
        shift = -scale * mean if mean is not None else torch.zeros_like(scale)
        if d is not None:
            shift = shift + gamma * d
        if bias is not None:
            shift = shift + bias.to(shift.dtype)
        ctx.save_for_backward(x, weight, packed)
        ctx.state, ctx.config, ctx.groups = state, config, groups
        if groups == 1 and (x.dtype == scale.dtype or (x.dtype in _HALF and scale.dtype == torch.float32)):
            # One group: the native inference kernel (mean 0, variance 1, eps 0) is the fastest
            # per-channel affine on every layout and returns a fresh tensor in the input's format.
            unit = torch.ones_like(scale[0])
            return torch.native_batch_norm(x, scale[0], shift[0], unit - 1, unit, False, 0.0, 0.0)[0]
        xv = _group_view(x, groups)
        nd = xv.dim()
        # Written through a view into a fresh tensor, so the output is not a view (in-place ops
        # such as ReLU(inplace=True) may follow) and keeps the input's memory format.
        y = torch.empty_like(x)
        if y.dtype == scale.dtype:
            torch.addcmul(_per_group_channel(shift, nd), xv, _per_group_channel(scale, nd), out=_group_view(y, groups))
        else:
            _group_view(y, groups).copy_(
                torch.addcmul(_per_group_channel(shift, nd), xv, _per_group_channel(scale, nd))
            )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, packed = ctx.saved_tensors
        state, config, groups = ctx.state, ctx.config, ctx.groups
        invstd, r, mean, d = packed.unbind(0)
        if not config.centered:
            mean = d = None
        n = x.numel() // (x.shape[1] * groups)  # elements per channel in one group
        center = mean if mean is not None else torch.zeros_like(invstd)
        sum_dy, sum_dy_xmu = _group_grad_sums(dy, x, center, groups)

        grad_x = grad_weight = grad_bias = None
        gamma = weight.to(invstd.dtype) if weight is not None else torch.ones_like(invstd[0])
        gr = gamma * r
        psi = gr * invstd * sum_dy_xmu / n
        stats = torch.stack([gr * sum_dy / n, psi], dim=1) if config.centered else psi.unsqueeze(1)
        if config.backward_stats == "sma":
            # The stream advances on every backward, whether or not this call needs dL/dx.
            stats = _advance_backward_stream(state, config, stats)
        if ctx.needs_input_grad[0]:
            psi_used = stats[:, -1]
            a = gr * invstd
            b = -invstd * invstd * psi_used
            dyv, xv = _group_view(dy, groups), _group_view(x, groups)
            nd = xv.dim()
            grad = torch.mul(dyv, _per_group_channel(a, nd)).to(invstd.dtype)
            grad.addcmul_(xv, _per_group_channel(b, nd))
            if config.centered:
                c = -b * center - invstd * stats[:, 0]
                grad.add_(_per_group_channel(c, nd))
            grad_x = grad.flatten(0, 1).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            gw = r * invstd * sum_dy_xmu
            if d is not None:
                gw = gw + d * sum_dy
            grad_weight = gw.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(0).to(dy.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _advance_backward_stream(state: NormState, config: NormConfig, stats: Tensor) -> Tensor:
    """Push this backward's (g, Psi) into the backward window; return the statistics to use."""
    window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
    sma, new_window = _sliding_mean(window, steps, stats)
    warm = (calls + 1) < config.warmup_iters
    used = torch.where(warm, stats, sma.to(stats.dtype))
    finite = torch.isfinite(stats).all()
    with torch.no_grad():
        window.copy_(torch.where(finite, new_window, window))
        steps.add_(finite.to(steps.dtype) * stats.shape[0])
        calls.add_(finite.to(calls.dtype))
    return used


def stream_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    state: NormState,
    config: NormConfig,
    training: bool,
) -> Tensor:
    r"""Normalize ``input`` (N, C, \*) with the member of the family that ``config`` names.

    In training mode the batch is split into ``G = N / B`` consecutive groups, each one step of the
    layer's statistics stream; the buffers in ``state`` (running statistics, windows, counters) are
    updated in place, once the whole call has been computed. In evaluation mode the result is the
    per-channel affine ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta`` (no mean in the
    uncentered form), computed by ``torch.nn.functional.batch_norm``.

    A training call whose batch statistics are not finite (an inf or NaN in ``input``) returns the
    non-finite output as BatchNorm would, but leaves every buffer untouched, so one bad batch (for
    example an fp16 overflow that a gradient scaler skips) cannot poison the running statistics or
    the windows. The same holds for the backward window.

    Args:
        input: activations of shape (N, C, \*); float16/bfloat16 statistics are computed in float32.
        weight, bias: per-channel affine parameters (C,) or ``None``.
        state: the layer's buffers (:class:`NormState`), updated in place in training mode.
        config: the member of the family and its hyper-parameters (:class:`NormConfig`).
        training: batch statistics and buffer updates (True) or the running statistics (False).

    Returns:
        The normalized tensor, same shape, dtype and memory format as ``input``.

    Example::

        >>> import torch
        >>> from mabn.functional import NormConfig, NormState, stream_norm
        >>> c = 4
        >>> state = NormState(None, torch.ones(c), torch.tensor(0), torch.zeros(16, 1, c), torch.tensor(0),
        ...                   torch.zeros(16, 1, c), torch.tensor(0), torch.tensor(0))
        >>> y = stream_norm(torch.randn(8, c, 5, 5), None, None, state, NormConfig(norm_batch_size=2), True)
        >>> y.shape, int(state.forward_steps)
        (torch.Size([8, 4, 5, 5]), 4)
    """
    groups = check_input(input, int(state.running_var.shape[0]), config.norm_batch_size, training)
    if config.forward_stats == "sma" and state.forward_window is None:
        raise ValueError("forward_stats='sma' needs state.forward_window and state.forward_steps")
    if config.backward_stats == "sma" and state.backward_window is None:
        raise ValueError("backward_stats='sma' needs state.backward_window, backward_steps and backward_calls")
    if config.centered and state.running_mean is None:
        raise ValueError("the centered form needs state.running_mean")

    if not training:
        running_mean = state.running_mean
        if running_mean is None:
            running_mean = torch.zeros_like(state.running_var)
        return torch.nn.functional.batch_norm(
            input, running_mean, state.running_var, weight, bias, False, 0.0, config.eps
        )

    n = input.numel() // (input.shape[1] * groups)
    if config.centered and n < 2:
        raise ValueError(
            f"the centered form needs more than 1 value per channel in a normalization group, got "
            f"input shape {tuple(input.shape)} with norm_batch_size={config.norm_batch_size}"
        )

    with torch.no_grad():
        x = input.detach()
        dtype = torch.promote_types(_stat_dtype(x), state.running_var.dtype)
        if config.centered:
            mean, var = _group_moments(x.to(dtype) if dtype != x.dtype else x, groups)
            batch = torch.stack([mean.to(dtype), var.to(dtype)], dim=1)  # (G, 2, C)
        else:
            batch = _group_second_moment(x, groups, dtype).unsqueeze(1)  # chi^2 = E[x^2], (G, 1, C)

        count = state.num_batches_tracked + 1  # this call, 1-based
        stats = batch
        new_window = None
        if config.forward_stats == "sma":
            sma, new_window = _sliding_mean(state.forward_window, state.forward_steps, batch)
            stats = torch.where(count < config.warmup_iters, batch, sma.to(dtype))

        used_mean = stats[:, 0] if config.centered else None
        used_var = stats[:, -1]
        invstd = torch.rsqrt(used_var + config.eps)
        r = torch.ones_like(used_var)
        d = torch.zeros_like(used_var) if config.centered else None
        running_var = state.running_var.to(dtype)
        if config.renorm:
            running_std = torch.sqrt(running_var + config.eps)
            active = count > config.renorm_warmup_iters
            r_clipped = (torch.sqrt(used_var + config.eps) / running_std).clamp(1.0 / config.r_max, config.r_max)
            r = torch.where(active, r_clipped, r)
            if config.centered:
                d_raw = (used_mean - state.running_mean.to(dtype)) / running_std
                d = torch.where(active, d_raw.clamp(-config.d_max, config.d_max), d)

        # Running (EMA) statistics, once per call from the mean over the call's groups. A call with
        # non-finite statistics keeps every buffer as it was.
        mom = config.momentum
        finite = torch.isfinite(batch).all()
        running_var_target = used_var * (n / (n - 1)) if config.centered else used_var
        updates: list[tuple[Tensor, Tensor]] = [
            (
                state.running_var,
                torch.where(finite, running_var_target.mean(0) * mom + running_var * (1.0 - mom), running_var),
            ),
            (state.num_batches_tracked, state.num_batches_tracked + finite.to(state.num_batches_tracked.dtype)),
        ]
        if config.centered:
            old_mean = state.running_mean.to(dtype)
            updates.append(
                (state.running_mean, torch.where(finite, used_mean.mean(0) * mom + old_mean * (1.0 - mom), old_mean))
            )
        if new_window is not None:
            updates.append((state.forward_window, torch.where(finite, new_window, state.forward_window)))
            updates.append((state.forward_steps, state.forward_steps + finite.to(state.forward_steps.dtype) * groups))

        # Everything the backward needs in one tensor: torch.compile's partitioner never recomputes a
        # `cat` in the backward, so the backward cannot re-read buffers this forward has updated.
        zeros = torch.zeros_like(invstd)
        packed = torch.stack([invstd, r, used_mean if config.centered else zeros, d if config.centered else zeros])

    output = _NormFunction.apply(input, weight, bias, packed, state, config, groups)
    # The buffers move only once the output exists, so an error above leaves the layer as it was.
    with torch.no_grad():
        for buffer, value in updates:
            buffer.copy_(value)
    return output
