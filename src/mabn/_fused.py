"""The fused CPU step as an autograd function: one native call forward, one backward.

The plan (:mod:`mabn._plan`) picks this path for CPU tensors in eager mode where the native library
(:mod:`mabn._native`) is built; the coefficient matrices come from the same tables as the composed
path's, selected on the host. Forward writes the layer's buffers itself once the call's statistics
are known to be finite; backward advances the backward window the same way. Synced layers split
each direction in two native calls around their one all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import _sync
from ._control import HostControl
from ._plan import Plan
from ._step import check_group_size

if TYPE_CHECKING:  # the engine's entry imports this module
    from .functional import NormState

__all__ = ["FusedFunction", "FusedCall"]

_ptr = Tensor.data_ptr


def _address(t: Tensor | None) -> int | None:
    return None if t is None else _ptr(t)


class FusedCall(NamedTuple):
    """A training call of the fused path: its sync (``(group, fingerprint, verify, probe)`` or None)."""

    sync: tuple[Any, int, bool, bool] | None


def _reduced_statistics(
    x: Tensor, state: NormState, plan: Plan, sync: tuple[Any, int, bool, bool]
) -> tuple[Tensor, Tensor]:
    """The union's statistics (G, k, C) over the process group, and its values per channel in a group."""
    native, config = plan.native, plan.config
    groups, k, c = plan.groups, config.num_forward_stats, x.shape[1]
    stats = x.new_zeros((groups, k, c))
    if x.numel() > 0:
        native.statistics(native.spec, _ptr(x), _ptr(stats))
    group, fingerprint, verify, probe = sync
    running_mean = state.running_mean
    reduced, numel = _sync.reduce_forward(
        stats,
        x.numel() // (c * groups),
        None if running_mean is None else running_mean.to(stats.dtype),
        config,
        group,
        state.num_batches_tracked,
        fingerprint,
        verify=verify,
        probe=probe,
    )
    return reduced.contiguous(), numel


def _forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, plan: Plan, call: FusedCall
) -> tuple:
    """Statistics, normalization and buffer writes of a training call; returns (y, used, last)."""
    config, native = plan.config, plan.native
    stats, numel = None, plan.numel
    if call.sync is not None:
        stats, union = _reduced_statistics(x, state, plan, call.sync)
        numel = float(union[0])
    if config.centered:
        check_group_size(numel, plan.numel, config, call.sync is not None)
    steps = state.forward_steps if config.forward_stats == "sma" else None
    coefficients = HostControl.coefficients(
        plan.forward_table, plan.forward_bounds, state.num_batches_tracked, steps, config.window
    )
    y = torch.empty_like(x)
    used = x.new_empty((4, plan.groups, x.shape[1]))
    momentum = config.momentum
    ema = momentum if momentum is not None else 1.0 / (int(state.num_batches_tracked) + 1)
    accumulating = config.accumulate > 1
    last = int(state.accum_calls) == config.accumulate - 1 if accumulating else None
    window = state.forward_window if steps is not None else None
    native.forward(
        native.spec,
        _ptr(x),
        _ptr(y),
        _address(stats),
        _ptr(coefficients),
        _address(window),
        _address(state.running_mean),
        _ptr(state.running_var),
        _address(weight),
        _address(bias),
        _ptr(used),
        _ptr(state.num_batches_tracked),
        _address(steps),
        _address(state.accum_sum),
        _address(state.accum_calls),
        config.accumulate,
        int(bool(last)),
        ema,
        numel / (numel - 1) if config.centered and numel > 1 else 1.0,
    )
    written = [state.running_var, state.num_batches_tracked]
    written += [t for t in (state.running_mean, window, steps, state.accum_sum, state.accum_calls) if t is not None]
    torch.autograd.graph.increment_version(written)
    return y, used, (numel, last)


