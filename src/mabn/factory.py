"""Build a normalization layer from a name, a class or a ``functools.partial``.

:func:`create_norm_layer` is the one place where models, the converter and the command line turn a
user's choice of normalization into a module, so that ``"mabn"``, ``mabn.MABN2d`` and
``functools.partial(mabn.MABN2d, norm_batch_size=2)`` all work wherever a norm is asked for.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ._checks import check_int, check_num_features
from .config import PRESETS
from .modules import FAMILIES

__all__ = [
    "create_norm_layer",
    "norm_class",
    "NORM_NAMES",
    "PER_SAMPLE_NORMS",
    "is_batch_norm",
    "canonical_name",
    "default_num_groups",
    "same_family",
]

NormSpec = str | type[nn.Module] | functools.partial | Callable[..., nn.Module]

#: Normalizations with statistics of each sample only (no batch statistics, nothing to sync).
PER_SAMPLE_NORMS: tuple[str, ...] = ("gn", "ln", "in")

# Presets with classes of their own (MABN*d for "mabn", ...); the others use GeneralBatchNorm*d.
_PRESET_FAMILY = {fam[0].preset: name for name, fam in FAMILIES.items() if getattr(fam[0], "preset", None)}

#: Normalizations with fixed statistics (nothing computed from the batch or the sample).
FIXED_NORMS: tuple[str, ...] = ("frozen_bn",)

#: Every name :func:`create_norm_layer` accepts: the presets, ``ghost_bn``, frozen BN and the per-sample norms.
NORM_NAMES: tuple[str, ...] = (
    "bn",
    "ghost_bn",
    *(p for p in PRESETS if p != "bn"),
    *FIXED_NORMS,
    *PER_SAMPLE_NORMS,
)


def canonical_name(name: str) -> str:
    """``"Ghost-BN"`` -> ``"ghost_bn"``: names are case-insensitive and accept dashes."""
    return name.strip().lower().replace("-", "_")


def is_batch_norm(norm: NormSpec) -> bool:
    """Whether a norm choice uses batch statistics (so normalization batches and syncing apply)."""
    return not (isinstance(norm, str) and canonical_name(norm) in (*PER_SAMPLE_NORMS, *FIXED_NORMS))


def norm_class(name: str, dim: int = 2, **kwargs: Any) -> type[nn.Module]:
    """The class :func:`create_norm_layer` builds for ``name`` and these keyword arguments.

    ``"bn"`` is torch's ``BatchNorm*d`` unless ``norm_batch_size``, ``accumulate`` or
    ``process_group`` ask for what only :class:`mabn.GhostBatchNorm2d` does.
    """
    key = canonical_name(name)
    if key == "bn":
        extended = any(kwargs.get(k) not in (None, 1) for k in ("norm_batch_size", "accumulate", "process_group"))
        return FAMILIES["ghost_bn" if extended else "torch_bn"][dim - 1]
    if key in ("gn", "ln"):
        return nn.GroupNorm
    if key == "in":
        return FAMILIES["torch_in"][dim - 1]
    if key == "frozen_bn":
        return FAMILIES["frozen_bn"][dim - 1]
    if key in FAMILIES and key in _PRESET_FAMILY.values():
        return FAMILIES[key][dim - 1]
    if key in PRESETS:
        return FAMILIES[_PRESET_FAMILY.get(key, "general")][dim - 1]
    raise ValueError(f"unknown norm layer {name!r}; known names: {', '.join(NORM_NAMES)}")


def default_num_groups(num_features: int, preferred: int = 32) -> int:
    """The largest divisor of ``num_features`` that is at most ``preferred`` (GroupNorm's group count).

    Example::

        >>> default_num_groups(64), default_num_groups(48), default_num_groups(16)
        (32, 24, 16)
    """
    for groups in range(min(preferred, num_features), 0, -1):
        if num_features % groups == 0:
            return groups
    return 1


def same_family(cls: type[nn.Module], dim: int) -> type[nn.Module] | None:
    """The ``dim``-D sibling of a 1/2/3-D layer class (``MABN2d``, 1 -> ``MABN1d``), or None."""
    for family in FAMILIES.values():
        if cls in family:
            return family[dim - 1]
    return None


def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int (1, 2 or 3), got {dim!r}")
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
    return dim


def _group_norm(num_features: int, num_groups: int | None, kwargs: dict[str, Any]) -> nn.GroupNorm:
    if num_groups is None:
        num_groups = default_num_groups(num_features)
    elif check_int("num_groups", num_groups, 1) and num_features % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}")
    return nn.GroupNorm(num_groups, num_features, **kwargs)


def _from_name(name: str, num_features: int, dim: int, kwargs: dict[str, Any]) -> nn.Module:
    key = canonical_name(name)
    cls = norm_class(key, dim, **kwargs)
    if cls is nn.GroupNorm:
        if key == "ln":  # LayerNorm over (C, *) with a per-channel affine, as GroupNorm with one group
            return nn.GroupNorm(1, num_features, **kwargs)
        return _group_norm(num_features, kwargs.pop("num_groups", None), kwargs)
    if key == "in":
        kwargs.setdefault("affine", True)
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        for unused in ("norm_batch_size", "accumulate", "process_group"):
            kwargs.pop(unused, None)  # their defaults: torch's BatchNorm is the same layer
    if cls in FAMILIES["general"]:
        return cls.from_preset(key, num_features, **kwargs)
    return cls(num_features, **kwargs)


def _from_callable(norm: Callable[..., nn.Module], num_features: int, dim: int | None, kwargs: dict[str, Any]):
    func, args, keywords = norm, (), {}
    if isinstance(norm, functools.partial):
        func, args, keywords = norm.func, norm.args, dict(norm.keywords)
    if inspect.isclass(func) and dim is not None:
        func = same_family(func, dim) or func
    merged = {**keywords, **kwargs}
    if inspect.isclass(func) and issubclass(func, nn.GroupNorm) and not args:
        # GroupNorm takes (num_groups, num_channels): fill in the group count.
        return _group_norm(num_features, merged.pop("num_groups", None), merged)
    return func(*args, num_features, **merged) if args else func(num_features, **merged)


def create_norm_layer(norm: NormSpec, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the normalization layer ``norm`` for ``num_features`` channels.

    Names (case-insensitive):

    ================  ===========================================================================
    ``"bn"``          :class:`torch.nn.BatchNorm2d`; with ``norm_batch_size`` set, ghost BN
                      (:class:`mabn.GhostBatchNorm2d`, the same math on groups of B samples)
    ``"ghost_bn"``    :class:`mabn.GhostBatchNorm2d`
    ``"brn"``         :class:`mabn.BatchRenorm2d`
    ``"mabn"``        :class:`mabn.MABN2d`
    ``"gn"``          :class:`torch.nn.GroupNorm` with ``num_groups`` (default: 32, lowered to the
                      largest divisor of ``num_features`` not above 32)
    ``"ln"``          ``GroupNorm(1, num_features)``: LayerNorm over (C, \\*) with per-channel affine
    ``"in"``          :class:`torch.nn.InstanceNorm2d` with ``affine=True`` by default
    other presets     every other key of :data:`mabn.PRESETS` (``"bn_ema_sma"``, ``"uncentered"``,
                      ``"uncentered_ema"``): :meth:`mabn.GeneralBatchNorm2d.from_preset`
    ================  ===========================================================================

    A class is called as ``cls(num_features, **kwargs)`` (``nn.GroupNorm`` as
    ``GroupNorm(num_groups, num_features)``), a ``functools.partial`` or any other callable the same
    way with its own keywords overridden by ``kwargs``.

    Args:
        norm: a name from the table, a class or a partial.
        num_features: number of channels C.
        dim: 1, 2 or 3, the dimensionality of the layer (``BatchNorm1d`` ... ``BatchNorm3d``).
            Default for names: 2. For a class of a 1/2/3-D family (torch's BatchNorm and
            InstanceNorm, every layer of this package) it picks the sibling class; otherwise it is
            ignored.
        **kwargs: passed to the layer (``eps``, ``momentum``, ``affine``, ``norm_batch_size``,
            ``device``, ``dtype``, ...).

    Returns:
        The new module.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), a bad ``dim`` or a
            ``num_groups`` that does not divide ``num_features``.
        TypeError: for a ``norm`` that is neither a name nor a callable, or arguments the layer
            does not take.

    Example::

        >>> import functools, mabn
        >>> type(mabn.create_norm_layer("mabn", 64, norm_batch_size=2)).__name__
        'MABN2d'
        >>> mabn.create_norm_layer("gn", 48).num_groups
        24
        >>> mabn.create_norm_layer(functools.partial(mabn.MABN2d, window=8), 16, dim=1).window
        8
    """
    num_features = check_num_features(num_features)
    dim = kwargs.pop("dim", None)
    if dim is not None:
        dim = _check_dim(dim)
    if isinstance(norm, str):
        builder = functools.partial(_from_name, norm, num_features, 2 if dim is None else dim)
    elif callable(norm):
        builder = functools.partial(_from_callable, norm, num_features, dim)
    else:
        raise TypeError(f"norm must be a name, a class or a functools.partial, got {norm!r}")
    try:
        layer = builder(dict(kwargs))
    except TypeError as exc:
        raise TypeError(f"create_norm_layer({norm!r}, {num_features}): {exc}") from exc
    if not isinstance(layer, nn.Module):
        raise TypeError(f"norm {norm!r} built a {type(layer).__name__}, not an nn.Module")
    return layer
