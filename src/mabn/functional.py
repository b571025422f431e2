"""The normalization engine: one stateless function for BN, ghost BN, BRN, MABN and every ablation.

Every layer of this package is a point of one family (see :class:`mabn.NormConfig`):

* the *form*: centered (``(x - mu) / sigma``, BatchNorm) or uncentered (``x / chi``, MABN);
* the *forward statistics*: the statistics of the normalization group (``"batch"``) or their simple
  moving average over the last ``window`` groups (``"sma"``), optionally renormalized towards the
  exponential moving average with clipped ``r`` (and ``d`` in the centered form);
* the *backward statistics*: ``g`` (centered only) and ``Psi`` of the group (``"batch"``) or their
  simple moving average over the last ``window`` groups (``"sma"``).

A training call makes one or two passes over the activations forward (statistics, normalization)
and two backward (one reduction, the gradient), the kernels of :mod:`mabn.kernels`. Everything else
is per-channel vector work, linear in the window entries, the new statistics and the running
statistics: :mod:`mabn._stream` tabulates the coefficients, so a call computes every statistic it
uses with one matrix product whose coefficients its counters select (:mod:`mabn._step`). What a
kind of call runs is resolved once into a plan (:mod:`mabn._plan`); on a GPU and under
``torch.compile`` nothing is read on the host (:mod:`mabn._control`). The whole mathematics of the
family is written out in docs/design.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _sync, recompute
from ._autograd import NormFunction, cast
from ._fused import FusedCall, FusedFunction
from ._plan import Plan, plan_for
from ._step import Call, check_group_size, commit, forward_step
from ._stream import window_means
from .config import STAT_MODES, NormConfig
from .kernels import stat_dtype

__all__ = [
    "NormConfig",
    "NormState",
    "stream_norm",
    "STAT_MODES",
    "STATISTICS_FIELDS",
    "STREAM_FIELDS",
    "ACCUMULATION_FIELDS",
    "window_means",
]

#: The fields of :class:`NormState` that hold statistics (kept in float32 at least).
STATISTICS_FIELDS = ("running_mean", "running_var", "forward_window", "backward_window", "accum_sum")
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
    (then the counts of its finite forward and backward calls) and ``accum_calls`` is the position of the next call in its step.
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
            accum_sum=torch.zeros(accumulation_rows(config), c, **floats) if accumulating else None,
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


def accumulation_rows(config: NormConfig) -> int:
    """Rows of the pending sums under accumulation: the k running-statistics targets, the count of
    the step's finite forward calls and that of its finite backward calls."""
    return config.num_forward_stats + 2


def _eval_forward(input: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, eps: float) -> Tensor:
    """The per-channel affine of evaluation mode, with every per-channel vector in one dtype.

    The native kernel takes float16/bfloat16 input with float32 vectors and otherwise wants the
    input's dtype, so a float64 input meets float64 statistics and a half input float32 ones.
    """
    dtype = stat_dtype(input.dtype)
    running_var = cast(state.running_var, dtype)
    running_mean = state.running_mean
    running_mean = torch.zeros_like(running_var) if running_mean is None else cast(running_mean, dtype)
    return torch.nn.functional.batch_norm(
        input, running_mean, running_var, cast(weight, dtype), cast(bias, dtype), False, 0.0, eps
    )


