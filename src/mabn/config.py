"""Which member of the normalization family a layer is: :class:`NormConfig` and the table of named presets.

:data:`PRESETS` is the one place where the named methods and their defaults are defined. The layer
classes take every default from it (``MABN2d`` from ``PRESETS["mabn"]``, ``GhostBatchNorm2d`` from
``"bn"``, ``BatchRenorm2d`` from ``"brn"``, ``GeneralBatchNorm2d`` from ``"mabn"``): a keyword left
out (``None``; for ``momentum``, :data:`FROM_PRESET`) is the preset's value. :func:`mabn.create_norm_layer`,
:func:`mabn.convert_model` and the command line name the presets by their keys here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Final

from ._checks import check_float, check_int

__all__ = [
    "NormConfig",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "STAT_MODES",
    "STRUCTURE_FIELDS",
    "FromPreset",
    "FROM_PRESET",
    "preset_config",
]

STAT_MODES = ("batch", "sma")

#: The fields that say which member of the family a configuration is; the others are its sizes and rates.
STRUCTURE_FIELDS = ("centered", "forward_stats", "renorm", "backward_stats")


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """The member of the family and its hyper-parameters; the defaults are MABN's.

    Args:
        centered: subtract the mean (BatchNorm) or normalize by the second moment only (MABN).
            Default: ``False``.
        forward_stats: ``"batch"`` (statistics of the group) or ``"sma"`` (moving average over the
            window). Default: ``"sma"``.
        renorm: renormalize the forward statistics towards the running (EMA) ones with clipped
            ``r`` (and ``d`` when centered), as Batch Renormalization. Default: ``True``.
        backward_stats: ``"batch"`` or ``"sma"`` for ``g`` and ``Psi``. Default: ``"sma"``.
        eps: added to the variance (second moment). Default: ``1e-5``.
        momentum: weight of the new value in the running statistics, PyTorch's convention; ``None``
            keeps their cumulative average over the steps instead (weight ``1 / count``).
            Default: ``0.02`` (the paper's EMA weight 0.98).
        norm_batch_size: samples per normalization group ``B``; ``None`` is the whole batch.
        window: number ``m`` of groups in the moving averages. Default: ``16``.
        r_max: clip ``r`` to ``[1 / r_max, r_max]``. Default: ``5.0``.
        d_max: clip ``d`` to ``[-d_max, d_max]`` (centered form only). Default: ``5.0``.
        warmup_iters: training steps that use the group's statistics before the moving averages
            take over (a step is in warm-up while its 1-based count is below this). Default: ``100``.
        renorm_warmup_iters: ``r = 1`` and ``d = 0`` while the 1-based step count is at most this.
            Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). The ``accumulate``
            calls of a step are consecutive steps of the statistics stream, exactly as one call on
            their concatenated batch: the warm-ups count steps and the running statistics are
            updated once per step. Default: ``1``.

    Example::

        >>> from mabn import NormConfig, PRESETS
        >>> PRESETS["mabn"] == NormConfig()
        True
        >>> PRESETS["bn"].centered, PRESETS["bn"].momentum
        (True, 0.1)
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
    accumulate: int = 1

    def __post_init__(self) -> None:
        for name in ("centered", "renorm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("forward_stats", "backward_stats"):
            if getattr(self, name) not in STAT_MODES:
                raise ValueError(f"{name} must be one of {STAT_MODES}, got {getattr(self, name)!r}")
        eps = check_float("eps", self.eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if self.momentum is not None:
            momentum = check_float("momentum", self.momentum)
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if self.norm_batch_size is not None:
            check_int("norm_batch_size", self.norm_batch_size, 1)
        check_int("window", self.window, 1)
        for name in ("r_max", "d_max"):
            value = check_float(name, getattr(self, name))
            if name == "r_max" and value < 1:
                raise ValueError(f"r_max must be >= 1, got {value}")
            if name == "d_max" and value < 0:
                raise ValueError(f"d_max must be >= 0, got {value}")
        check_int("warmup_iters", self.warmup_iters, 0)
        check_int("renorm_warmup_iters", self.renorm_warmup_iters, 0)
        check_int("accumulate", self.accumulate, 1)

    @property
    def num_forward_stats(self) -> int:
        """Statistics per channel in the forward stream: (mu, sigma^2) or (chi^2,)."""
        return 2 if self.centered else 1

    @property
    def num_backward_stats(self) -> int:
        """Statistics per channel in the backward stream: (g, Psi) or (Psi,)."""
        return 2 if self.centered else 1

    @property
    def structure(self) -> tuple[bool, str, bool, str]:
        """(centered, forward_stats, renorm, backward_stats): what the statistics are, without sizes."""
        return (self.centered, self.forward_stats, self.renorm, self.backward_stats)

    def settings(self) -> tuple[str, ...]:
        """The fields besides the structure that act in this member of the family, in signature order.

        The moving-average sizes act only with an ``"sma"`` statistic, the clipping bounds and their
        warm-up only with ``renorm`` (``d_max`` only centered). The classes of a preset of their own
        (``MABN2d``, ``GhostBatchNorm2d``, ``BatchRenorm2d``) take exactly these as keywords.

        Example::

            >>> from mabn import PRESETS
            >>> PRESETS["bn"].settings()
            ('eps', 'momentum', 'norm_batch_size', 'accumulate')
        """
        names = ["eps", "momentum", "norm_batch_size"]
        if "sma" in (self.forward_stats, self.backward_stats):
            names += ["window", "warmup_iters"]
        if self.renorm:
            names += ["r_max", "d_max"] if self.centered else ["r_max"]
            names.append("renorm_warmup_iters")
        return (*names, "accumulate")


class FromPreset(enum.Enum):
    """The default of ``momentum`` in the layers' constructors: the preset's value.

    ``None`` cannot mark a value left out there, because ``momentum=None`` is a value of its own
    (the cumulative average of torch's BatchNorm).
    """

    VALUE = "the preset's value"

    def __repr__(self) -> str:
        return "FROM_PRESET"


#: ``momentum``'s default in the layers' constructors: the preset's value (see :class:`FromPreset`).
FROM_PRESET: Final = FromPreset.VALUE


def preset_config(preset: str, momentum: float | None | FromPreset = FROM_PRESET, **values: Any) -> NormConfig:
    """``PRESETS[preset]`` with the values a user gave: a value of ``None`` (``momentum``:
    :data:`FROM_PRESET`) is one left out, which keeps the preset's.

    Example::

        >>> from mabn.config import PRESETS, preset_config
        >>> preset_config("bn", eps=1e-3, window=None) == dataclasses.replace(PRESETS["bn"], eps=1e-3)
        True
    """
    given = {name: value for name, value in values.items() if value is not None}
    if momentum is not FROM_PRESET:
        given["momentum"] = momentum
    return dataclasses.replace(PRESETS[preset], **given)


#: The named members of the family: the paper's methods and the rows of its ablation (Table 2).
PRESETS: dict[str, NormConfig] = {
    # BatchNorm; "ghost" BN when norm_batch_size < N. PyTorch's momentum 0.1 (the paper's 0.9).
    "bn": NormConfig(centered=True, forward_stats="batch", renorm=False, backward_stats="batch", momentum=0.1),
    # Batch Renormalization: batch statistics renormalized towards the EMA with clipped r and d.
    "brn": NormConfig(
        centered=True, forward_stats="batch", renorm=True, backward_stats="batch", momentum=0.1, r_max=3.0
    ),
    # Centered form, EMA-renormalized forward, SMA of g and Psi backward (the paper saw no convergence).
    "bn_ema_sma": NormConfig(centered=True, forward_stats="batch", renorm=True, backward_stats="sma", momentum=0.1),
    # Uncentered ("modified") form with batch statistics.
    "uncentered": NormConfig(centered=False, forward_stats="batch", renorm=False, backward_stats="batch", momentum=0.1),
    # Uncentered form, batch statistics renormalized towards the EMA ("EMAS in FP").
    "uncentered_ema": NormConfig(centered=False, forward_stats="batch", renorm=True, backward_stats="batch"),
    # MABN: uncentered, SMA renormalized towards the EMA forward, SMA of Psi backward.
    "mabn": NormConfig(),
}

#: One line per preset, in the paper's words (tables and ``--help``).
PRESET_DESCRIPTIONS: dict[str, str] = {
    "bn": "BN: centered, batch statistics in FP and BP",
    "brn": "BRN: centered, batch statistics renormalized to the EMA in FP, batch BP",
    "bn_ema_sma": "centered, EMA-renormalized FP, SMA in BP",
    "uncentered": "uncentered (modified) form, batch statistics in FP and BP",
    "uncentered_ema": "uncentered, EMA-renormalized FP, batch BP",
    "mabn": "MABN: uncentered, SMA renormalized to the EMA in FP, SMA in BP",
}
