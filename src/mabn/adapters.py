"""Which norm layers the converters know, and how to treat those of other libraries.

:func:`mabn.convert_model`, :func:`mabn.revert_model`, :func:`mabn.fold`, :func:`mabn.to_batchnorm`
and :func:`mabn.recalibrate` replace or read a norm layer only when they know exactly what it
computes. They know this package's layers, and every class registered here with a
:class:`NormAdapter`, which says:

* ``kind``: ``"batch_norm"`` (a BatchNorm with running statistics: parameters ``weight`` and
  ``bias``, buffers ``running_mean``, ``running_var``, ``num_batches_tracked``, attributes ``eps``
  and ``momentum``), ``"frozen"`` (the same map with ``weight``, ``bias``, ``running_mean`` and
  ``running_var`` all buffers: a frozen BatchNorm), or ``"keep"`` (a layer the converters leave
  as it is);
* ``post_norm``: the child modules the layer applies after the normalization, in order (timm's
  ``BatchNormAct2d`` applies ``drop`` then ``act``). A converted layer keeps them under the same
  names and applies them the same way; :func:`mabn.fold` leaves them after the folded convolution;
* ``dim``: the dimensionality (``BatchNorm2d`` -> 2), or None when the layer takes any;
* ``rebuild``: how :func:`mabn.revert_model` builds the original class again. By default it makes
  an instance of the original class with the attributes the layer had and the current values;
  a callable ``rebuild(values, post_norm)`` gets the values as a torch ``BatchNorm*d`` (kind
  ``"batch_norm"``) or a :class:`mabn.FrozenBatchNorm2d` (kind ``"frozen"``) and the dict of
  post-norm modules, and returns the module.

Built in: torch's ``BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d`` and ``SyncBatchNorm``; this
package's frozen layers; timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and
``FrozenBatchNormAct2d``; torchvision's ``FrozenBatchNorm2d`` (timm's is the same class); and
detectron2's ``FrozenBatchNorm2d``. Other libraries' classes are matched by their module and class
name, so nothing here imports them. A subclass that does not define its own ``forward`` is treated
as the class it derives from (a plain subclass of ``nn.BatchNorm2d`` is a BatchNorm2d).

Any other layer that looks like a BatchNorm (a subclass of torch's ``_BatchNorm`` with its own
``forward``, or a module with a ``running_var`` buffer) is refused with an error that names it and
says how to register it: replacing it by a BatchNorm could change what the model computes.

The registry is shared by every thread of the process; register adapters at start-up (like
importing a plugin), before converting models in several threads.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ._layers import post_norm_modules
from .frozen import FROZEN_CLASSES
from .modules import StreamNorm

__all__ = [
    "NORM_KINDS",
    "NormAdapter",
    "register_norm_adapter",
    "unregister_norm_adapter",
    "find_norm_adapter",
    "norm_adapters",
    "is_frozen_batch_norm",
    "post_norm_of",
]

#: The kinds of :class:`NormAdapter`.
NORM_KINDS = ("batch_norm", "frozen", "keep")

Rebuild = Callable[[nn.Module, dict[str, nn.Module]], nn.Module]


@dataclasses.dataclass(frozen=True)
class NormAdapter:
    """How the converters treat one norm class (see the module docstring).

    Attributes:
        name: the class as ``"module.QualifiedName"``.
        kind: ``"batch_norm"``, ``"frozen"`` or ``"keep"``.
        post_norm: names of the child modules applied after the normalization, in order.
        dim: 1, 2 or 3, or None for a layer that takes input of any dimensionality.
        rebuild: builds the original class on revert, or None for the default.
    """

    name: str
    kind: str
    post_norm: tuple[str, ...] = ()
    dim: int | None = None
    rebuild: Rebuild | None = None


_registry: dict[str, NormAdapter] = {}
_lock = threading.Lock()


def class_name(cls: type) -> str:
    """``"module.QualifiedName"`` of a class, the key of the registry."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_norm_adapter(
    cls: type[nn.Module] | str,
    *,
    kind: str = "batch_norm",
    post_norm: tuple[str, ...] | list[str] = (),
    dim: int | None = None,
    rebuild: Rebuild | None = None,
) -> NormAdapter:
    """Tell the converters how to treat the norm layer class ``cls`` (and its subclasses without a ``forward``).

    Registering a class again replaces its adapter.

    Args:
        cls: the class, or its ``"module.QualifiedName"`` (so that registering needs no import of
            the library that defines it).
        kind: ``"batch_norm"``, ``"frozen"`` or ``"keep"`` (see :mod:`mabn.adapters`).
            Default: ``"batch_norm"``.
        post_norm: the child modules the layer applies to the normalized output, in order, e.g.
            ``("drop", "act")``. Children of these names that an instance does not have are
            skipped. Default: none.
        dim: 1, 2 or 3: the dimensionality of the layer; None: from the class name (``...2d``) or
            2. Default: None.
        rebuild: ``rebuild(values, post_norm) -> module`` for :func:`mabn.revert_model`; None
            rebuilds the class with the attributes the original layer had. Default: None.

    Returns:
        The :class:`NormAdapter`.

    Raises:
        TypeError: ``cls`` is neither a class nor a string, or ``rebuild`` is not callable.
        ValueError: an unknown ``kind``, a bad ``dim`` or a ``post_norm`` name that is not an
            identifier.

    Example::

        >>> import torch, mabn
        >>> class BatchNormReLU(torch.nn.BatchNorm2d):
        ...     def __init__(self, num_features):
        ...         super().__init__(num_features)
        ...         self.act = torch.nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> _ = mabn.register_norm_adapter(BatchNormReLU, post_norm=("act",))
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNormReLU(4)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> expected = model(x)
        >>> model = mabn.convert_model(model, "mabn", preserve="function")
        >>> model[1].post_norm, torch.allclose(model(x), expected, atol=1e-6)
        (('act',), True)
        >>> type(mabn.revert_model(model)[1]).__name__
        'BatchNormReLU'
        >>> _ = mabn.unregister_norm_adapter(BatchNormReLU)
    """
    if isinstance(cls, str):
        name = cls
    elif isinstance(cls, type):
        name = class_name(cls)
    else:
        raise TypeError(f"cls must be a class or 'module.ClassName', got {type(cls).__name__}")
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, NORM_KINDS))}, got {kind!r}")
    if isinstance(post_norm, str):
        raise TypeError(f"post_norm must be a tuple of child names, got the string {post_norm!r}")
    post = tuple(post_norm)
    bad = [p for p in post if not isinstance(p, str) or not p.isidentifier()]
    if bad:
        raise ValueError(f"post_norm names must be identifiers (child module names), got {bad!r}")
    if dim is not None and (isinstance(dim, bool) or dim not in (1, 2, 3)):
        raise ValueError(f"dim must be 1, 2, 3 or None, got {dim!r}")
    if rebuild is not None and not callable(rebuild):
        raise TypeError(f"rebuild must be callable, got {type(rebuild).__name__}")
    adapter = NormAdapter(name, kind, post, dim, rebuild)
    with _lock:
        _registry[name] = adapter
    return adapter


