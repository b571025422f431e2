"""The plan of a kind of training call: everything that does not change from one call to the next.

A call's kernels (:mod:`mabn.kernels`), its control (:mod:`mabn._control`), its coefficient tables
and their row layout (:mod:`mabn._stream`) depend only on the layer's configuration, the number of
groups, the dtypes, the device and the input's layout and sizes. They are resolved once into a
:class:`Plan` and looked up afterwards, so a call's Python work is a dictionary lookup, not a
sequence of decisions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._control import CONTROLS
from ._stream import TableSpec, backward_table, forward_layout, forward_table
from .config import NormConfig
from .kernels import KERNELS, Paths, choose_paths, settings_key, site

__all__ = ["Plan", "plan_for"]


class Plan:
    """The resolved kernels, control and coefficient tables of one kind of training call."""

    __slots__ = (
        "config",
        "spec",
        "groups",
        "dtype",
        "paths",
        "control",
        "statistics",
        "grad_sums",
        "layout",
        "forward_table",
        "forward_bounds",
        "backward_table",
        "backward_bounds",
        "site",
        "numel",
        "native",
        "_other_dy",
    )

    def __init__(self, config: NormConfig, x: Tensor, groups: int, dtype: torch.dtype, synced: bool) -> None:
        self.config, self.groups, self.dtype = config, groups, dtype
        self.spec = TableSpec.of(config)
        own = not synced and x.dtype == dtype
        native = own and groups == 1 and config.centered
        self.site = site(
            x,
            groups,
            native_train=native and _batch_forward(config),
            native_backward=native and config.backward_stats == "batch",
            fusable=x.dtype == dtype,
        )
        self.paths = choose_paths(self.site)
        self.numel = x.numel() // max(x.shape[1] * groups, 1)  # values per channel in a group
        self._resolve(self.paths)
        self.layout = forward_layout(self.spec, groups)
        self.forward_table, self.forward_bounds = forward_table(self.spec, groups, dtype, x.device)
        if config.backward_stats == "sma":
            self.backward_table, self.backward_bounds = backward_table(self.spec, groups, dtype, x.device)
        else:
            self.backward_table, self.backward_bounds = None, ()
        self.native = _Native(self, x) if self.paths.step == "fused" else None
        self._other_dy: Paths | None = None

    def _resolve(self, paths: Paths) -> None:
        self.control = CONTROLS[paths.control]
        job = "moments" if self.config.centered else "second_moment"
        self.statistics = KERNELS[job][getattr(paths, job)]
        self.grad_sums = KERNELS["grad_sums"][paths.grad_sums]

    def backward_paths(self, x: Tensor, dy: Tensor) -> tuple[Paths, Any]:
        """The paths and the ``grad_sums`` kernel for an incoming gradient ``dy`` (its layout may differ from ``x``'s)."""
        if dy.is_contiguous() == x.is_contiguous() and dy.stride() == x.stride():
            return self.paths, self.grad_sums
        if self._other_dy is None:
            self._other_dy = choose_paths(self.site._replace(layout="other"))
        return self._other_dy, KERNELS["grad_sums"][self._other_dy.grad_sums]


class _Native:
    """The fused step's functions for one dtype and the :class:`mabn._native.Spec` of a plan."""

    __slots__ = ("spec", "forward", "backward", "normalize", "statistics", "gradient_sums")

    def __init__(self, plan: Plan, x: Tensor) -> None:
        from . import _native

        lib, suffix = _native.library(), _native.TYPES[x.dtype]
        for name in self.__slots__[1:]:
            setattr(self, name, getattr(lib, f"mabn_{name}_{suffix}"))
        config, layout = plan.config, plan.layout
        rows_out, rows_in = plan.forward_table.shape[-2:]

        def start(rows: slice | None) -> int:
            return -1 if rows is None else rows.start

        n, c = x.shape[0], x.shape[1]
        self.spec = _native.Spec(
            n=n,
            c=c,
            s=x.numel() // max(n * c, 1),
            groups=plan.groups,
            channels_last=int(plan.site.layout == "channels_last"),
            centered=int(config.centered),
            renorm=int(config.renorm),
            m=config.window if config.forward_stats == "sma" else 0,
            rows_in=rows_in,
            rows_out=rows_out,
            var=start(layout.var),
            den=start(layout.den),
            bounds=start(layout.bounds),
            mean=start(layout.mean),
            shift=start(layout.shift),
            target=start(layout.target),
            running=start(layout.running),
            bm=config.window if config.backward_stats == "sma" else 0,
            d_max=config.d_max,
        )


def _batch_forward(config: NormConfig) -> bool:
    """The forward normalizes with the group's own statistics, as BatchNorm's training kernel does."""
    return config.forward_stats == "batch" and not config.renorm and config.accumulate == 1


_PLANS: dict[tuple[Any, ...], Plan] = {}
_MAX_PLANS = 4096


def plan_for(config: NormConfig, x: Tensor, groups: int, dtype: torch.dtype, synced: bool) -> Plan:
    """The plan of a training call on ``x`` (cached; built afresh while compiling, where it is traced once)."""
    if torch.compiler.is_compiling():
        return Plan(config, x, groups, dtype, synced)
    # The configuration is keyed by identity; the plan holds it, so the id cannot be reused while cached.
    key = (
        id(config),
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        type(x),
        groups,
        dtype,
        synced,
        settings_key(),
        torch.get_num_threads(),
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = Plan(config, x, groups, dtype, synced)
    return plan
