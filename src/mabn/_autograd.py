"""The normalization as an autograd function: its passes over the activations, forward and backward.

Forward, y = gamma * r * (x - mu) / sqrt(var + eps) + gamma * d + beta per (group, channel), with
the statistics precomputed (:class:`mabn._step.Used`). Backward, one reduction of dL/dy gives the
group's ``g`` and ``Psi``, which are optionally replaced by their moving averages over the backward
window (advanced in place, :func:`mabn._step.backward_stream`), and one or two elementwise passes
write dL/dx. Which kernels run is the plan's (:mod:`mabn._plan`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _sync
from ._plan import Plan
from ._step import Call, Used, backward_stream, repeat_backward
from .kernels import HALF, group_view, per_group_channel

__all__ = ["NormFunction", "cast", "normalize"]


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a * b where None stands for 1."""
    if a is None:
        return b
    return a if b is None else a * b


def _first(v: Tensor | None) -> Tensor | None:
    """The row of a (1, C) vector, or a (C,) vector as it is."""
    return v[0] if v is not None and v.dim() == 2 else v


def _sum_groups(v: Tensor) -> Tensor:
    """(G, C) -> (C,): the sum over groups (a view for one group)."""
    return v[0] if v.shape[0] == 1 else v.sum(0)


def _native_ok(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether the native kernels take ``x`` with per-channel vectors in ``dtype``."""
    return x.dtype == dtype or (x.dtype in HALF and dtype == torch.float32)


def normalize(x: Tensor, used: Used, scale: Tensor | None, shift: Tensor | None, plan: Plan) -> Tensor:
    """``scale * (x - mean) / sqrt(var_eps) + shift`` per (group, channel), in ``x``'s memory format."""
    var, mean = used.var_eps, used.mean
    if plan.paths.normalize == "native" and plan.groups == 1 and _native_ok(x, var.dtype):
        # The native inference kernel: one pass on every layout, into a fresh tensor.
        return torch.native_batch_norm(x, _first(scale), _first(shift), mean[0], var[0], False, 0.0, 0.0)[0]
    factor = torch.rsqrt(var)
    if scale is not None:
        factor = factor * scale
    if plan.config.centered:
        offset = -factor * mean
        offset = offset if shift is None else offset + shift
    else:
        offset = shift.expand_as(factor) if shift is not None else torch.zeros_like(factor)
    groups = plan.groups
    xv = group_view(x, groups)
    nd = xv.dim()
    # Written through a view into a fresh tensor, so the output is not a view (an in-place ReLU may
    # follow) and keeps the input's memory format.
    y = torch.empty_like(x)
    affine = (per_group_channel(offset, nd), xv, per_group_channel(factor, nd))
    if y.dtype == factor.dtype:
        torch.addcmul(*affine, out=group_view(y, groups))
    else:
        group_view(y, groups).copy_(torch.addcmul(*affine))
    return y


class NormFunction(torch.autograd.Function):
    """The normalization with precomputed statistics; its backward advances the backward window."""

    @staticmethod
    def forward(ctx, x, weight, bias, used, state, plan, call):  # type: ignore[override]
        var, _, r, d = used
        gamma, beta = cast(weight, var.dtype), cast(bias, var.dtype)
        if d is not None:
            gd = d if gamma is None else gamma * d
            beta = gd if beta is None else beta + gd
        gr = _times(gamma, r)  # (C,) or (G, C): dL/dz = gr * dL/dy, z the normalized input
        # The backward's coefficients travel as a saved tensor: under torch.compile the table is a
        # constant of the forward graph, which the backward's trace can only read this way.
        ctx.save_for_backward(x, weight, gr, *used, plan.backward_table)
        ctx.state, ctx.plan, ctx.call, ctx.first_backward = state, plan, call, None
        return normalize(x, used, gr, beta, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, gr, var, mean, r, d, table = ctx.saved_tensors
        plan: Plan = ctx.plan
        paths, grad_sums = plan.backward_paths(x, dy)
        if paths.grad_input == "native" and x.dtype == dy.dtype:
            grad_x, sum_dy_xhat, sum_dy = _native_backward(ctx, dy, x, gr, var, mean)
        else:
            grad_x, sum_dy_xhat, sum_dy = _stream_backward(
                ctx, dy, x, gr, Used(var, mean, r, d), paths, grad_sums, table
            )
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


def _native_backward(
    ctx: Any, dy: Tensor, x: Tensor, gr: Tensor | None, var_eps: Tensor, mean: Tensor
) -> tuple[Tensor | None, Tensor, Tensor]:
    """dL/dx, sum(dy * x_hat) and sum(dy) of one centered group with batch statistics, in one native call."""
    mask = [ctx.needs_input_grad[0], True, True]
    grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, _first(gr), None, None, mean[0], torch.rsqrt(var_eps[0]), True, 0.0, mask
    )
    return grad_x, sum_dy_xhat.unsqueeze(0), sum_dy.unsqueeze(0)


def _stream_backward(
    ctx: Any, dy: Tensor, x: Tensor, gr: Tensor | None, used: Used, paths: Any, grad_sums: Any, table: Tensor | None
) -> tuple[Tensor | None, Tensor, Tensor]:
    """dL/dx from this call's (g, Psi) or their moving averages; returns dL/dx and the local sums."""
    plan: Plan = ctx.plan
    call: Call = ctx.call
    config, groups, var, mean = plan.config, plan.groups, used.var_eps, used.mean
    fused = (
        paths.grad_input == "fused"
        and groups == 1
        and ctx.needs_input_grad[0]
        and x.numel() > 0
        and x.dtype == var.dtype == dy.dtype
    )
    partial, sum_dy, sum_dy_xhat = _gradient_sums(dy, x, gr, used, plan, fused, grad_sums)
    local = (sum_dy, sum_dy_xhat)
    if call.sync is not None:
        group, fingerprint, verify = call.sync
        sum_dy, sum_dy_xhat = _sync.reduce_backward(sum_dy, sum_dy_xhat, group, fingerprint, verify)
    n = call.numel.to(var.dtype).view(-1, 1) if isinstance(call.numel, Tensor) else call.numel
    gr_n = gr / n if gr is not None else None
    psi = sum_dy_xhat * gr_n if gr_n is not None else sum_dy_xhat / n
    if config.centered:
        g = sum_dy * gr_n if gr_n is not None else sum_dy / n
        stats = torch.cat([g, psi])  # statistic-major: (2G, C)
    else:
        stats = psi
    if config.backward_stats == "sma":
        # The stream advances on every backward, whether or not this call needs dL/dx.
        if ctx.first_backward is None:
            stats, ctx.first_backward = backward_stream(ctx.state, plan, call, stats, table)
        else:
            stats, ctx.first_backward = repeat_backward(ctx.state, plan, ctx.first_backward, stats)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(dy, x, gr, var, mean, stats, plan, partial)
    return grad_x, local[1], local[0]


def _gradient_sums(
    dy: Tensor, x: Tensor, gr: Tensor | None, used: Used, plan: Plan, fused: bool, grad_sums: Any
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Per-group sums of dL/dy and dL/dy * x_hat, (G, C) each; with ``fused`` also ``gr * invstd * dy``.

    The fused form is one native backward call in evaluation mode: it reduces and writes the first
    term of dL/dx in the same call.
    """
    var_eps, mean = used.var_eps, used.mean
    if x.numel() == 0:
        zeros = torch.zeros(plan.groups, x.shape[1], dtype=var_eps.dtype, device=var_eps.device)
        return None, zeros, zeros.clone()
    if fused:
        partial, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, _first(gr), mean[0], var_eps[0], None, None, False, 0.0, [True, True, True]
        )
        return partial, sum_dy.unsqueeze(0), sum_dy_xhat.unsqueeze(0)
    center = mean if plan.config.centered else None
    sum_dy, sum_dy_xhat = grad_sums(dy, x, center, torch.rsqrt(var_eps), plan.groups)
    return None, sum_dy, sum_dy_xhat


def _grad_input(
    dy: Tensor,
    x: Tensor,
    gr: Tensor | None,
    var_e: Tensor,
    mean: Tensor,
    stats: Tensor,
    plan: Plan,
    partial: Tensor | None,
) -> Tensor:
    """dL/dx = a * dy + b * x + c per (group, channel), with b = -Psi / (var + eps), c = -(b * mean + g * invstd)."""
    groups = plan.groups
    psi = stats[-groups:]
    b = psi / var_e  # the negative of b
    c = None
    if plan.config.centered:
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