def _batch_statistics(x: Tensor, state: NormState, plan: Plan, sync: Any) -> tuple[Tensor, int | Tensor]:
    """(G, k, C) statistics of each group, (mean, variance) or (E[x^2],), and the values per channel
    in each group (the union's when synced)."""
    groups, c = plan.groups, x.shape[1]
    numel = x.numel() // (c * groups)
    if x.numel() == 0:  # an empty rank of a synced layer
        batch = torch.zeros(groups, plan.config.num_forward_stats, c, dtype=plan.dtype, device=x.device)
    else:
        batch = plan.statistics(x, groups, plan.dtype)
    if sync is None:
        return batch, numel
    group, fingerprint, verify, probe = sync
    running_mean = state.running_mean
    return _sync.reduce_forward(
        batch,
        numel,
        None if running_mean is None else running_mean.to(plan.dtype),
        plan.config,
        group,
        state.num_batches_tracked,
        fingerprint,
        verify=verify,
        probe=probe,
    )


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
    dtype = stat_dtype(input.dtype)
    if dtype != state.running_var.dtype:
        dtype = torch.promote_types(dtype, state.running_var.dtype)
    plan = plan_for(config, input, groups, dtype, synced)
    key = id(state.running_var)
    replay = recompute.replayed(key)
    if replay is not None:  # the recomputation of a checkpointed segment: the original call's statistics
        recompute.record(key, replay)  # for a segment checkpointed inside this one
        return _replay(input, weight, bias, state, plan, replay)
    sync = None
    if synced:
        sync = (process_group, _sync.fingerprint(c, groups, config), verify_sync or probe_sync, probe_sync)
    elif config.centered and input.numel() // (c * groups) < 2:
        check_group_size(input.numel() // (c * groups), 0, config, False)
    device_type = input.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # The statistics stay in their own dtype: autocast would run the stream's products in half.
        with torch.autocast(device_type, enabled=False):
            return _train(input, weight, bias, state, plan, sync, key)
    return _train(input, weight, bias, state, plan, sync, key)


def _train(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, plan: Plan, sync: Any, key: int
) -> Tensor:
    """A training call: statistics, normalization, then (once the output exists) the buffer writes."""
    if plan.native is not None and _same_dtype(input, weight, bias):
        output, used, step = FusedFunction.apply(input, weight, bias, state, plan, FusedCall(sync), None)
        recompute.record(key, ("fused", used, step))
        return output
    if plan.paths.normalize == "native_train" and _same_dtype(input, weight, bias):
        return _native_train(input, weight, bias, state, plan, key)
    config = plan.config
    batch, numel = _batch_statistics(input.detach(), state, plan, sync)
    if config.centered:
        check_group_size(numel, input.numel() // (input.shape[1] * plan.groups), config, sync is not None)
    last = plan.control.equal(state.accum_calls, config.accumulate - 1) if config.accumulate > 1 else None
    call = Call(numel, None if sync is None else sync[:3], last)
    forward = forward_step(batch, state, plan, call)
    output = NormFunction.apply(input, weight, bias, forward.used, state, plan, call)
    recompute.record(key, (forward.used, call))
    # The buffers move only once the output exists, so an error above leaves the layer as it was.
    commit(forward, plan)
    return output


def _replay(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, plan: Plan, replay: Any
) -> Tensor:
    """The recomputed forward of a checkpointed call: the original statistics, no buffer write."""
    if replay == "native_train":
        return _native_normalize(input, weight, bias, plan)[0]
    if replay[0] == "fused":
        return FusedFunction.apply(input, weight, bias, state, plan, FusedCall(None), replay[1:])[0]
    used, call = replay
    return NormFunction.apply(input, weight, bias, used, state, plan, call)


def _same_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return all(p is None or p.dtype == x.dtype for p in (weight, bias))


def _native_normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor]:
    """BatchNorm's training kernel on one group: the output and the group's (mean, unbiased variance).

    The kernel writes the batch mean and unbiased variance into "running" buffers it is given with
    momentum 1; fresh zeros receive them, so the layer's own buffers are written only once the
    statistics are known to be finite. Its autograd node is BatchNorm's own backward.
    """
    scratch = torch.zeros(2, x.shape[1], dtype=x.dtype, device=x.device)
    y = torch.native_batch_norm(x, weight, bias, scratch[0], scratch[1], True, 1.0, plan.config.eps)[0]
    return y, scratch


def _native_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, state: NormState, plan: Plan, key: int
) -> Tensor:
    """BatchNorm's own forward for one unsynced centered group on its batch statistics (CPU, eager)."""
    y, scratch = _native_normalize(x, weight, bias, plan)
    recompute.record(key, "native_train")
    ctl, running = plan.control, [state.running_mean, state.running_var]
    if not ctl.finite(scratch):
        return y * math.nan  # the loss shows it, the gradients too; the buffers stay
    momentum = plan.config.momentum
    weight_new = momentum if momentum is not None else 1.0 / (int(state.num_batches_tracked) + 1)
    torch._foreach_lerp_(running, [scratch[0].to(running[0].dtype), scratch[1].to(running[1].dtype)], weight_new)
    state.num_batches_tracked.add_(1)
    return y
