"""The statistics stream of a layer as coefficient tables: windows, warm-ups and renormalization in one matmul.

Everything a training call does to its per-channel vectors is linear in the rows of one matrix
``V`` (each row a vector over the C channels): the window's entries, the call's new group
statistics and the running statistics. Which linear combination a call needs (the moving average
over how many entries, the group's own statistics during the warm-up, the running statistics as
the renormalization reference once it is on) depends only on the layer's counters. So all of them
are tabulated once per configuration, and a call reads its coefficient matrix ``A`` from the table
with the counters as indices and computes every statistic it uses with one ``A @ V``: a handful of
operations whatever the configuration, with no host synchronization and no branching on tensor
values. The window entries are selected with coefficient 1 and the others with 0, so the group's own
statistics come out exactly; the averages use coefficients ``1 / count``, so an average of finite
entries is finite.

Rows of ``V`` (``k`` statistics per group: ``(mean, variance)`` centered, ``(E[x^2],)`` uncentered):
the ``m`` window entries (oldest first), the ``G`` groups of the call, the running statistics and a
row of ones (for constants such as ``eps``); entry ``e`` of that sequence, statistic ``s``, is row
``e * k + s``. After the call the window is the rows of the last ``m`` entries, a contiguous slice
of ``V``.

Tables and constants are built once per key and never modified: every layer and thread shares them
(building is serialized by a lock). ``torch.compile`` takes them as constants of the graph.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from .config import NormConfig

__all__ = ["TableSpec", "forward_layout", "forward_table", "backward_table", "constant", "cached", "window_means"]

T = TypeVar("T")

_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple[Any, ...], build: Callable[[], T]) -> T:
    """The read-only value under ``key``, built by ``build()`` on first use (thread-safe; under
    ``torch.compile`` it is built in the graph instead)."""
    if torch.compiler.is_compiling():
        # Traced into the graph as a constant. The cache is not even read: the compiler would guard
        # on its contents, and another trace (the backward's) filling it would force a recompile.
        return build()
    value = _CACHE.get(key)
    if value is None:
        with _CACHE_LOCK:
            value = _CACHE.get(key)
            if value is None:
                value = _CACHE[key] = build()
    return value


class TableSpec(NamedTuple):
    """What the tables of a layer depend on (a plain tuple: a constant for ``torch.compile``)."""

    centered: bool
    forward_sma: bool
    renorm: bool
    backward_sma: bool
    window: int
    warmup_iters: int
    renorm_warmup_iters: int
    eps: float
    r_max: float

    @classmethod
    def of(cls, config: NormConfig) -> TableSpec:
        return cls(
            config.centered,
            config.forward_stats == "sma",
            config.renorm,
            config.backward_stats == "sma",
            config.window,
            config.warmup_iters,
            config.renorm_warmup_iters,
            config.eps,
            config.r_max,
        )


@dataclasses.dataclass(frozen=True)
class ForwardLayout:
    """Where each statistic sits among the rows of a forward step's output ``A @ V``.

    ``var``: the variance (second moment) each group uses, plus ``eps``; ``den``: the running
    variance plus ``eps``, the reference of ``r``; ``bounds``: two constant rows, the clipping range
    of ``r^2`` (``1/r_max^2, r_max^2`` once renormalization is on, ``1, 1`` before, so that ``r`` is
    exactly 1); ``mean``: each group's mean (centered); ``shift``: mean minus running mean once
    renormalization is on, else 0 (centered, renormalized: ``d``); ``zero``: a zero row
    (uncentered: the mean the normalization subtracts); ``target``: the mean over groups of each
    statistic, towards which the running statistics move; ``running``: rows left zero, for the new
    running statistics.
    """

    var: slice
    den: slice | None
    bounds: slice | None
    mean: slice | None
    shift: slice | None
    zero: slice | None
    target: slice
    running: slice
    rows: int


def forward_layout(spec: TableSpec, num_groups: int) -> ForwardLayout:
    """The rows of the forward output for ``num_groups`` groups (cached)."""
    return cached(("layout", spec, num_groups), lambda: _forward_layout(spec, num_groups))


def _forward_layout(spec: TableSpec, num_groups: int) -> ForwardLayout:
    g, k = num_groups, 2 if spec.centered else 1
    position = 0

    def take(n: int) -> slice:
        nonlocal position
        position += n
        return slice(position - n, position)

    var = take(g)
    den = take(g) if spec.renorm else None
    bounds = take(2) if spec.renorm else None
    mean = take(g) if spec.centered else None
    shift = take(g) if spec.centered and spec.renorm else None
    zero = None if spec.centered else take(1)
    target, running = take(k), take(k)
    return ForwardLayout(var, den, bounds, mean, shift, zero, target, running, position)


def _average(row: list[float], stat: int, k: int, window: int, group: int, count: int, scale: float = 1.0) -> None:
    """Add to ``row`` the average of statistic ``stat`` over the ``count`` entries ending at new group ``group``."""
    last = window + group
    for entry in range(last - count + 1, last + 1):
        row[entry * k + stat] += scale / count


def _forward_phases(spec: TableSpec) -> list[int]:
    """The counts of ``num_batches_tracked`` at which a forward call changes behaviour."""
    boundaries = set()
    if spec.forward_sma and spec.warmup_iters > 1:
        boundaries.add(spec.warmup_iters - 1)  # from here count = n + 1 >= warmup_iters: the moving averages
    if spec.renorm and spec.renorm_warmup_iters > 0:
        boundaries.add(spec.renorm_warmup_iters)  # from here count > renorm_warmup_iters: r and d on
    return sorted(boundaries)


def _forward_matrix(spec: TableSpec, g: int, n: int, filled: int) -> list[list[float]]:
    """The coefficients of a call with ``g`` groups at step count ``n`` with ``filled`` window entries."""
    k = 2 if spec.centered else 1
    m = spec.window if spec.forward_sma else 0
    layout = _forward_layout(spec, g)
    running = (m + g) * k
    ones = running + k
    a = [[0.0] * (ones + 1) for _ in range(layout.rows)]
    moving = spec.forward_sma and n + 1 >= spec.warmup_iters
    active = spec.renorm and n + 1 > spec.renorm_warmup_iters
    counts = [min(filled + i + 1, m) if moving else 1 for i in range(g)]
    for i, count in enumerate(counts):
        _average(a[layout.var.start + i], k - 1, k, m, i, count)
        a[layout.var.start + i][ones] = spec.eps
        for s in range(k):
            _average(a[layout.target.start + s], s, k, m, i, count, 1.0 / g)
        if layout.den is not None:
            a[layout.den.start + i][running + k - 1] = 1.0
            a[layout.den.start + i][ones] = spec.eps
        if layout.mean is not None:
            _average(a[layout.mean.start + i], 0, k, m, i, count)
        if layout.shift is not None and active:
            _average(a[layout.shift.start + i], 0, k, m, i, count)
            a[layout.shift.start + i][running] = -1.0
    if layout.bounds is not None:
        lo, hi = (spec.r_max**-2, spec.r_max**2) if active else (1.0, 1.0)
        a[layout.bounds.start][ones], a[layout.bounds.start + 1][ones] = lo, hi
    return a


def _forward_table(spec: TableSpec, num_groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    def build() -> Tensor:
        phases = [0, *_forward_phases(spec)]
        fills = range(spec.window + 1 if spec.forward_sma else 1)
        data = [[_forward_matrix(spec, num_groups, n, f) for f in fills] for n in phases]
        return torch.tensor(data, dtype=torch.float64).to(device=device, dtype=dtype)

    return cached(("forward", spec, num_groups, dtype, device), build)


def forward_table(
    spec: TableSpec, num_groups: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, tuple[int, ...]]:
    """The (phases, fills, rows_out, rows_in) coefficients of a forward step and the call counts
    at which the phase changes (a call at count ``n`` is in phase ``bisect_right(bounds, n)``)."""
    bounds = cached(("phases", spec), lambda: tuple(_forward_phases(spec)))
    return _forward_table(spec, num_groups, dtype, device), bounds


def _backward_matrix(spec: TableSpec, g: int, k: int, moving: bool, filled: int) -> list[list[float]]:
    m = spec.window
    a = [[0.0] * ((m + g) * k) for _ in range(g * k)]
    for i in range(g):
        count = min(filled + i + 1, m) if moving else 1
        for s in range(k):
            _average(a[s * g + i], s, k, m, i, count)
    return a


def _backward_table(spec: TableSpec, num_groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    def build() -> Tensor:
        k = 2 if spec.centered else 1
        phases = (False, True) if spec.warmup_iters > 1 else (True,)
        data = [[_backward_matrix(spec, num_groups, k, mv, f) for f in range(spec.window + 1)] for mv in phases]
        return torch.tensor(data, dtype=torch.float64).to(device=device, dtype=dtype)

    return cached(("backward", spec, num_groups, dtype, device), build)


def backward_table(
    spec: TableSpec, num_groups: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, tuple[int, ...]]:
    """The coefficients of the backward moving averages, (phases, fills, G * k, (m + G) * k), and the
    backward call counts at which the phase changes.

    Output rows are statistic-major (``g`` of every group, then ``Psi`` of every group, centered);
    while the backward call count is below ``warmup_iters - 1`` they select the groups' own statistics.
    """
    bounds = (spec.warmup_iters - 1,) if spec.warmup_iters > 1 else ()
    return _backward_table(spec, num_groups, dtype, device), bounds


_CONSTANTS = {"one": 1.0, "zero": 0.0, "nan": float("nan")}


def constant(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A shared, read-only tensor of ``"one"``, ``"zero"`` or ``"nan"`` (the row of ones, fresh sums, a rejected call)."""
    value = _CONSTANTS[name]
    return cached(
        ("constant", name, shape, dtype, device), lambda: torch.full(shape, value, dtype=dtype, device=device)
    )


def window_means(window: Tensor, steps: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """The moving averages of a stream after pushing ``new`` (G, k, C) onto ``window`` (m, k, C).

    Returns the mean over the window ending at each new entry (G, k, C), over fewer entries while
    the stream (``steps`` entries pushed before) is shorter than m, and the window after the push:
    the same coefficients as the layers' own statistics.

    Example::

        >>> import torch
        >>> from mabn.functional import window_means
        >>> window = torch.zeros(3, 1, 2)
        >>> means, after = window_means(window, torch.tensor(0), torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))
        >>> means[:, 0].tolist(), after[:, 0].tolist()
        ([[1.0, 2.0], [2.0, 3.0]], [[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    """
    m, k, c = window.shape
    g = new.shape[0]
    seq = torch.cat([window, new.to(window.dtype)])
    spec = TableSpec(k == 2, True, False, True, m, 0, 0, 0.0, 1.0)
    coeffs = torch.tensor(_backward_matrix(spec, g, k, True, min(int(steps), m)), dtype=seq.dtype)
    means = coeffs @ seq.reshape((m + g) * k, c)
    return means.view(k, g, c).transpose(0, 1), seq[g:]
