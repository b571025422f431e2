"""The passes over activations, and the one place that picks the kernel for each of them.

Every job has a *generic* path whose number of operations does not depend on the number of
normalization groups G (what a GPU wants: one kernel launch per job, whatever G), and some jobs have
*CPU-specific* paths that are faster on this layout on a CPU (per-sample passes along the contiguous
spatial axis, one native call per group or per chunk of samples). :func:`choose` is the dispatch;
:func:`use_paths` switches the CPU-specific paths off or forces a path, for tests and benchmarks.

Jobs and paths:

* ``moments`` (per-group mean and biased variance, centered form): ``native`` (one group, PyTorch's
  statistics kernel), ``per_sample`` (CPU: exact two-pass moments of each sample, combined),
  ``native_loop`` (CPU: the native kernel per group), ``grouped`` (one ``var_mean`` on a group view);
* ``second_moment`` (per-group E[x^2], uncentered form): ``spatial`` (contiguous input: norms along
  the spatial axis, summed over each group's samples), ``native`` (one group, other layouts: the
  native kernel's ``var + mean^2``), ``native_loop`` (CPU, other layouts), ``grouped`` (one norm
  over a group view);
* ``normalize`` (the elementwise output): ``native`` (one group, the native inference kernel) or
  ``grouped`` (one ``addcmul`` on a group view: several groups, or one group of a large
  channels_last CPU input, where it is the faster of the two);
* ``grad_sums`` (per-group sums of dL/dy and dL/dy * x_hat): ``native`` (one group, the native
  backward reduction), ``chunked`` (CPU: the native reduction over chunks of samples),
  ``native_loop`` (CPU: one native call per group), ``grouped`` (two sums on a group view);
* ``grad_input`` (how dL/dx is written where the moving average replaces the batch's ``Psi``):
  ``fused`` (one group: the native backward reduces and writes ``a * dy`` in one call, one
  ``addcmul`` adds ``b * x``) or ``two_pass`` (the ``grad_sums`` reduction, then two elementwise
  passes: several groups, or on contiguous CPU input large maps or many large samples, where the
  per-sample reduction is the faster one).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["PATHS", "CPU_PATHS", "HALF", "choose", "use_paths", "stat_dtype"]

PATHS: dict[str, tuple[str, ...]] = {
    "moments": ("native", "per_sample", "native_loop", "grouped"),
    "second_moment": ("spatial", "native", "native_loop", "grouped"),
    "normalize": ("native", "grouped"),
    "grad_sums": ("native", "chunked", "native_loop", "grouped"),
    "grad_input": ("fused", "two_pass"),
}
#: Paths taken only on CPU tensors, for speed; switched off by ``use_paths(cpu_specific=False)``.
CPU_PATHS = frozenset({"per_sample", "native_loop", "chunked"})

HALF = (torch.float16, torch.bfloat16)

#: Per-sample size from which contiguous CPU input is reduced sample by sample (statistics, gradients).
PER_SAMPLE_MIN_NUMEL = 1 << 14
#: Largest spatial map (values per channel and sample) for which the fused native backward is the
#: faster one on contiguous CPU input (measured: 28 x 28 maps faster fused, 56 x 56 two-pass).
FUSED_MAX_SPATIAL = 1024
#: From this many values a channels_last CPU input is normalized by one broadcast ``addcmul``, faster
#: there than the native kernel (measured: 1-7 % less forward+backward time from 800,000 values, equal
#: at 500,000, up to 4 % more below).
GROUPED_NORMALIZE_MIN_NUMEL = 800_000
#: From this many samples (each at least ``PER_SAMPLE_MIN_NUMEL`` values) the per-sample reduction and
#: a second elementwise pass beat the fused native backward on contiguous CPU input at any map size
#: (measured: 10-20 % faster at 8-32 samples of 7 x 7 to 28 x 28 maps, 10-17 % slower at 2-4).
FUSED_MAX_BATCH = 8

# Per thread (what use_paths sets in one thread is invisible to the others).
_local = threading.local()


def _settings() -> dict[str, Any]:
    settings = getattr(_local, "settings", None)
    if settings is None:
        settings = _local.settings = {"cpu_specific": True, "forced": {}}
    return settings


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in HALF else dtype


@contextlib.contextmanager
def use_paths(cpu_specific: bool | None = None, **forced: str) -> Iterator[None]:
    """Switch the CPU-specific paths on or off and force paths by job, inside the ``with`` block.

    The setting belongs to the calling thread.

    Example::

        >>> import torch, mabn
        >>> from mabn._kernels import use_paths
        >>> with use_paths(cpu_specific=False, grad_sums="grouped"):
        ...     y = mabn.MABN2d(4, norm_batch_size=2)(torch.randn(4, 4, 3, 3))
    """
    for job, path in forced.items():
        if job not in PATHS or path not in PATHS[job]:
            raise ValueError(f"unknown kernel path {job}={path!r}; known: {PATHS}")
    settings = _settings()
    saved = dict(settings)
    if cpu_specific is not None:
        settings["cpu_specific"] = bool(cpu_specific)
    settings["forced"] = {**saved["forced"], **forced}
    try:
        yield
    finally:
        settings.update(saved)


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _per_sample_ok(x: Tensor) -> bool:
    """Large contiguous CPU samples: reduced fastest sample by sample along the spatial axis."""
    n = max(x.shape[0], 1)
    return x.device.type == "cpu" and x.dim() > 2 and x.is_contiguous() and x.numel() // n >= PER_SAMPLE_MIN_NUMEL


def choose(job: str, x: Tensor, groups: int, dy: Tensor | None = None) -> str:
    """The kernel path of ``job`` for activations ``x`` split into ``groups`` groups."""
    settings = _settings()
    forced = settings["forced"].get(job)
    if forced is not None:
        return forced
    cpu = bool(settings["cpu_specific"]) and x.device.type == "cpu"
    if job == "moments":
        # Per sample on every contiguous CPU input: as fast as the native kernel at small sizes,
        # faster at large ones, and its sums stay in range wherever the second moment's do.
        if cpu and x.dim() > 2 and x.is_contiguous():
            return "per_sample"
        return "native" if groups == 1 else ("native_loop" if cpu else "grouped")
    if job == "second_moment":
        if x.is_contiguous():
            return "spatial"
        return "native" if groups == 1 else ("native_loop" if cpu else "grouped")
    if job == "normalize":
        # On large channels_last CPU input one broadcast addcmul runs faster than the native kernel.
        if groups == 1 and not (cpu and x.numel() >= GROUPED_NORMALIZE_MIN_NUMEL and _channels_last(x)):
            return "native"
        return "grouped"
    if job == "grad_input":
        # One group: the native backward reduces and writes the first term of dx in one call. On
        # contiguous CPU input with large spatial maps, or with many large samples, its reduction is
        # slower than the per-sample one, which then pays a second elementwise pass.
        if groups > 1:
            return "two_pass"
        if cpu and x.is_contiguous() and x.dim() > 2 and (dy is None or dy.is_contiguous()):
            large_maps = x[0, 0].numel() > FUSED_MAX_SPATIAL
            many_samples = x.shape[0] >= FUSED_MAX_BATCH and _per_sample_ok(x)
            if large_maps or many_samples:
                return "two_pass"
        return "fused"
    if job == "grad_sums":
        b = x.shape[0] // groups
        if cpu and b > 1 and _per_sample_ok(x) and dy is not None and dy.is_contiguous():
            return "chunked"
        return "native" if groups == 1 else ("native_loop" if cpu else "grouped")
    raise ValueError(f"unknown kernel job {job!r}")


def group_view(t: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (G, B, C, *) without a copy."""
    return t.unflatten(0, (groups, t.shape[0] // groups))


def per_group_channel(v: Tensor, ndim: int) -> Tensor:
    """(G, C) -> (G, 1, C, 1, ...) broadcastable against a (G, B, C, *) view."""
    return v.view(v.shape[0], 1, v.shape[1], *([1] * (ndim - 3)))


def _group_dims(ndim: int) -> tuple[int, ...]:
    """The dimensions of a (G, B, C, *) view that a per-(group, channel) reduction sums over."""
    return (1, *range(3, ndim))


def _group_slices(x: Tensor, groups: int) -> list[Tensor]:
    b = x.shape[0] // groups
    return [x[i * b : (i + 1) * b] for i in range(groups)]


def moments(x: Tensor, groups: int, path: str) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel mean and biased variance, each (G, C), in ``x``'s dtype."""
    if path == "per_sample":
        # Two passes along each sample's contiguous spatial axis (mean, then the norm of x - mean) run
        # about twice as fast on CPU as the native kernel on the (N, C, *) layout and stay exact: the
        # groups' moments combine the samples' without cancellation.
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        mean = x3.mean(dim=-1, keepdim=True)
        # Scaled before squaring: the variance overflows only when it does not fit the dtype itself.
        var = torch.linalg.vector_norm(x3 - mean, 2, dim=-1).mul_(x3.shape[-1] ** -0.5).square_()
        means, variances = mean.view(groups, n // groups, c), var.view(groups, n // groups, c)
        group_mean = means.mean(dim=1)
        spread = (means - group_mean.unsqueeze(1)).mul_((n // groups) ** -0.5).square_().sum(dim=1)
        return group_mean, variances.mean(dim=1) + spread
    if path == "grouped":
        var, mean = torch.var_mean(group_view(x, groups), dim=_group_dims(x.dim() + 1), correction=0)
        return mean, var
    if path == "native":
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean.unsqueeze(0), var.unsqueeze(0)
    pairs = [torch.batch_norm_update_stats(xg, None, None, 0.0) for xg in _group_slices(x, groups)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def second_moment(x: Tensor, groups: int, dtype: torch.dtype, path: str) -> Tensor:
    """Per-group, per-channel E[x^2], (G, C), accumulated in ``dtype``.

    The norms are scaled by ``1 / sqrt(count)`` before they are squared and combined, so combining
    never overflows; each norm itself is right while the sum of squares it reduces fits ``dtype``
    (torch's norm kernels do not rescale): each sample's on the ``spatial`` path, the group's else.
    """
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // (max(groups, 1) * c)
    scale = 1.0 / math.sqrt(count) if count else 0.0
    if path == "spatial":
        # Reducing along the contiguous spatial axis first is the fastest pass on the (N, C, *) layout
        # (several times faster than one strided reduction over samples and space).
        norms = torch.linalg.vector_norm(x.reshape(n, c, -1), 2, dim=-1, dtype=dtype)  # (N, C)
        squares = norms.mul_(scale).square_()
        return squares if n == groups else squares.view(groups, n // groups, c).sum(dim=1)
    if path == "grouped":
        norms = torch.linalg.vector_norm(group_view(x, groups), 2, dim=_group_dims(x.dim() + 1), dtype=dtype)
        return norms.mul_(scale).square_()
    # The native statistics kernel: E[x^2] = var + mean^2.
    mean, var = moments(x.to(dtype) if dtype != x.dtype else x, groups, path)
    return torch.addcmul(var.to(dtype), mean.to(dtype), mean.to(dtype))


def _reduction_chunk(n: int, b: int) -> int:
    """Samples per native backward call, a divisor of the group size ``b``: at most 64 calls.

    On CPU the native reduction over a contiguous (N, C, ...) batch walks each channel across all
    samples; calls over a few samples at a time keep the data of a channel together and run about
    twice as fast once a sample is large.
    """
    least = -(-n // 64)
    return next((k for k in range(least, b + 1) if b % k == 0), b)


def grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor, groups: int, path: str
) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd``, each (G, C).

    ``mean`` is None for the uncentered form. The sums come in ``invstd``'s dtype.
    """
    out_dtype = invstd.dtype
    if path == "grouped":
        dyv, xv = group_view(dy, groups), group_view(x, groups)
        dims = _group_dims(dyv.dim())
        if dyv.dtype != out_dtype:
            dyv, xv = dyv.to(out_dtype), xv.to(out_dtype)
        centered = xv if mean is None else xv - per_group_channel(mean, xv.dim())
        return dyv.sum(dims), (dyv * centered).sum(dims).mul_(invstd)
    # The native kernel wants its vectors in the activations' statistics dtype (float32 for halves).
    kernel_dtype = torch.promote_types(stat_dtype(x.dtype), stat_dtype(dy.dtype))
    center = torch.zeros_like(invstd) if mean is None else mean
    center, scale = center.to(kernel_dtype), invstd.to(kernel_dtype)
    b = x.shape[0] // groups
    k = b if path != "chunked" else _reduction_chunk(x.shape[0], b)
    mask = [False, True, True]
    dbs, dws = [], []
    for i, (dyc, xc) in enumerate(zip(dy.split(k), x.split(k))):
        g = i * k // b
        # With mask (False, True, True) the native backward only reduces: grad_weight is
        # sum(dy * (x - mean)) * invstd and grad_bias is sum(dy).
        _, dw, db = torch.ops.aten.native_batch_norm_backward(
            dyc, xc, None, None, None, center[g], scale[g], True, 0.0, mask
        )
        dws.append(dw)
        dbs.append(db)
    sum_dy, sum_dy_xhat = torch.stack(dbs), torch.stack(dws)
    per_group = b // k
    if per_group > 1:
        c = sum_dy.shape[-1]
        sum_dy = sum_dy.view(groups, per_group, c).sum(1)
        sum_dy_xhat = sum_dy_xhat.view(groups, per_group, c).sum(1)
    return sum_dy.to(out_dtype), sum_dy_xhat.to(out_dtype)
