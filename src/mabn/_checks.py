"""Argument checks shared by the layers, the factory and the configuration (one message per mistake)."""

from __future__ import annotations

import math

__all__ = ["check_int", "check_float", "check_num_features"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ``TypeError`` for a non-int (bools included), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object) -> float:
    """``value`` as a finite float; ``TypeError`` for a non-number (bools included), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_num_features(value: object) -> int:
    """The channel count of a layer: an int >= 1."""
    return check_int("num_features", value, 1)
