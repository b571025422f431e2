"""How a training call reads its counters and guards its buffer writes: on the host or on the device.

The engine's vector step is written once against the small interface below; the two controls
differ only in where a decision is taken.

* :class:`HostControl` (CPU tensors in eager mode): reading a CPU tensor is a memory read, not a
  synchronization, so the counters pick the coefficient matrix by plain indexing, a finiteness
  check is a Python ``bool`` and a guarded write is an ``if``: the common case (finite statistics)
  runs no guard operations at all.
* :class:`DeviceControl` (every other device, and under ``torch.compile``/``torch.export``): no
  host read, no data-dependent Python branch. The coefficients are gathered on the device, flags
  stay 0-dim bool tensors and guarded writes are ``torch.where``.

A *flag* is what :meth:`finite` returns (``bool`` or a 0-dim bool tensor); ``None`` stands for
"always". An *update* is ``(buffer, value, flag)``, an *increment* ``(counter, flag, amount)``.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostControl", "DeviceControl", "CONTROLS", "Flag"]

Flag = bool | Tensor | None


def _nan(t: Tensor) -> Tensor:
    return torch.full_like(t, math.nan)


class HostControl:
    """Counters and flags read on the host (CPU, eager)."""

    @staticmethod
    def coefficients(
        table: Tensor, bounds: tuple[int, ...], calls: Tensor, steps: Tensor | None, window: int
    ) -> Tensor:
        """``table[phase, filled]``: the phase from the call count, the window's fill (at most ``window``)
        from its step count."""
        phase = bisect.bisect_right(bounds, int(calls))
        filled = 0 if steps is None else min(int(steps), window)
        return table[phase, filled]

    @staticmethod
    def finite(t: Tensor) -> bool:
        # One reduction (NaN propagates through both ends), two host reads.
        low, high = torch.aminmax(t)
        return -math.inf < float(low) and float(high) < math.inf

    @staticmethod
    def both(a: Flag, b: Flag) -> Flag:
        return b if a is None else (a if b is None else bool(a) and bool(b))

    @staticmethod
    def equal(t: Tensor, value: int) -> bool:
        return int(t) == value

    @staticmethod
    def positive(t: Tensor) -> bool:
        return float(t) > 0

    @staticmethod
    def cycle(counter: Tensor, period: int) -> int:
        """The counter's next value modulo ``period``."""
        return (int(counter) + 1) % period

    @staticmethod
    def masked(flag: Flag, t: Tensor) -> Tensor:
        """``t``, or NaN of its shape where the flag is False."""
        return t if flag is None or flag else _nan(t)

    @staticmethod
    def choose(flag: Flag, a: Tensor, b: Tensor) -> Tensor:
        return a if flag is None or flag else b

    @staticmethod
    def write(updates: list[tuple[Tensor, Tensor | int, Flag]]) -> None:
        copies = [(b, v) for b, v, flag in updates if (flag is None or flag) and isinstance(v, Tensor) and b is not v]
        for buffer, value, flag in updates:
            if (flag is None or flag) and not isinstance(value, Tensor):
                buffer.fill_(value)
        if len(copies) == 1:
            copies[0][0].copy_(copies[0][1])
        elif copies:
            torch._foreach_copy_([b for b, _ in copies], [v for _, v in copies])

    @staticmethod
    def count(increments: list[tuple[Tensor, Flag, int]]) -> None:
        counters = [c for c, flag, _ in increments if flag is None or flag]
        if counters:
            torch._foreach_add_(counters, [a for _, flag, a in increments if flag is None or flag])


class DeviceControl:
    """Counters and flags kept on the device: no host read, guards as ``torch.where``."""

    @staticmethod
    def coefficients(
        table: Tensor, bounds: tuple[int, ...], calls: Tensor, steps: Tensor | None, window: int
    ) -> Tensor:
        # Indices are 1-element tensors: a 0-dim index tensor would be read on the host.
        filled = None if steps is None else steps.clamp(max=window).view(1)
        if not bounds:
            return table[0, 0] if filled is None else table[0][filled][0]
        phase = torch.bucketize(calls, _bounds_tensor(bounds, calls.device), right=True).view(1)
        return (table[phase, 0] if filled is None else table[phase, filled])[0]

    @staticmethod
    def finite(t: Tensor) -> Tensor:
        # The largest magnitude is finite; NaN propagates through max.
        return t.abs().max() < math.inf

    @staticmethod
    def both(a: Flag, b: Flag) -> Flag:
        if a is None:
            return b
        return a if b is None else a & b

    @staticmethod
    def equal(t: Tensor, value: int) -> Tensor:
        return t == value

    @staticmethod
    def positive(t: Tensor) -> Tensor:
        return t > 0

    @staticmethod
    def cycle(counter: Tensor, period: int) -> Tensor:
        return (counter + 1) % period

    @staticmethod
    def masked(flag: Flag, t: Tensor) -> Tensor:
        if flag is None:
            return t
        return torch.where(flag, t, torch.tensor(math.nan, dtype=t.dtype, device=t.device))

    @staticmethod
    def choose(flag: Flag, a: Tensor, b: Tensor) -> Tensor:
        return a if flag is None else torch.where(flag, a, b)

    @staticmethod
    def write(updates: list[tuple[Tensor, Tensor, Flag]]) -> None:
        for buffer, value, flag in updates:
            if value.dtype != buffer.dtype:
                value = value.to(buffer.dtype)
            if flag is None:
                buffer.copy_(value)
            else:
                torch.where(flag, value, buffer, out=buffer)

    @staticmethod
    def count(increments: list[tuple[Tensor, Flag, int]]) -> None:
        """counter += amount * flag for each entry, in one operation."""
        counters = [c for c, _, _ in increments]
        flags = [flag for _, flag, _ in increments]
        amounts = [a for _, _, a in increments]
        if all(f is None for f in flags):
            torch._foreach_add_(counters, amounts)
        elif all(f is flags[0] and a == amounts[0] for f, a in zip(flags, amounts)):
            torch._foreach_add_(counters, flags[0], alpha=amounts[0])
        else:
            torch._foreach_add_(counters, [_times(f, a, c) for c, f, a in increments])


def _times(flag: Flag, amount: int, like: Tensor) -> Any:
    if flag is None:
        return torch.full_like(like, amount)
    return flag if amount == 1 else flag * amount


_BOUNDS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _bounds_tensor(bounds: tuple[int, ...], device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():  # a constant of the graph; the cache is not read (see _stream.cached)
        return torch.tensor(bounds, dtype=torch.long, device=device)
    key = (bounds, device)
    t = _BOUNDS.get(key)
    if t is None:
        t = _BOUNDS[key] = torch.tensor(bounds, dtype=torch.long, device=device)
    return t


CONTROLS: dict[str, Any] = {"host": HostControl, "device": DeviceControl}