def unregister_norm_adapter(cls: type[nn.Module] | str) -> NormAdapter:
    """Forget the adapter of ``cls`` (a class or ``"module.QualifiedName"``) and return it.

    Raises:
        ValueError: no adapter is registered for ``cls``.
    """
    name = cls if isinstance(cls, str) else class_name(cls)
    with _lock:
        if name not in _registry:
            raise ValueError(f"no norm adapter is registered for {name}")
        return _registry.pop(name)


def norm_adapters() -> dict[str, NormAdapter]:
    """A copy of the registry: class name -> :class:`NormAdapter`."""
    with _lock:
        return dict(_registry)


def find_norm_adapter(module: nn.Module) -> NormAdapter | None:
    """The adapter that applies to ``module``, or None.

    The first registered class along the class hierarchy of ``module``, provided that no class
    before it defines its own ``forward`` (such a subclass computes something else).
    """
    for cls in type(module).__mro__:
        if cls is nn.Module:
            break
        adapter = _registry.get(class_name(cls))
        if adapter is not None:
            return adapter
        if "forward" in cls.__dict__:
            return None
    return None


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """True for a frozen BatchNorm the converters know: this package's, torchvision's, timm's, detectron2's
    or one registered with ``kind="frozen"``.

    Example::

        >>> import mabn, torch
        >>> mabn.is_frozen_batch_norm(mabn.FrozenBatchNorm2d(4)), mabn.is_frozen_batch_norm(torch.nn.BatchNorm2d(4))
        (True, False)
    """
    adapter = find_norm_adapter(module)
    return adapter is not None and adapter.kind == "frozen"


