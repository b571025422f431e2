"""The normalization engine: one stateless function for BN, ghost BN, BRN, MABN and every ablation.

Every layer of this package is a point of one family (see ``NormConfig``):

* the *form*: centered (``(x - mu) / sigma``, BatchNorm) or uncentered (``x / chi``, MABN);
* the *forward statistics*: the statistics of the normalization group (``"batch"``) or their simple
  moving average over the last ``window`` groups (``"sma"``), optionally renormalized towards the
  exponential moving average with clipped ``r`` (and ``d`` in the centered form);
* the *backward statistics*: ``g`` (centered only) and ``Psi`` of the group (``"batch"``) or their
  simple moving average over the last ``window`` groups (``"sma"``).

The heavy passes over activations are the statistics (one pass for E[x^2], two exact ones for the
mean and variance of contiguous CPU input, else PyTorch's native statistics kernel) and one
elementwise pass forward, and one native gradient reduction and two elementwise passes backward;
everything in between works on per-channel vectors. Counters and schedules are tensors, so there is
no host synchronization and no Python branching on tensor values.
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
        momentum: weight of the new value in the running statistics, PyTorch's convention; ``None``
            keeps their cumulative average over the calls instead (weight ``1 / count``).
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
    momentum: float | None = 0.02
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
        if self.momentum is not None:
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
    seq = torch.cat([window, new if new.dtype == window.dtype else new.to(window.dtype)], dim=0)
    if g == 1:
        sums = seq[1:].sum(dim=0, keepdim=True)
        count = (steps + 1).clamp_(max=m)
    else:
        sums = seq.unfold(0, m, 1)[1:].sum(dim=-1)  # (G, k, C): sum over the m entries ending at each new one
        count = (steps + torch.arange(1, g + 1, device=steps.device)).clamp_(max=m).view(g, 1, 1)
    return sums / count, seq[g:]  # the integer count promotes to the sums' dtype


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: no inf or NaN in ``t`` (NaN fails the comparison)."""
    return t.abs().lt(math.inf).all()


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
    """Per-group, per-channel mean and biased variance, each (G, C)."""
    n, c = x.shape[0], x.shape[1]
    if _per_sample_passes(x):
        # Two passes along each sample's contiguous spatial axis (mean, then the norm of x - mean)
        # run about twice as fast on CPU as the native statistics kernel on the (N, C, *) layout and
        # stay exact: the groups' moments combine the samples' without cancellation.
        x3 = x.reshape(n, c, -1)
        mean = x3.mean(dim=-1, keepdim=True)
        var = torch.linalg.vector_norm(x3 - mean, 2, dim=-1).square_().div_(x3.shape[-1])
        means, variances = mean.view(groups, n // groups, c), var.view(groups, n // groups, c)
        group_mean = means.mean(dim=1)
        spread = (means - group_mean.unsqueeze(1)).square_().mean(dim=1)
        return group_mean, variances.mean(dim=1) + spread
    pairs = [torch.batch_norm_update_stats(xg, None, None, 0.0) for xg in _group_slices(x, groups)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _group_second_moment(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """Per-group, per-channel E[x^2], (G, C), accumulated in ``dtype``."""
    n, c = x.shape[0], x.shape[1]
    if x.is_contiguous():
        # Reducing along the contiguous spatial axis first is the fastest pass on the (N, C, *)
        # layout (several times faster than one strided reduction over samples and space); the
        # per-sample sums of squares then add up over each group's samples.
        norms = torch.linalg.vector_norm(x.reshape(n, c, -1), 2, dim=-1, dtype=dtype)  # (N, C)
        per_group = norms.square().view(groups, n // groups, c).sum(dim=1)
        return per_group / (x.numel() // (groups * c))
    # Channels-last and other layouts: the native batch-norm statistics kernel, mean^2 + var.
    mean, var = _group_moments(x.to(dtype) if dtype != x.dtype else x, groups)
    mean, var = mean.to(dtype), var.to(dtype)
    return var + mean * mean


#: Per-sample size from which contiguous CPU input is reduced sample by sample (statistics, gradients).
_PER_SAMPLE_MIN_NUMEL = 1 << 14


def _per_sample_passes(x: Tensor) -> bool:
    """Whether the statistics of ``x`` are best reduced sample by sample along the spatial axis."""
    n = x.shape[0]
    return x.device.type == "cpu" and x.dim() > 2 and x.is_contiguous() and x.numel() // n >= _PER_SAMPLE_MIN_NUMEL


def _reduction_chunk(x: Tensor, dy: Tensor, b: int) -> int:
    """Samples per call of the native backward reduction, a divisor of the group size ``b``.

    On CPU the native reduction over a contiguous (N, C, ...) batch walks each channel across all
    samples; calls over a few samples at a time keep the data of a channel together and run about
    twice as fast once a sample is large. Other layouts and devices use one call per group.
    """
    if b == 1 or not (_per_sample_passes(x) and dy.is_contiguous()):
        return b
    least = -(-x.shape[0] // 64)  # at most 64 calls
    return next((k for k in range(least, b + 1) if b % k == 0), b)


def _group_grad_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel sum(dy) and sum(dy * (x - mean)) * invstd, each (G, C)."""
    # The native kernel wants its vectors in the activations' statistics dtype (float32 for halves).
    out_dtype = invstd.dtype
    kernel_dtype = torch.promote_types(_stat_dtype(x), _stat_dtype(dy))
    if kernel_dtype != out_dtype:
        mean, invstd = mean.to(kernel_dtype), invstd.to(kernel_dtype)
    b = x.shape[0] // groups
    k = _reduction_chunk(x, dy, b)
    mask = [False, True, True]
    if groups == 1 and k == b:
        # The native backward with mask (False, True, True) only reduces: grad_weight is
        # sum(dy * (x - mean)) * invstd and grad_bias is sum(dy).
        _, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, mean[0], invstd[0], True, 0.0, mask
        )
        sum_dy, sum_dy_xhat = db.unsqueeze(0), dw.unsqueeze(0)
    else:
        per_group = b // k
        means, invstds = mean.unbind(0), invstd.unbind(0)
        dbs, dws = [], []
        for i, (dyc, xc) in enumerate(zip(dy.split(k), x.split(k))):
            g = i // per_group
            _, dw, db = torch.ops.aten.native_batch_norm_backward(
                dyc, xc, None, None, None, means[g], invstds[g], True, 0.0, mask
            )
            dws.append(dw)
            dbs.append(db)
        sum_dy, sum_dy_xhat = torch.stack(dbs), torch.stack(dws)
        if per_group > 1:
            c = sum_dy.shape[-1]
            sum_dy = sum_dy.view(groups, per_group, c).sum(1)
            sum_dy_xhat = sum_dy_xhat.view(groups, per_group, c).sum(1)
    if kernel_dtype != out_dtype:
        sum_dy, sum_dy_xhat = sum_dy.to(out_dtype), sum_dy_xhat.to(out_dtype)
    return sum_dy, sum_dy_xhat


_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Statistics of half-precision activations are accumulated and kept in float32.
    return torch.float32 if x.dtype in _HALF else x.dtype


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


class _NormFunction(torch.autograd.Function):
    """y = gamma * r * (x - mu) / sqrt(var + eps) + gamma * d + beta per (group, channel).

    Forward inputs are the activations and affine parameters; the per-(group, channel) statistics
    come precomputed in ``packed`` (see :func:`_unpack`). The backward reduces ``dy`` once, forms
    ``g``/``Psi`` (optionally averaged over the backward window, which it advances in place), and
    writes ``dx`` in two elementwise passes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, packed, state, config, groups):
        var, r, mean, d = _unpack(packed, config)
        ctx.save_for_backward(x, weight, packed)
        ctx.state, ctx.config, ctx.groups = state, config, groups
        gamma = weight.to(var.dtype) if weight is not None and weight.dtype != var.dtype else weight
        beta = bias.to(var.dtype) if bias is not None and bias.dtype != var.dtype else bias
        if d is not None:
            gd = d if gamma is None else gamma * d
            beta = gd if beta is None else beta + gd
        if groups == 1 and (x.dtype == var.dtype or (x.dtype in _HALF and var.dtype == torch.float32)):
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
        var, r, mean, d = _unpack(packed, config)
        invstd = torch.rsqrt(var + config.eps)
        n = x.numel() // (x.shape[1] * groups)  # elements per channel in one group
        center = mean if mean is not None else torch.zeros_like(var)
        # sum_dy_xhat = sum(dy * xhat), xhat = (x - mean) * invstd: the group's n * E[dL/dy * xhat].
        sum_dy, sum_dy_xhat = _group_grad_sums(dy, x, center, invstd, groups)

        grad_x = grad_weight = grad_bias = None
        gamma = weight.to(var.dtype) if weight is not None and weight.dtype != var.dtype else weight
        gr = _product(gamma, r)  # dL/dz = gamma * r * dL/dy, z the normalized input
        gr_n = gr / n if gr is not None else None
        psi = sum_dy_xhat * gr_n if gr_n is not None else sum_dy_xhat / n
        if config.centered:
            g = sum_dy * gr_n if gr_n is not None else sum_dy / n
            stats = torch.stack([g, psi], dim=1)
        else:
            stats = psi.unsqueeze(1)
        if config.backward_stats == "sma":
            # The stream advances on every backward, whether or not this call needs dL/dx.
            stats = _advance_backward_stream(state, config, stats)
        if ctx.needs_input_grad[0]:
            # dx = a * dy + b * x + c per (group, channel).
            a = _product(gr, invstd)
            b = invstd.square().mul_(stats[:, -1]).neg_()
            dyv, xv = _group_view(dy, groups), _group_view(x, groups)
            nd = xv.dim()
            if config.centered:
                c = -b * center - invstd * stats[:, 0]
                grad = torch.addcmul(_per_group_channel(c, nd), dyv, _per_group_channel(a, nd))
            else:
                grad = torch.mul(dyv, _per_group_channel(a, nd))
            if grad.dtype != invstd.dtype:
                grad = grad.to(invstd.dtype)
            grad.addcmul_(xv, _per_group_channel(b, nd))
            grad_x = grad.flatten(0, 1)
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            gw = sum_dy_xhat if r is None else r * sum_dy_xhat
            if d is not None:
                gw = gw + d * sum_dy
            grad_weight = _sum_groups(gw).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = _sum_groups(sum_dy).to(dy.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _advance_backward_stream(state: NormState, config: NormConfig, stats: Tensor) -> Tensor:
    """Push this backward's (g, Psi) into the backward window; return the statistics to use."""
    window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
    sma, new_window = _sliding_mean(window, steps, stats)
    if sma.dtype != stats.dtype:
        sma = sma.to(stats.dtype)
    # A call is in warm-up while its 1-based count is below warmup_iters; never when that is <= 1.
    used = torch.where(calls < config.warmup_iters - 1, stats, sma) if config.warmup_iters > 1 else sma
    finite = _all_finite(stats)
    with torch.no_grad():
        window.copy_(torch.where(finite, new_window, window))
        steps.add_(finite, alpha=stats.shape[0])
        calls.add_(finite)
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
            mean, var = _group_moments(x if x.dtype == dtype else x.to(dtype), groups)
            batch = torch.stack([mean, var], dim=1)  # (G, 2, C)
        else:
            batch = _group_second_moment(x, groups, dtype).unsqueeze(1)  # chi^2 = E[x^2], (G, 1, C)

        count = state.num_batches_tracked + 1  # this call, 1-based
        stats = batch
        new_window = None
        if config.forward_stats == "sma":
            sma, new_window = _sliding_mean(state.forward_window, state.forward_steps, batch)
            if sma.dtype != dtype:
                sma = sma.to(dtype)
            # In warm-up while the count is below warmup_iters, which never holds for warmup_iters <= 1.
            stats = torch.where(count < config.warmup_iters, batch, sma) if config.warmup_iters > 1 else sma

        used_mean = stats[:, 0] if config.centered else None
        used_var = stats[:, -1]
        running_var = state.running_var if state.running_var.dtype == dtype else state.running_var.to(dtype)
        running_mean = None
        if config.centered:
            running_mean = state.running_mean
            running_mean = running_mean if running_mean.dtype == dtype else running_mean.to(dtype)
        r = d = None
        if config.renorm:
            running_ve = running_var + config.eps
            r = ((used_var + config.eps) / running_ve).sqrt_().clamp_(1.0 / config.r_max, config.r_max)
            if config.centered:
                d = ((used_mean - running_mean) * running_ve.rsqrt()).clamp_(-config.d_max, config.d_max)
            if config.renorm_warmup_iters > 0:  # r = 1, d = 0 while the count is at most renorm_warmup_iters
                active = count > config.renorm_warmup_iters
                r = torch.where(active, r, 1.0)
                d = torch.where(active, d, 0.0) if d is not None else None

        # Running (EMA) statistics, once per call from the mean over the call's groups. A call with
        # non-finite statistics keeps every buffer as it was.
        finite = _all_finite(batch)
        # momentum=None: the cumulative average, as torch's BatchNorm (weight 1 / count).
        ema_weight = config.momentum if config.momentum is not None else count.to(dtype).reciprocal()
        var_target = used_var * (n / (n - 1)) if config.centered else used_var
        var_target = var_target.mean(0) if groups > 1 else var_target[0]
        updates: list[tuple[Tensor, Tensor]] = [
            (state.running_var, torch.where(finite, running_var.lerp(var_target, ema_weight), running_var)),
            (state.num_batches_tracked, state.num_batches_tracked + finite),
        ]
        if config.centered:
            mean_target = used_mean.mean(0) if groups > 1 else used_mean[0]
            updates.append(
                (
                    state.running_mean,
                    torch.where(finite, running_mean.lerp(mean_target, ema_weight), running_mean),
                )
            )
        if new_window is not None:
            updates.append((state.forward_window, torch.where(finite, new_window, state.forward_window)))
            updates.append((state.forward_steps, state.forward_steps.add(finite, alpha=groups)))

        # Everything the backward needs in one tensor: torch.compile's partitioner never recomputes a
        # `stack` in the backward, so the backward cannot re-read buffers this forward has updated.
        rows = [used_var] + ([r] if r is not None else []) + ([used_mean] if config.centered else [])
        packed = torch.stack(rows + ([d] if d is not None else []))

    output = _NormFunction.apply(input, weight, bias, packed, state, config, groups)
    # The buffers move only once the output exists, so an error above leaves the layer as it was.
    with torch.no_grad():
        for buffer, value in updates:
            buffer.copy_(value)
    return output
