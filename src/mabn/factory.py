"""Build a normalization layer from a name, a class or a ``functools.partial``.

:func:`create_norm_layer` is the one place where models, the converter and the command line turn a
user's choice of normalization into a module, so that ``"mabn"``, ``mabn.MABN2d`` and
``functools.partial(mabn.MABN2d, norm_batch_size=2)`` all work wherever a norm is asked for.
:data:`NORMS` is the one table of the names: the presets of :data:`mabn.PRESETS` under their own
keys, and the norms that are not members of the family.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ._checks import check_int, check_num_features
from .frozen import FROZEN_CLASSES
from .modules import BATCH_RENORM_CLASSES, GENERAL_BATCH_NORM_CLASSES, GHOST_BATCH_NORM_CLASSES, MABN_CLASSES

__all__ = [
    "create_norm_layer",
    "norm_class",
    "Norm",
    "NORMS",
    "NORM_ALIASES",
    "NORM_NAMES",
    "PER_SAMPLE_NORMS",
    "ENGINE_OPTIONS",
    "FAMILIES",
    "is_batch_norm",
    "canonical_name",
    "default_num_groups",
    "same_family",
]

NormSpec = str | type[nn.Module] | functools.partial | Callable[..., nn.Module]
Classes = tuple[type[nn.Module], type[nn.Module], type[nn.Module]]

_TORCH_BN: Classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class Norm:
    """What one norm name builds.

    Attributes:
        classes: the 1-D, 2-D and 3-D classes.
        kind: ``"batch"`` (a member of the family: the preset of the same name, batch statistics),
            ``"fixed"`` (fixed statistics) or ``"per_sample"`` (statistics of each sample).
        defaults: keywords the name sets unless given (``"ln"``: one group).
        torch_classes: torch's classes computing the same, built instead of ``classes`` when no
            option of :data:`ENGINE_OPTIONS` asks for this package's engine; None: always ``classes``.
    """

    classes: Classes
    kind: str = "batch"
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    torch_classes: Classes | None = None


#: Every norm name, the one table the presets, :func:`create_norm_layer`, :func:`mabn.convert_model`
#: and ``mabn train --norm`` share. A ``"batch"`` row is the preset of its name.
NORMS: dict[str, Norm] = {
    # BatchNorm; ghost BatchNorm on groups of norm_batch_size. At normalization batch = the batch,
    # unsynced and unaccumulated, torch's BatchNorm computes the same and is built instead.
    "bn": Norm(GHOST_BATCH_NORM_CLASSES, torch_classes=_TORCH_BN),
    "brn": Norm(BATCH_RENORM_CLASSES),
    "bn_ema_sma": Norm(GENERAL_BATCH_NORM_CLASSES),
    "uncentered": Norm(GENERAL_BATCH_NORM_CLASSES),
    "uncentered_ema": Norm(GENERAL_BATCH_NORM_CLASSES),
    "mabn": Norm(MABN_CLASSES),
    "frozen_bn": Norm(FROZEN_CLASSES, kind="fixed"),
    "gn": Norm((nn.GroupNorm,) * 3, kind="per_sample"),
    # LayerNorm over (C, *) with a per-channel affine: GroupNorm with one group (as in the GN paper).
    "ln": Norm((nn.GroupNorm,) * 3, kind="per_sample", defaults={"num_groups": 1}),
    "in": Norm((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), kind="per_sample", defaults={"affine": True}),
}

#: Former names, still accepted: name -> the name in :data:`NORMS` it stands for.
NORM_ALIASES: dict[str, str] = {"ghost_bn": "bn"}

#: The options only this package's engine has, at the values that leave them off (``"bn"`` builds
#: torch's BatchNorm while every one of them is at this value).
ENGINE_OPTIONS: dict[str, Any] = {"norm_batch_size": None, "accumulate": 1, "process_group": None}

#: Every name :func:`create_norm_layer` lists (aliases aside).
NORM_NAMES: tuple[str, ...] = tuple(NORMS)

#: Normalizations with statistics of each sample only (no batch statistics, nothing to sync).
PER_SAMPLE_NORMS: tuple[str, ...] = tuple(name for name, norm in NORMS.items() if norm.kind == "per_sample")

#: The families of 1-D/2-D/3-D classes the factory builds (for :func:`same_family` and the
#: converters); GroupNorm takes any dimensionality and is none.
FAMILIES: tuple[Classes, ...] = tuple(
    dict.fromkeys(c for c in [*(norm.classes for norm in NORMS.values()), _TORCH_BN] if len(set(c)) == 3)
)


def canonical_name(name: str) -> str:
    """``"Ghost-BN"`` -> ``"bn"``: names are case-insensitive, accept dashes, and aliases resolve."""
    key = name.strip().lower().replace("-", "_")
    return NORM_ALIASES.get(key, key)


def _lookup(name: str) -> Norm:
    norm = NORMS.get(canonical_name(name))
    if norm is None:
        raise ValueError(f"unknown norm layer {name!r}; known names: {', '.join(NORM_NAMES)}")
    return norm


def is_batch_norm(norm: NormSpec) -> bool:
    """Whether a norm choice uses batch statistics (so normalization batches and syncing apply)."""
    entry = NORMS.get(canonical_name(norm)) if isinstance(norm, str) else None
    return entry is None or entry.kind == "batch"


def _uses_engine(kwargs: dict[str, Any]) -> bool:
    """Whether ``kwargs`` turn on an option of :data:`ENGINE_OPTIONS` (``None`` leaves each off)."""
    return any(kwargs.get(key) not in (None, off) for key, off in ENGINE_OPTIONS.items())


def norm_class(name: str, dim: int = 2, **kwargs: Any) -> type[nn.Module]:
    """The class :func:`create_norm_layer` builds for ``name`` and these keyword arguments.

    Example::

        >>> norm_class("bn").__name__, norm_class("bn", norm_batch_size=2).__name__
        ('BatchNorm2d', 'GhostBatchNorm2d')
    """
    norm = _lookup(name)
    if norm.torch_classes is not None and not _uses_engine(kwargs):
        return norm.torch_classes[dim - 1]
    return norm.classes[dim - 1]


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
    for family in FAMILIES:
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
    norm = _lookup(key)
    kwargs = {**norm.defaults, **kwargs}
    cls = norm_class(key, dim, **kwargs)
    if cls is nn.GroupNorm:
        return _group_norm(num_features, kwargs.pop("num_groups", None), kwargs)
    if cls in _TORCH_BN:
        for option in ENGINE_OPTIONS:
            kwargs.pop(option, None)  # at their values that leave them off: torch's BatchNorm is the same layer
    if cls in GENERAL_BATCH_NORM_CLASSES:
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

    Names (case-insensitive; :data:`NORMS` is their table):

    ================  ===========================================================================
    ``"bn"``          :class:`mabn.GhostBatchNorm2d`, BatchNorm on groups of ``norm_batch_size``
                      samples; without ``norm_batch_size``, ``accumulate`` and ``process_group``
                      torch's :class:`torch.nn.BatchNorm2d`, which computes the same
                      (``"ghost_bn"``, the former name, is the same)
    ``"brn"``         :class:`mabn.BatchRenorm2d`
    ``"mabn"``        :class:`mabn.MABN2d`
    other presets     every other key of :data:`mabn.PRESETS` (``"bn_ema_sma"``, ``"uncentered"``,
                      ``"uncentered_ema"``): :meth:`mabn.GeneralBatchNorm2d.from_preset`
    ``"frozen_bn"``   :class:`mabn.FrozenBatchNorm2d`
    ``"gn"``          :class:`torch.nn.GroupNorm` with ``num_groups`` (default: 32, lowered to the
                      largest divisor of ``num_features`` not above 32)
    ``"ln"``          ``GroupNorm(1, num_features)``: LayerNorm over (C, \\*) with per-channel affine
    ``"in"``          :class:`torch.nn.InstanceNorm2d` with ``affine=True`` by default
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