def looks_like_norm(module: nn.Module) -> str | None:
    """Why ``module`` looks like a BatchNorm (for the refusal of an unknown class), or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "a subclass of torch's BatchNorm with its own forward"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return None  # torch's InstanceNorm keeps running statistics on request; the converters leave it
    if isinstance(module._buffers.get("running_var"), Tensor):
        return "a layer with running statistics (a running_var buffer)"
    return None


def unknown_norm_error(name: str, module: nn.Module, why: str, action: str = "convert") -> ValueError:
    """The error for a layer that looks like a BatchNorm of an unknown class, saying how to register it."""
    cls = type(module)
    children = ", ".join(repr(n) for n in module._modules) or "none"
    return ValueError(
        f"cannot {action} {name or 'the model'} ({class_name(cls)}): {why}, of a class the converters do not "
        f"know, so they cannot tell what it computes. If it computes a BatchNorm (then, "
        f"possibly, some of its child modules: {children}), register it once: "
        f"mabn.register_norm_adapter({cls.__qualname__}, post_norm=(<those children, in order>,)); a frozen "
        "BatchNorm takes kind='frozen'; kind='keep' leaves such layers as they are"
    )


def layer_description(name: str, module: nn.Module) -> str:
    """``"layer1.0.bn1 (BatchNorm2d(64))"``: a layer as error messages name it."""
    try:
        size = f"({num_channels(module)})"
    except AttributeError:
        size = ""
    return f"{name or 'the model'} ({type(module).__name__}{size})"


def num_channels(module: nn.Module) -> int:
    """The channel count of a norm layer: ``num_features``, or the length of its running statistics."""
    n = getattr(module, "num_features", None)
    return int(n) if n is not None else module.running_var.numel()


def post_norm_of(module: nn.Module) -> dict[str, nn.Module]:
    """The modules a norm layer applies after the normalization (name -> module, in order).

    A layer of this package keeps its own list (``post_norm``); another class's are the children
    its adapter names that the instance has.
    """
    if isinstance(module, (StreamNorm, *FROZEN_CLASSES)):
        return post_norm_modules(module)
    adapter = find_norm_adapter(module)
    names = adapter.post_norm if adapter is not None else ()
    return {n: module._modules[n] for n in names if module._modules.get(n) is not None}


_BATCH_NORM_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_FROZEN_STATE = {"weight", "bias", "running_mean", "running_var"}


def check_layout(name: str, module: nn.Module, adapter: NormAdapter) -> None:
    """Raise ``ValueError`` unless ``module`` has the state its adapter's kind promises, and nothing more."""
    post_norm = getattr(module, "post_norm", ()) if isinstance(module, FROZEN_CLASSES) else adapter.post_norm
    where = layer_description(name, module)
    if adapter.kind == "keep":
        return
    if hasattr(module, "has_uninitialized_params") and module.has_uninitialized_params():
        raise ValueError(f"cannot convert {where}: its parameters are not initialized yet; run one forward first")
    buffers = {k for k, v in module._buffers.items() if v is not None}
    params = {k for k, v in module._parameters.items() if v is not None}
    if adapter.kind == "batch_norm":
        if getattr(module, "track_running_stats", True) is False or "running_var" not in buffers:
            raise ValueError(
                f"cannot convert {where} with track_running_stats=False: "
                "the layers of this package always keep running statistics"
            )
        needed, allowed, own = {"running_mean", "running_var"}, _BATCH_NORM_STATE, params
        if params not in (set(), {"weight", "bias"}):
            raise ValueError(f"cannot convert {where}: parameters {sorted(params)} instead of weight and bias")
    else:
        needed, allowed, own = _FROZEN_STATE, _FROZEN_STATE, set()
        if params:
            raise ValueError(f"cannot convert {where}: a frozen BatchNorm with parameters {sorted(params)}")
    lacking = sorted(needed - buffers)
    if lacking:
        raise ValueError(
            f"cannot convert {where}: no buffer {', '.join(lacking)} (registered as kind={adapter.kind!r})"
        )
    vectors = [module._buffers[k] for k in needed] + [module._parameters[k] for k in own]
    if any(t.dim() != 1 for t in vectors) or len({t.numel() for t in vectors}) != 1:
        raise ValueError(f"cannot convert {where}: its statistics and affine parameters are not vectors of one length")
    extra = sorted((buffers | params) - allowed)
    extra += sorted(set(module._modules) - set(post_norm))
    extra += sorted(k for k, v in module.__dict__.items() if isinstance(v, Tensor))
    if extra:
        raise ValueError(
            f"cannot convert {where}: it holds {', '.join(extra)}, which a converted layer would lose "
            "(register the class with those children in post_norm, or with kind='keep')"
        )
    eps = getattr(module, "eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"cannot convert {where}: eps must be a number, got {eps!r}")


# Attributes every nn.Module has, and this package's own: not part of what an origin records.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_OWN_ATTRIBUTES = ("converted_from", "post_norm")


@dataclasses.dataclass
class NormOrigin:
    """The class a converted layer came from, and that class's plain attributes (for the revert).

    Attributes:
        cls: the original class.
        kind: its adapter's kind when converted (``"batch_norm"`` or ``"frozen"``).
        attributes: the original layer's attributes other than tensors, modules and torch's own
            bookkeeping (``num_features``, ``eps``, ``momentum``, ``affine``, ...).
        children: the names of its child modules, in the order it registered them.
    """

    cls: type[nn.Module]
    kind: str
    attributes: dict[str, Any]
    children: tuple[str, ...] = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> NormOrigin:
        # Plain values (a process group handle included) are shared, not copied.
        return NormOrigin(self.cls, self.kind, dict(self.attributes), self.children)


def record_origin(module: nn.Module, adapter: NormAdapter) -> NormOrigin:
    """What :func:`rebuild_origin` needs to build ``module``'s class again."""
    attributes = {
        k: v
        for k, v in module.__dict__.items()
        if k not in _MODULE_INTERNALS and not isinstance(v, (Tensor, nn.Module)) and k not in _OWN_ATTRIBUTES
    }
    return NormOrigin(type(module), adapter.kind, attributes, tuple(module._modules))


def rebuild_origin(origin: NormOrigin, values: nn.Module, post_norm: dict[str, nn.Module]) -> nn.Module:
    """An instance of ``origin.cls`` holding the state of ``values`` and the modules ``post_norm``.

    ``values`` is a torch ``BatchNorm*d`` (kind ``"batch_norm"``) or a frozen layer of this package
    (kind ``"frozen"``) with the parameters, statistics, ``eps`` and ``momentum`` to keep.
    """
    adapter = _registry.get(class_name(origin.cls))
    if adapter is not None and adapter.rebuild is not None:
        return adapter.rebuild(values, dict(post_norm))
    cls = origin.cls
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(origin.attributes)
    new.eps = values.eps
    if "num_features" in origin.attributes or origin.kind == "batch_norm":
        new.num_features = values.num_features
    if origin.kind == "batch_norm":
        new.momentum, new.affine = values.momentum, values.affine
        for key in ("weight", "bias"):
            new._parameters[key] = values._parameters[key]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[key] = values._buffers[key]
    else:
        for key in ("weight", "bias", "running_mean", "running_var"):
            new._buffers[key] = values._buffers[key]
    order = [n for n in origin.children if n in post_norm] + [n for n in post_norm if n not in origin.children]
    for key in order:
        new._modules[key] = post_norm[key]
    return new


# The built-in adapters. Other libraries' classes by name: nothing of theirs is imported here.
for _cls in FROZEN_CLASSES:
    register_norm_adapter(_cls, kind="frozen", dim=int(_cls.__name__[-2]))
for _dim, _cls in enumerate((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), 1):
    register_norm_adapter(_cls, dim=_dim)
for _dim, _cls in enumerate((nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d), 1):
    register_norm_adapter(_cls, dim=_dim)
register_norm_adapter(nn.SyncBatchNorm)
register_norm_adapter("timm.layers.norm_act.BatchNormAct2d", post_norm=("drop", "act"), dim=2)
register_norm_adapter("timm.layers.norm_act.SyncBatchNormAct", post_norm=("drop", "act"))
register_norm_adapter("timm.layers.norm_act.FrozenBatchNormAct2d", kind="frozen", post_norm=("drop", "act"), dim=2)
register_norm_adapter("torchvision.ops.misc.FrozenBatchNorm2d", kind="frozen", dim=2)
register_norm_adapter("detectron2.layers.batch_norm.FrozenBatchNorm2d", kind="frozen", dim=2)