class FusedFunction(torch.autograd.Function):
    """A training call of the fused path (``replay`` given: the recorded statistics of the call it
    recomputes, and no buffer write)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, plan, call, replay):  # type: ignore[override]
        if replay is None:
            y, used, step = _forward(x, weight, bias, state, plan, call)
        else:
            used, step = replay
            y = torch.empty_like(x)
            native = plan.native
            native.normalize(native.spec, _ptr(x), _ptr(y), _ptr(used), _address(weight), _address(bias))
        ctx.save_for_backward(x, weight, used)
        ctx.state, ctx.plan, ctx.call, ctx.step, ctx.first_backward = state, plan, call, step, None
        ctx.mark_non_differentiable(used)
        ctx.set_materialize_grads(False)  # no zero gradient is made for `used`
        return y, used, step

    @staticmethod
    def backward(ctx, dy, *_):  # type: ignore[override]
        x, weight, used = ctx.saved_tensors
        plan: Plan = ctx.plan
        state, native, config = ctx.state, plan.native, plan.config
        numel, last = ctx.step
        if dy is None:  # (gradients are not materialized for the statistics output; nor, here, for y)
            dy = torch.zeros_like(x)
        if dy.stride() != x.stride():
            dy = dy.contiguous(memory_format=_memory_format(x))
        sums = local = None
        if ctx.call.sync is not None:
            local, sums = _reduced_sums(dy, x, used, plan, ctx.call.sync)
        coefficients = window = steps = calls = None
        mode = push = 0
        if config.backward_stats == "sma":
            window, steps, calls = state.backward_window, state.backward_steps, state.backward_calls
            if ctx.first_backward is None:
                coefficients = HostControl.coefficients(
                    plan.backward_table, plan.backward_bounds, calls, steps, config.window
                )
            else:  # a further pass through the same call: average over the first pass's count, push nothing
                coefficients, pushed, version = ctx.first_backward
                mode, push = 1, int(pushed and window._version == version)
        needs = ctx.needs_input_grad
        dx = torch.empty_like(x) if needs[0] else None
        # The affine gradients are this process's own (DDP averages them over the ranks): synced, they
        # come from the local sums below, not from the reduced ones the native call sees.
        own = local is None
        grad_weight = torch.empty_like(weight) if weight is not None and needs[1] and own else None
        grad_bias = x.new_empty(x.shape[1]) if needs[2] and own else None
        pushed = native.backward(
            native.spec,
            _ptr(dy),
            _ptr(x),
            _address(dx),
            _ptr(used),
            _address(weight),
            _address(sums),
            _address(coefficients),
            _address(window),
            _address(steps),
            _address(calls),
            mode,
            push,
            _address(state.accum_sum if mode == 0 else None),
            int(bool(last)),
            float(numel),
            _address(grad_weight),
            _address(grad_bias),
        )
        if window is not None:
            torch.autograd.graph.increment_version([window, steps, calls])
            if mode == 0:
                ctx.first_backward = (coefficients, bool(pushed), window._version)
            else:
                ctx.first_backward = (coefficients, ctx.first_backward[1], window._version)
        if local is not None:
            grad_weight, grad_bias = _affine_gradients(local, used, weight, needs, plan)
        if grad_bias is not None and weight is not None and grad_bias.dtype != weight.dtype:
            grad_bias = grad_bias.to(weight.dtype)
        return dx, grad_weight, grad_bias, None, None, None, None


def _affine_gradients(sums: Tensor, used: Tensor, weight: Tensor | None, needs: tuple, plan: Plan) -> tuple:
    """gamma's and beta's gradients from the (2, G, C) local sums: sum over groups of r * sum(dy * x_hat)
    (plus d * sum(dy), centered and renormalized) and of sum(dy)."""
    grad_weight = grad_bias = None
    if weight is not None and needs[1]:
        grad_weight = (used[2] * sums[1] + used[3] * sums[0]).sum(0).to(weight.dtype)
    if needs[2]:
        grad_bias = sums[0].sum(0)
    return grad_weight, grad_bias


def _reduced_sums(
    dy: Tensor, x: Tensor, used: Tensor, plan: Plan, sync: tuple[Any, int, bool, bool]
) -> tuple[Tensor, Tensor]:
    """The backward's per-group sums (2, G, C): this process's, and the union's over the process group."""
    native = plan.native
    sums = x.new_zeros((2, plan.groups, x.shape[1]))
    if x.numel() > 0:
        native.gradient_sums(native.spec, _ptr(dy), _ptr(x), _ptr(used), _ptr(sums))
    group, fingerprint, verify, _ = sync
    sum_dy, sum_dy_xhat = _sync.reduce_backward(sums[0], sums[1], group, fingerprint, verify)
    return sums, torch.stack([sum_dy, sum_dy_xhat])


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
