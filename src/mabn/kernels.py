"""The passes over the activations, and the table that picks one for each call.

A training call makes one or two passes over its activations forward (the statistics of each
normalization group, the normalization) and two backward (a reduction, dL/dx). Each *job* has
several kernels, its *paths*: a generic one whose number of operations does not depend on the
number of groups G (one launch per job on a GPU, whatever G), and paths that are faster on a CPU
for some layouts and sizes. Every kernel is a plain function of the path it implements, registered
in :data:`KERNELS`; :data:`RULES` is the table that says which path runs for which call (device,
layout, groups, sizes), first matching row first, and :func:`choose_paths` reads it once per
kind of call. :func:`use_paths` switches the CPU-specific rows off or forces paths, for tests and
benchmarks.

Jobs and their paths:

* ``second_moment`` (per-group E[x^2], the uncentered form) and ``moments`` (per-group mean and
  biased variance, the centered form), each ``(x, groups, dtype) -> (G, k, C)``;
* ``normalize``: ``native`` (one group: the native inference kernel), ``grouped`` (one ``addcmul``
  on a group view) or ``native_train`` (BatchNorm's own training kernel, which computes the
  statistics and normalizes in one call: one centered group on batch statistics, CPU);
* ``grad_sums`` (per-group sums of dL/dy and dL/dy * x_hat): ``native``, ``chunked``,
  ``native_loop``, ``grouped``;
* ``grad_input`` (how dL/dx is written): ``fused`` (one group: the native backward reduces and
  writes the first term of dL/dx in one call), ``two_pass`` (the ``grad_sums`` reduction, then the
  elementwise passes) or ``native`` (BatchNorm's own backward: batch statistics in both passes);
* ``control``: how a call reads its counters and guards its buffer writes: ``host`` (CPU, eager:
  reading a CPU tensor is a memory read, not a synchronization, so commits are plain branches) or
  ``device`` (every other device, and under ``torch.compile``: no host read at all, guards are
  ``torch.where``), see :mod:`mabn._control`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HALF",
    "KERNELS",
    "RULES",
    "Paths",
    "Site",
    "choose_paths",
    "group_view",
    "group_dims",
    "per_group_channel",
    "stat_dtype",
    "use_paths",
]

HALF = (torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in HALF else dtype


# ---- views shared by the kernels and the statistics monitor ----------------------------------------


def group_view(t: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (G, B, C, *) without a copy."""
    return t.unflatten(0, (groups, t.shape[0] // groups))


def group_dims(ndim: int) -> tuple[int, ...]:
    """The dimensions of a (G, B, C, *) view of ``ndim`` dimensions that a per-(group, channel) reduction sums over."""
    return (1, *range(3, ndim))


def per_group_channel(v: Tensor, ndim: int) -> Tensor:
    """(G, C) -> (G, 1, C, 1, ...), broadcastable against a (G, B, C, *) view of ``ndim`` dimensions."""
    return v.view(v.shape[0], 1, v.shape[1], *([1] * (ndim - 3)))


def _group_slices(x: Tensor, groups: int) -> list[Tensor]:
    return list(x.split(x.shape[0] // groups))


# ---- statistics: (x, groups, dtype) -> (G, k, C) ---------------------------------------------------


def _spatial_squares(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    # Norms along the contiguous spatial axis are the fastest pass on the (N, C, *) layout; they are
    # scaled by 1 / sqrt(count) before squaring, so combining the samples never overflows.
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // (groups * c)
    squares = torch.linalg.vector_norm(x.reshape(n, c, -1), 2, dim=-1, dtype=dtype).mul_(count**-0.5).square_()
    return squares.view(groups, 1, c) if n == groups else squares.view(groups, n // groups, c).sum(1, keepdim=True)


def _grouped_squares(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    count = x.numel() // (groups * x.shape[1])
    norms = torch.linalg.vector_norm(group_view(x, groups), 2, dim=group_dims(x.dim() + 1), dtype=dtype)
    return norms.mul_(count**-0.5).square_().unsqueeze(1)


def _squares_from_moments(moments: Callable[[Tensor, int, torch.dtype], Tensor]) -> Callable[..., Tensor]:
    """E[x^2] = var + mean^2 from a moments kernel (the native statistics kernels compute mean and var)."""

    def second_moment(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
        stats = moments(x, groups, dtype)
        return torch.addcmul(stats[:, 1:], stats[:, :1], stats[:, :1])

    return second_moment


def _native_squares(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    # One group: E[x^2] = var + mean^2 from the native statistics kernel (one reduction kernel on a GPU).
    mean, var = torch.batch_norm_update_stats(_cast_input(x, dtype), None, None, 0.0)
    return torch.addcmul(var, mean, mean).view(1, 1, -1)


def _cast_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    # The native statistics kernels accumulate half input in half precision: cast first.
    return x if x.dtype == dtype else x.to(dtype)


def _per_sample_moments(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    # Mean, then the norm of x - mean along each sample's contiguous spatial axis: about twice as fast
    # on CPU as the native kernel on this layout, and exact (the group combines its samples' moments
    # without cancellation). Scaled before squaring: overflows only where the variance itself does.
    x = _cast_input(x, dtype)
    n, c = x.shape[0], x.shape[1]
    x3 = x.reshape(n, c, -1)
    mean = x3.mean(dim=-1, keepdim=True)
    var = torch.linalg.vector_norm(x3 - mean, 2, dim=-1).mul_(x3.shape[-1] ** -0.5).square_()
    b = n // groups
    means, variances = mean.view(groups, b, c), var.view(groups, b, c)
    group_mean = means.mean(dim=1)
    spread = (means - group_mean.unsqueeze(1)).mul_(b**-0.5).square_().sum(dim=1)
    return torch.stack([group_mean, variances.mean(dim=1) + spread], dim=1)


def _native_moments(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    mean, var = torch.batch_norm_update_stats(_cast_input(x, dtype), None, None, 0.0)
    return torch.stack([mean, var]).to(dtype).unsqueeze(0)


def _native_loop_moments(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    pairs = [torch.batch_norm_update_stats(_cast_input(xg, dtype), None, None, 0.0) for xg in _group_slices(x, groups)]
    return torch.stack([torch.stack(p) for p in pairs]).to(dtype)


def _grouped_moments(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    x = _cast_input(x, dtype)
    var, mean = torch.var_mean(group_view(x, groups), dim=group_dims(x.dim() + 1), correction=0)
    return torch.stack([mean, var], dim=1)


# ---- backward reductions: per-group sum(dy) and sum(dy * (x - mean)) * invstd, each (G, C) ------


def _grouped_grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    dyv, xv = group_view(dy, groups), group_view(x, groups)
    dims = group_dims(dyv.dim())
    if dyv.dtype != invstd.dtype:
        dyv, xv = dyv.to(invstd.dtype), xv.to(invstd.dtype)
    centered = xv if mean is None else xv - per_group_channel(mean, xv.dim())
    return dyv.sum(dims), (dyv * centered).sum(dims).mul_(invstd)


def _reduction_chunk(n: int, b: int) -> int:
    """Samples per native backward call, a divisor of the group size ``b``: at most 64 calls.

    On CPU the native reduction over a contiguous (N, C, ...) batch walks each channel across all
    samples; calls over a few samples at a time keep a channel's data together and run about twice
    as fast once a sample is large.
    """
    least = -(-n // 64)
    return next((k for k in range(least, b + 1) if b % k == 0), b)


def _native_sums(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, groups: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """The native backward reduction over slices of ``chunk`` samples, summed per group."""
    kernel_dtype = torch.promote_types(stat_dtype(x.dtype), stat_dtype(dy.dtype))
    center = (torch.zeros_like(invstd) if mean is None else mean).to(kernel_dtype)
    scale = invstd.to(kernel_dtype)
    b = x.shape[0] // groups
    mask = [False, True, True]  # reduce only: grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy)
    dws, dbs = [], []
    for i, (dyc, xc) in enumerate(zip(dy.split(chunk), x.split(chunk))):
        g = i * chunk // b
        _, dw, db = torch.ops.aten.native_batch_norm_backward(
            dyc, xc, None, None, None, center[g], scale[g], True, 0.0, mask
        )
        dws.append(dw)
        dbs.append(db)
    sum_dy, sum_dy_xhat = torch.stack(dbs), torch.stack(dws)
    per_group = b // chunk
    if per_group > 1:
        c = sum_dy.shape[-1]
        sum_dy, sum_dy_xhat = sum_dy.view(groups, per_group, c).sum(1), sum_dy_xhat.view(groups, per_group, c).sum(1)
    return sum_dy.to(invstd.dtype), sum_dy_xhat.to(invstd.dtype)


def _native_grad_sums(dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return _native_sums(dy, x, mean, invstd, groups, x.shape[0] // groups)


def _chunked_grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    return _native_sums(dy, x, mean, invstd, groups, _reduction_chunk(x.shape[0], x.shape[0] // groups))


#: job -> path -> kernel. ``normalize``, ``grad_input`` and ``control`` name strategies that the
#: engine composes from these kernels and the native ones (see the module docstring).
KERNELS: dict[str, dict[str, Callable[..., Any]]] = {
    "second_moment": {
        "spatial": _spatial_squares,
        "native": _native_squares,
        "native_loop": _squares_from_moments(_native_loop_moments),
        "grouped": _grouped_squares,
    },
    "moments": {
        "per_sample": _per_sample_moments,
        "native": _native_moments,
        "native_loop": _native_loop_moments,
        "grouped": _grouped_moments,
    },
    "grad_sums": {
        "native": _native_grad_sums,
        "chunked": _chunked_grad_sums,
        "native_loop": _native_grad_sums,  # one native call per group: the same calls as "native" at G > 1
        "grouped": _grouped_grad_sums,
    },
}
#: The strategies that are not a single kernel.
STRATEGIES: dict[str, tuple[str, ...]] = {
    "normalize": ("native", "grouped", "native_train"),
    "grad_input": ("fused", "two_pass", "native"),
    "control": ("host", "device"),
    "step": ("fused", "composed"),
}


# ---- the dispatch table ------------------------------------------------------------------------------


class Site(NamedTuple):
    """What the choice of paths depends on, for one kind of call."""

    cpu: bool  # a CPU tensor, and the CPU-specific rows switched on
    eager: bool  # plain tensors outside torch.compile / torch.export: host reads allowed
    layout: str  # "contiguous", "channels_last" or "other"
    groups: int
    batch: int  # N
    sample_numel: int  # values per sample
    map_numel: int  # values per channel and sample
    batch_forward: bool  # one unsynced centered group normalized with its own statistics, input in the statistics dtype
    batch_backward: bool  # one unsynced centered group with its own statistics backward, input in the statistics dtype
    fusable: bool  # the fused CPU step computes this call's configuration and dtypes
    threads: int  # torch's intra-op threads


#: Per-sample size from which contiguous CPU input is reduced sample by sample (statistics, gradients).
PER_SAMPLE_MIN_NUMEL = 1 << 14
#: Largest spatial map for which the fused native backward beats the per-sample reduction on
#: contiguous CPU input (measured: 28 x 28 maps faster fused, 56 x 56 two-pass).
FUSED_MAX_SPATIAL = 1024
#: From this many samples of at least PER_SAMPLE_MIN_NUMEL values the per-sample reduction and a second
#: elementwise pass beat the fused native backward on contiguous CPU input (measured at 7x7 to 28x28 maps).
FUSED_MAX_BATCH = 8
#: With several torch threads, the (single-threaded) fused step takes inputs of at most this many values
#: divided by the threads; larger ones go to torch's parallel kernels. (Measured at 2 threads: the fused
#: step is faster on contiguous input up to 3.2 M values, on channels_last up to about 1 M.)
FUSED_PARALLEL_MAX_NUMEL = 1 << 21
#: From this many values one broadcast ``addcmul`` normalizes channels_last CPU input faster than the
#: native kernel (measured: 1-7 % from 800,000 values, equal at 500,000, up to 4 % slower below).
GROUPED_NORMALIZE_MIN_NUMEL = 800_000


def _large_samples(s: Site) -> bool:
    return s.sample_numel >= PER_SAMPLE_MIN_NUMEL


#: job -> rows ``(path, condition)``; the first row whose condition holds for the call's :class:`Site`
#: gives the path. Rows that test ``s.cpu`` are the CPU-specific ones.
RULES: dict[str, tuple[tuple[str, Callable[[Site], bool]], ...]] = {
    "second_moment": (
        # CPU: norms along the contiguous spatial axis are the fastest pass; elsewhere one reduction kernel.
        ("spatial", lambda s: s.cpu and s.layout == "contiguous"),
        ("native", lambda s: s.groups == 1),
        ("native_loop", lambda s: s.cpu),
        ("grouped", lambda s: True),
    ),
    "moments": (
        # As fast as the native kernel at small sizes and faster at large ones; its sums stay in range
        # wherever the second moment's do.
        ("per_sample", lambda s: s.cpu and s.layout == "contiguous"),
        ("native", lambda s: s.groups == 1),
        ("native_loop", lambda s: s.cpu),
        ("grouped", lambda s: True),
    ),
    "normalize": (
        ("native_train", lambda s: s.batch_forward and s.cpu and s.eager),
        ("grouped", lambda s: s.groups > 1),
        (
            "grouped",
            lambda s: s.cpu and s.layout == "channels_last" and s.sample_numel * s.batch >= GROUPED_NORMALIZE_MIN_NUMEL,
        ),
        ("native", lambda s: True),
    ),
    "grad_sums": (
        ("chunked", lambda s: s.cpu and s.layout == "contiguous" and s.batch > s.groups and _large_samples(s)),
        ("native", lambda s: s.groups == 1),
        ("native_loop", lambda s: s.cpu),
        ("grouped", lambda s: True),
    ),
    "grad_input": (
        ("native", lambda s: s.batch_backward),
        ("two_pass", lambda s: s.groups > 1),
        # On contiguous CPU input with large maps, or many large samples, the per-sample reduction
        # is faster than the fused one and pays for a second elementwise pass.
        ("two_pass", lambda s: s.cpu and s.layout == "contiguous" and s.map_numel > FUSED_MAX_SPATIAL),
        ("two_pass", lambda s: s.cpu and s.layout == "contiguous" and s.batch >= FUSED_MAX_BATCH and _large_samples(s)),
        ("fused", lambda s: True),
    ),
    "control": (
        ("host", lambda s: s.cpu and s.eager),
        ("device", lambda s: True),
    ),
    "step": (
        # One native call per direction (mabn._native): the per-call vector work costs no dispatches.
        # Single-threaded: with several threads, large inputs go to torch's parallel kernels.
        (
            "fused",
            lambda s: (
                s.cpu and s.eager and s.fusable and s.layout != "other" and _fused_size(s) and _native_available()
            ),
        ),
        ("composed", lambda s: True),
    ),
}


def _fused_size(s: Site) -> bool:
    return s.threads == 1 or s.batch * s.sample_numel * s.threads <= FUSED_PARALLEL_MAX_NUMEL


def _native_available() -> bool:
    from . import _native

    return _native.library() is not None


@dataclasses.dataclass(frozen=True)
class Paths:
    """The path of every job for one kind of call (see :data:`RULES`)."""

    second_moment: str
    moments: str
    normalize: str
    grad_sums: str
    grad_input: str
    control: str
    step: str


class _ThreadSettings(threading.local):
    """What :func:`use_paths` has set, per thread; every thread starts from the defaults."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {"cpu_specific": True, "forced": {}}


# Every attribute exists from the start in every thread: a compiled caller sees the same attributes
# on every call (reading one that may be missing would make torch.compile guard on its absence).
_local = _ThreadSettings()


def _settings() -> dict[str, Any]:
    return _local.settings


def _layout(x: Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "other"


def site(
    x: Tensor, groups: int, native_train: bool = False, native_backward: bool = False, fusable: bool = False
) -> Site:
    """The :class:`Site` of a call on ``x`` split into ``groups`` groups.

    ``native_train`` / ``native_backward``: the call's forward / backward is BatchNorm's own (one
    unsynced centered group on its batch statistics), so the native training kernels apply.
    ``fusable``: the fused CPU step computes the call's configuration and dtypes.
    """
    n, c = max(x.shape[0], 1), x.shape[1]
    sample = x.numel() // n
    cpu = x.device.type == "cpu" and bool(_settings()["cpu_specific"])
    eager = type(x) is Tensor and not torch.compiler.is_compiling()
    nonempty = x.numel() > 0
    return Site(
        cpu,
        eager,
        _layout(x),
        groups,
        x.shape[0],
        sample,
        sample // max(c, 1),
        native_train and nonempty,
        native_backward and nonempty,
        fusable and nonempty and x.dtype in (torch.float32, torch.float64),
        torch.get_num_threads() if eager else 0,  # (traced: the fused step is not taken anyway)
    )


def choose_paths(s: Site) -> Paths:
    """Every job's path for the call :class:`Site` ``s`` describes (forced paths first)."""
    forced = _settings()["forced"]
    chosen = {}
    for job, rows in RULES.items():
        chosen[job] = forced.get(job) or next(path for path, holds in rows if holds(s))
    # BatchNorm's own kernels compute BatchNorm only: a forced path cannot make another call take them.
    if chosen["grad_input"] == "native" and not s.batch_backward:
        chosen["grad_input"] = "two_pass" if s.groups > 1 else "fused"
    if chosen["normalize"] == "native_train" and not (s.batch_forward and s.eager):
        chosen["normalize"] = "native"
    return Paths(**chosen)


def settings_key() -> tuple[Any, ...]:
    """What :func:`use_paths` has set in this thread, as part of a cache key."""
    settings = _settings()
    return (settings["cpu_specific"], tuple(sorted(settings["forced"].items())))


@contextlib.contextmanager
def use_paths(cpu_specific: bool | None = None, **forced: str) -> Iterator[None]:
    """Switch the CPU-specific paths on or off and force paths by job, inside the ``with`` block.

    The setting belongs to the calling thread. ``cpu_specific=False`` runs what a GPU runs.

    Example::

        >>> import torch, mabn
        >>> from mabn.kernels import use_paths
        >>> with use_paths(cpu_specific=False, grad_sums="grouped"):
        ...     y = mabn.MABN2d(4, norm_batch_size=2)(torch.randn(4, 4, 3, 3))
    """
    for job, path in forced.items():
        known = (*KERNELS.get(job, {}), *STRATEGIES.get(job, ()))
        if path not in known:
            raise ValueError(f"unknown kernel path {job}={path!r}; known: {known or tuple(RULES)}")
    settings = _settings()
    saved = dict(settings)
    if cpu_specific is not None:
        settings["cpu_specific"] = bool(cpu_specific)
    settings["forced"] = {**saved["forced"], **forced}
    try:
        yield
    finally:
        settings.update(saved)
