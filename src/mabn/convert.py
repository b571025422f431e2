"""Swap the normalization and convolution layers of whole models, and back.

:func:`convert_model` turns every BatchNorm (and every layer of this package) of a model into the
chosen member of the family and, on request, every convolution and linear layer into its
weight-centralized twin; :func:`revert_model` goes back to the classes the model had. Both work like
:meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: in place, returning the model (a new module
only when the model itself is a replaced layer), with the affine parameters carried over as the
same ``nn.Parameter`` objects, so an optimizer built before the conversion keeps working.

Which layers are BatchNorms, and what to keep of other libraries' classes (timm's activation and
dropout, frozen BatchNorms), is the business of :mod:`mabn.adapters`: a layer that looks like a
BatchNorm but is of an unknown class is refused, never replaced by a guess.

Every conversion here keeps one invariant: it either completes or changes nothing. All new layers
are built (and every check is made) before the first one is put in place, by :func:`apply_replacements`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ._layers import set_post_norm
from .adapters import (
    NormOrigin,
    check_layout,
    find_norm_adapter,
    looks_like_norm,
    num_channels,
    post_norm_of,
    rebuild_origin,
    record_origin,
    unknown_norm_error,
)
from .config import PRESETS, STRUCTURE_FIELDS, NormConfig
from .conv import CENTRALIZED, centralize_weight, check_conv
from .factory import FAMILIES, NORM_NAMES, NORMS, NormSpec, canonical_name, create_norm_layer, norm_class, same_family
from .frozen import FROZEN_CLASSES
from .modules import StreamNorm

__all__ = ["PRESERVE_CHOICES", "convert_model", "revert_model", "is_norm_layer", "norm_dim"]

#: What :func:`convert_model` keeps when a centered layer (BatchNorm) becomes an uncentered one (MABN).
PRESERVE_CHOICES = ("statistics", "function")

#: Weight-centralized layer -> the plain torch layer (the reverse of :data:`mabn.CENTRALIZED`).
PLAIN: dict[type[nn.Module], type[nn.Module]] = {cen: plain for plain, cen in CENTRALIZED.items()}

_TORCH_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# The settings of a statistics stream besides its structure: all carry over between layers of this
# package with the same structure.
_SETTINGS = tuple(f.name for f in dataclasses.fields(NormConfig) if f.name not in STRUCTURE_FIELDS)
# What the constructors of the other layers a conversion builds take of the settings it carries.
_DEVICE = frozenset({"device", "dtype"})
_KEYWORDS: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], frozenset[str]], ...] = (
    (FROZEN_CLASSES, frozenset({"eps"}) | _DEVICE),
    (
        (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm),
        frozenset({"eps", "momentum", "affine"}) | _DEVICE,
    ),
    (nn.GroupNorm, frozenset({"eps", "affine"}) | _DEVICE),
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers :func:`convert_model` replaces: this package's, torch's BatchNorms and every
    class with a :class:`~mabn.adapters.NormAdapter` (timm's, torchvision's, detectron2's, yours).

    Example::

        >>> import torch, mabn
        >>> [mabn.is_norm_layer(m) for m in (mabn.MABN2d(4), torch.nn.SyncBatchNorm(4), torch.nn.GroupNorm(2, 4))]
        [True, True, False]
    """
    if isinstance(module, StreamNorm):
        return True
    adapter = find_norm_adapter(module)
    return adapter is not None and adapter.kind != "keep"


def norm_dim(module: nn.Module) -> int | None:
    """1, 2 or 3 for a layer of a 1/2/3-D family (BatchNorm2d -> 2, MABN1d -> 1), else None.

    Other libraries' layers count by their adapter, else by a class name ending in ``1d``, ``2d``
    or ``3d`` (``FrozenBatchNorm2d`` -> 2).
    """
    for cls in type(module).__mro__:
        for family in FAMILIES:
            if cls in family:
                return family.index(cls) + 1
    adapter = find_norm_adapter(module)
    if adapter is not None and adapter.dim is not None:
        return adapter.dim
    for cls in type(module).__mro__:
        if cls.__name__[-2:] in ("1d", "2d", "3d") and cls.__name__[-3:-2].isalpha():
            return int(cls.__name__[-2])
    return None


def retype(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance with the state of ``module`` (same parameters, hooks and attributes).

    Only valid between classes with the same state (a torch conv and its centralized twin).
    """
    new = cls.__new__(cls)
    # Fresh containers, shared tensors: the original module is left exactly as it was.
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()})
    return new


def carry_flags(src: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the training mode and quantization config of the layer ``src`` it replaces."""
    new.train(src.training)
    if hasattr(src, "qconfig"):
        new.qconfig = src.qconfig
    return new


def apply_replacements(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put every replacement (id of the old module -> new module) in place; return the model or its replacement.

    The one place where the converters change a model. Every new layer is built, and every check
    made, before this is called, and putting modules in place cannot fail: so a conversion either
    completes or changes nothing.
    """
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]
    return replacements.get(id(model), model)


@dataclasses.dataclass
class _Source:
    """A norm layer to convert, as the converter sees it (whatever its library)."""

    name: str
    module: nn.Module
    form: str | None  # "centered", "uncentered" or None (no running statistics)
    frozen: bool  # weight and bias are fixed buffers
    post: dict[str, nn.Module]  # applied after the normalization, in order
    origin: NormOrigin | None  # the class to revert to (None: torch's BatchNorm*d)

    @property
    def where(self) -> str:
        return f"{self.name or 'the model'} ({type(self.module).__name__}({num_channels(self.module)}))"


def _describe(name: str, module: nn.Module) -> _Source | None:
    """``module`` as a layer to convert; None for a module that is not a norm layer to convert.

    Raises ``ValueError`` for a layer that looks like a BatchNorm of an unknown class, and for a
    known one whose state does not fit its adapter.
    """
    if isinstance(module, StreamNorm):
        form = "centered" if module.config.centered else "uncentered"
        return _Source(name, module, form, False, post_norm_of(module), module.__dict__.get("converted_from"))
    adapter = find_norm_adapter(module)
    if adapter is None:
        why = looks_like_norm(module)
        if why is not None:
            raise unknown_norm_error(name, module, why, "convert")
        return None
    if adapter.kind == "keep":
        return None
    check_layout(name, module, adapter)
    origin = module.__dict__.get("converted_from") if isinstance(module, FROZEN_CLASSES) else None
    origin = origin or record_origin(module, adapter)
    return _Source(name, module, "centered", adapter.kind == "frozen", post_norm_of(module), origin)


def _form(module: nn.Module) -> str | None:
    """The form of a new layer: "centered" (BatchNorm-like), "uncentered" (MABN-like) or None (no running stats)."""
    if isinstance(module, StreamNorm):
        return "centered" if module.config.centered else "uncentered"
    if isinstance(module, FROZEN_CLASSES):
        return "centered"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return "centered"
    return None


def _target_class(norm: NormSpec, dim: int) -> type[nn.Module] | None:
    """The class ``norm`` names at ``dim`` (for a name, its row's class), or None for a callable that is no class."""
    if isinstance(norm, str):
        return NORMS[canonical_name(norm)].classes[dim - 1]
    func = norm.func if isinstance(norm, functools.partial) else norm
    return (same_family(func, dim) or func) if inspect.isclass(func) else None


def _keywords(cls: type[nn.Module] | None) -> frozenset[str]:
    """The settings a conversion carries over that ``cls`` takes; none for a callable of the user's own."""
    if cls is None:
        return frozenset()
    if issubclass(cls, StreamNorm):
        return frozenset(cls.config_keywords) | {"affine"} | _DEVICE
    for base, keywords in _KEYWORDS:
        if issubclass(cls, base):
            return keywords
    return frozenset()


def _structure(norm: NormSpec, cls: type[nn.Module] | None, norm_kwargs: dict[str, Any]) -> tuple | None:
    """The structure (:attr:`mabn.NormConfig.structure`) of the layer of this package ``norm`` builds, else None."""
    if cls is None or not issubclass(cls, StreamNorm):
        return None
    given = {**(norm.keywords if isinstance(norm, functools.partial) else {}), **norm_kwargs}
    preset = PRESETS[canonical_name(norm) if isinstance(norm, str) else cls.preset]
    return dataclasses.replace(preset, **{k: given[k] for k in STRUCTURE_FIELDS if given.get(k) is not None}).structure


def _carried(source: _Source, norm: NormSpec, dim: int, norm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings of the source the new layer takes over: those it takes that the user did not give."""
    src = source.module
    ref = src.weight if isinstance(src.weight, Tensor) else src.running_var
    affine = True if source.frozen else bool(getattr(src, "affine", True))
    carried: dict[str, Any] = {"eps": src.eps, "affine": affine, "device": ref.device, "dtype": ref.dtype}
    cls = _target_class(norm, dim)
    if isinstance(src, StreamNorm):
        if src.config.norm_batch_size is not None:
            carried["norm_batch_size"] = src.config.norm_batch_size
        if _structure(norm, cls, norm_kwargs) == src.config.structure:
            # The same kind of layer (e.g. MABN -> MABN with another norm_batch_size): keep its settings.
            carried.update({k: getattr(src.config, k) for k in _SETTINGS})
    takes = _keywords(cls)
    return {k: v for k, v in carried.items() if k in takes and k not in norm_kwargs}


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Carry ``weight`` and ``bias`` over: the same Parameter when dtype and device agree, else a copy."""
    for name in ("weight", "bias"):
        old, new = getattr(src, name, None), getattr(dst, name, None)
        if not isinstance(old, Tensor) or not isinstance(new, Tensor) or old.shape != new.shape:
            continue
        both = isinstance(old, nn.Parameter) and isinstance(new, nn.Parameter)
        if both and old.dtype == new.dtype and old.device == new.device:
            setattr(dst, name, old)
        else:
            # A frozen layer's buffers become trainable parameters and back: values only.
            with torch.no_grad():
                new.copy_(old)
            if both:
                new.requires_grad_(old.requires_grad)


def _same_stream(src: nn.Module, dst: nn.Module) -> bool:
    """Both layers run the same statistics stream, so windows and counters carry over as they are."""
    if not (isinstance(src, StreamNorm) and isinstance(dst, StreamNorm)):
        return False
    return src.config.structure == dst.config.structure and src.config.window == dst.config.window


def _windowless(module: nn.Module) -> bool:
    """Batch statistics both ways (BatchNorm, ghost BN, BRN): no moving-average window to refill."""
    if isinstance(module, StreamNorm):
        return module.config.forward_stats == "batch" and module.config.backward_stats == "batch"
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def _keep_function(source: _Source, dst: nn.Module) -> None:
    """Seed ``dst`` so that its evaluation map equals the source's, or raise ``ValueError`` naming the layer.

    The source computes ``gamma (x - mu) / sqrt(var + eps) + beta``. A centered ``dst`` takes the
    same mean, an uncentered one the mean folded into its bias:
    ``beta' = beta - gamma mu / sqrt(var + eps)``. Both take ``var + eps - eps'`` as their variance,
    so that a different ``eps'`` changes nothing either.
    """
    src = source.module
    mean = src.running_mean.double() if source.form == "centered" else torch.zeros_like(src.running_var.double())
    var = src.running_var.double()
    gamma = src.weight.double() if isinstance(src.weight, Tensor) else torch.ones_like(var)
    beta = src.bias.double() if isinstance(src.bias, Tensor) else torch.zeros_like(var)
    new_var = var + (src.eps - dst.eps)
    if bool((new_var < 0).any()):
        raise ValueError(
            f"cannot keep the function of {source.where}: eps={dst.eps} exceeds running_var + eps of the source "
            f"({src.eps}) in some channel; keep the source's eps"
        )
    if dst.weight is None and not bool((gamma == 1).all()):
        raise ValueError(f"cannot keep the function of {source.where}: its weight is not 1 and the new layer has none")
    if _form(dst) == "centered":
        dst.running_mean.copy_(mean)
        shift = beta
    else:
        shift = beta - gamma * mean * torch.rsqrt(var + src.eps)
    dst.running_var.copy_(new_var)
    if dst.bias is None:
        if bool((shift != 0).any()):
            raise ValueError(
                f"cannot keep the function of {source.where}: it shifts its output (a non-zero running mean or "
                "bias) and the new layer has no bias to hold the shift; convert with affine=True"
            )
    elif source.form == "centered" and _form(dst) == "uncentered":
        # A new Parameter: the source's bias keeps its value (the model is left as it was on failure).
        dst.bias = nn.Parameter(shift.to(dst.bias.dtype), requires_grad=dst.bias.requires_grad)


@torch.no_grad()
def _copy_stats(source: _Source, dst: nn.Module, preserve: str) -> None:
    src = source.module
    src_form, dst_form = source.form, _form(dst)
    if src_form is None or dst_form is None:
        return
    mean = src.running_mean if src_form == "centered" else None
    var = src.running_var
    if preserve == "function":
        _keep_function(source, dst)
    elif src_form == "centered" and dst_form == "uncentered":
        # The second moment E[x^2] = Var[x] + E[x]^2 seeds MABN's running statistic.
        dst.running_var.copy_(var + mean * mean)
    elif src_form == "uncentered" and dst_form == "centered":
        # The same evaluation-mode map: mean 0, variance R.
        dst.running_mean.zero_()
        dst.running_var.copy_(var)
    else:
        dst.running_var.copy_(var)
        if mean is not None:
            dst.running_mean.copy_(mean)
    if _same_stream(src, dst):
        for name in ("forward_window", "forward_steps", "backward_window", "backward_steps", "backward_calls"):
            if hasattr(src, name):
                getattr(dst, name).copy_(getattr(src, name))
    # The call counter drives the warm-ups: it carries over when the new layer continues the same
    # stream, or is of the same form with no window to refill; otherwise the new stream starts at 0.
    counted = isinstance(getattr(src, "num_batches_tracked", None), Tensor) and hasattr(dst, "num_batches_tracked")
    if counted and (_same_stream(src, dst) or (src_form == dst_form and _windowless(dst))):
        dst.num_batches_tracked.copy_(src.num_batches_tracked)


def _check_source(source: _Source, preserve: str) -> None:
    """The errors of a layer that cannot keep its function (with ``preserve="function"``)."""
    if preserve != "function" or source.form is None:
        return
    src = source.module
    if src.training and not source.frozen:
        raise ValueError(
            f"preserve='function' keeps the evaluation-mode function, but {source.where} is in training mode; "
            "call model.eval() first"
        )
    stats = [src.running_var] + ([src.running_mean] if source.form == "centered" else [])
    stats += [t for t in (getattr(src, "weight", None), getattr(src, "bias", None)) if isinstance(t, Tensor)]
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise ValueError(
            f"cannot keep the function of {source.where}: its running statistics or parameters are not finite"
        )


def _post_norm_spec(source: _Source, norm: NormSpec, dim: int, kwargs: dict[str, Any]) -> NormSpec:
    """``norm``, or ghost BN over the whole batch where ``norm`` builds torch's BatchNorm for a source
    with post-norm modules: the same layer, and one that can apply them."""
    if not source.post:
        return norm
    ghost = NORMS["bn"].classes[dim - 1]
    if isinstance(norm, str):
        return ghost if issubclass(norm_class(norm, dim, **kwargs), nn.modules.batchnorm._BatchNorm) else norm
    cls = _target_class(norm, dim)
    if cls is None or not issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return norm
    return functools.partial(ghost, **norm.keywords) if isinstance(norm, functools.partial) else ghost


def _check_post_norm(source: _Source, new: nn.Module) -> None:
    """Raise ``ValueError`` if ``new`` cannot apply the source's post-norm modules (identities need no applying)."""
    if not source.post or isinstance(new, (StreamNorm, *FROZEN_CLASSES)):
        return
    if all(type(m) is nn.Identity for m in source.post.values()):
        source.post = {}  # nothing applied after the normalization
        return
    raise ValueError(
        f"cannot convert {source.where} to {type(new).__name__}: it applies {', '.join(source.post)} after the "
        f"normalization, which {type(new).__name__} cannot keep; choose a norm of this package "
        "(e.g. 'mabn', 'bn' with norm_batch_size, 'brn') or 'frozen_bn'"
    )


def _convert_norm(
    source: _Source, norm: NormSpec, norm_kwargs: dict[str, Any], default_dim: int, preserve: str
) -> nn.Module:
    src = source.module
    dim = norm_dim(src) or default_dim
    kwargs = {**_carried(source, norm, dim, norm_kwargs), **norm_kwargs}
    new = create_norm_layer(_post_norm_spec(source, norm, dim, kwargs), num_channels(src), dim=dim, **kwargs)
    _check_post_norm(source, new)
    if preserve == "function" and _form(new) is None:
        raise ValueError(
            f"cannot keep the function of {source.where}: {type(new).__name__} normalizes by statistics of each "
            "sample, not by running statistics; use preserve='statistics' (the function changes) or a batch norm"
        )
    same_form = _form(new) is not None and _form(new) == source.form
    _copy_params(src, new)
    _copy_stats(source, new, preserve)
    # Same form, same meaning of the running statistics: keep the source's EMA weight. A cumulative
    # average (None) carries over only with its call count, or its first update would discard the
    # statistics just copied.
    trainable = isinstance(new, (StreamNorm, nn.modules.batchnorm._BatchNorm))
    counter = getattr(src, "num_batches_tracked", None)
    if "momentum" not in norm_kwargs and same_form and trainable and isinstance(counter, Tensor):
        if src.momentum is not None or torch.equal(new.num_batches_tracked, counter):
            new.momentum = src.momentum
    if source.post:
        set_post_norm(new, source.post)
    if source.origin is not None and isinstance(new, (StreamNorm, *FROZEN_CLASSES)):
        new.converted_from = source.origin
    return new


def convert_model(
    model: nn.Module,
    norm: NormSpec = "mabn",
    conv: str | None = None,
    *,
    preserve: str = "statistics",
    **norm_kwargs: Any,
) -> nn.Module:
    """Replace every BatchNorm of ``model`` by ``norm`` and, optionally, every conv by its centralized twin.

    Recursive and in place, like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Replaced:
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (as a 2-D layer unless ``dim`` is given), every
    norm layer of this package, and the norm layers of other libraries that :mod:`mabn.adapters`
    knows: timm's ``BatchNormAct2d`` family (its dropout and activation are kept: the new layer
    applies them after the normalization), torchvision's, timm's and detectron2's frozen BatchNorms,
    and every class registered with :func:`mabn.register_norm_adapter`. A layer that looks like a
    BatchNorm but is of another class is refused (the error names it and says how to register it),
    and so is anything the new layer could not compute the same way. With ``conv="centralized"``
    also every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types: subclasses with their own forward
    are left alone) is replaced by :data:`mabn.CENTRALIZED`. Each new layer keeps the old one's
    parameters (the same ``nn.Parameter`` objects, hence ``requires_grad``), device, dtype and
    ``.training``; ``eps``, ``affine`` and ``norm_batch_size`` carry over unless given,
    ``momentum`` when old and new layer have the same form (centered or uncentered; a cumulative
    average, ``momentum=None``, only together with its call count), and every hyper-parameter
    (``window``, ``r_max``, warm-ups, ...) between layers of this package of the same structure
    (e.g. MABN -> MABN with another ``norm_batch_size``), each to the layers whose constructor takes
    it (this package's, torch's; a callable of your own gets the keywords given and nothing else).
    The new layer remembers the class it came from (``layer.converted_from``), which
    :func:`revert_model` builds again.

    Running statistics: between layers of the same form they are copied; from uncentered to
    centered the evaluation map is kept (``running_mean = 0``, ``running_var = R``). From a centered
    layer (a trained BatchNorm) to an uncentered one (MABN), ``preserve`` chooses:

    * ``"statistics"`` (default): ``R = running_var + running_mean ** 2``, the second moment of the
      same activations, and the same ``bias``. The evaluation map changes (no mean is subtracted
      any more) but the first training steps, which normalize by batch second moments, start where
      the statistics are.
    * ``"function"``: ``R = running_var`` and ``bias = beta - gamma * running_mean /
      sqrt(running_var + eps)`` (a new Parameter), so the converted model computes exactly what the
      BatchNorm model did in evaluation mode. In training the batch second moment (var + mean^2) then
      exceeds R wherever the mean is not zero: the renormalization factor r = sqrt(chi^2 / R) is
      clipped at ``r_max`` until the running statistics catch up. The model must be in evaluation
      mode and the statistics finite; a target without running statistics (``"gn"``, ``"ln"``,
      ``"in"``), or without a bias where a non-zero shift must go, is refused. This is the seeding
      to fine-tune a pretrained model with: in ``mabn reproduce finetune`` (results/finetune.md) it
      beats ``"statistics"`` by 3.7 points of mIoU and whole-batch BatchNorm by 1.5.

    Frozen BatchNorms count as centered layers: ``norm="frozen_bn"`` freezes a model's norms into
    their evaluation maps, and a frozen model converts back to any trainable layer. Windows and
    counters carry over between layers that run the same statistics stream. Otherwise
    ``num_batches_tracked`` (the count that drives the warm-ups) carries over to a layer of the same
    form without moving-average windows (BatchNorm, ghost BN, BRN) and starts at 0 in a layer with
    windows (MABN from BatchNorm), whose windows start empty.

    Args:
        model: the model (changed in place).
        norm: the new norm layer: a name, class or partial for :func:`mabn.create_norm_layer`.
            Default: ``"mabn"``.
        conv: ``None`` (leave convolutions) or ``"centralized"``. Centralizing a trained convolution
            changes its function (the weight's per-filter mean is removed, which no bias can make up
            for, as it scales with the input): plain convolutions keep a pretrained model's function.
        preserve: ``"statistics"`` or ``"function"``, see above. Default: ``"statistics"``.
        **norm_kwargs: passed to every new norm layer (e.g. ``norm_batch_size=2``,
            ``process_group=group`` to sync the statistics); ``dim`` sets the dimensionality used
            for layers that take any (``nn.SyncBatchNorm``; default 2).

    Returns:
        ``model``, or the new layer when ``model`` itself is a replaced layer.

    Raises:
        ValueError: unknown ``norm`` name, ``conv`` or ``preserve`` value; a layer that looks like a
            BatchNorm of an unknown class; a BatchNorm without running statistics
            (``track_running_stats=False``); with ``preserve="function"`` a layer in training mode,
            with non-finite statistics, or whose function the new layer cannot keep (each error
            names the layer). The model is left unchanged.

    Example::

        >>> import mabn, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> model = mabn.convert_model(model, "mabn", conv="centralized", norm_batch_size=2)
        >>> [type(m).__name__ for m in model]
        ['CenConv2d', 'MABN2d', 'ReLU']
        >>> [type(m).__name__ for m in mabn.revert_model(model)]
        ['Conv2d', 'BatchNorm2d', 'ReLU']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(norm, str) and canonical_name(norm) not in NORM_NAMES:
        raise ValueError(f"unknown norm layer {norm!r}; known names: {', '.join(NORM_NAMES)}")
    conv = check_conv(conv)
    if preserve not in PRESERVE_CHOICES:
        raise ValueError(f"preserve must be one of {', '.join(map(repr, PRESERVE_CHOICES))}, got {preserve!r}")
    norm_kwargs = dict(norm_kwargs)
    default_dim = norm_kwargs.pop("dim", 2)
    replacements: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        source = _describe(name, module)
        if source is not None:
            _check_source(source, preserve)
            new = _convert_norm(source, norm, norm_kwargs, default_dim, preserve)
        elif conv == "centralized" and type(module) in CENTRALIZED:
            new = retype(module, CENTRALIZED[type(module)])
        else:
            continue
        replacements[id(module)] = carry_flags(module, new)
    return apply_replacements(model, replacements)


def _values_as_batchnorm(src: nn.Module, dim: int, momentum: float | None) -> nn.Module:
    """A torch ``BatchNorm{dim}d`` with the evaluation map of ``src`` (a layer of this package)."""
    affine = isinstance(src.weight, Tensor)
    ref = src.weight if affine else src.running_var
    new = _TORCH_BN_BY_DIM[dim](num_channels(src), src.eps, momentum, affine, True, device=ref.device, dtype=ref.dtype)
    if isinstance(src, StreamNorm):
        _copy_params(src, new)
        with torch.no_grad():
            new.num_batches_tracked.copy_(src.num_batches_tracked)
    else:  # frozen: the buffers become the values of new trainable parameters
        with torch.no_grad():
            new.weight.copy_(src.weight)
            new.bias.copy_(src.bias)
    with torch.no_grad():
        new.running_mean.copy_(src.running_mean)  # zeros in the uncentered form
        new.running_var.copy_(src.running_var)
    return new


def _values_as_frozen(src: nn.Module, dim: int) -> nn.Module:
    """A frozen layer of this package with the evaluation map of ``src``."""
    ref = src.weight if isinstance(src.weight, Tensor) else src.running_var
    new = FROZEN_CLASSES[dim - 1](num_channels(src), src.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if isinstance(src.weight, Tensor):
            new.weight.copy_(src.weight)
            new.bias.copy_(src.bias)
        new.running_mean.copy_(src.running_mean)
        new.running_var.copy_(src.running_var)
    return new


def _revert_norm(name: str, src: nn.Module) -> nn.Module:
    """The layer ``src`` (of this package) came from, or torch's ``BatchNorm*d`` for one built directly."""
    origin: NormOrigin | None = src.__dict__.get("converted_from")
    dim = norm_dim(src) or 2
    post = post_norm_of(src)
    if origin is None:
        if post:
            raise ValueError(
                f"cannot revert {name or 'the model'} ({type(src).__name__}): it applies {', '.join(post)} after the "
                "normalization and no original class is recorded to hold them"
            )
        return _values_as_batchnorm(src, dim, src.momentum)
    if origin.kind == "frozen":
        values = src if isinstance(src, FROZEN_CLASSES) else _values_as_frozen(src, dim)
    else:
        # The layer's EMA weight where it means the same (a centered layer); else the original one.
        centered = not isinstance(src, StreamNorm) or src.config.centered
        momentum = src.momentum if isinstance(src, StreamNorm) and centered else origin.attributes.get("momentum", 0.1)
        values = _values_as_batchnorm(src, dim, momentum)
    return rebuild_origin(origin, values, post)


def _revert_conv(src: nn.Module, centralized_weights: bool) -> nn.Module:
    new = retype(src, PLAIN[type(src)])
    if centralized_weights:
        weight = nn.Parameter(centralize_weight(src.weight.detach()).clone(), requires_grad=src.weight.requires_grad)
        new._parameters["weight"] = weight
    return new


def revert_model(model: nn.Module, centralized_weights: bool = False) -> nn.Module:
    """Turn every layer of this package back into the class it was converted from (the reverse of :func:`convert_model`).

    In place, recursive. A norm layer converted from another class becomes that class again (a
    torch ``BatchNorm2d``, timm's ``BatchNormAct2d`` with its activation and dropout, torchvision's
    ``FrozenBatchNorm2d``, ...) with the same ``eps``, parameters and ``.training``, so its state dict
    loads into the original model; one built directly becomes ``nn.BatchNorm1d/2d/3d``. Centered
    layers keep their running statistics, uncentered ones (MABN) get ``running_mean = 0`` and
    ``running_var = R``: the same evaluation-mode map. ``num_batches_tracked`` and ``momentum`` carry
    over from centered layers (from MABN the original ``momentum`` comes back); moving-average
    windows are dropped. Frozen layers of this package that were converted from another class go
    back to it; ``CenConv*d`` / ``CenLinear`` become ``nn.Conv*d`` / ``nn.Linear``.

    A torch BatchNorm model converted to a centered preset (``"bn"``, ``"brn"``) and reverted is
    restored exactly (state dict, types, ``.training``).

    Args:
        model: the model (changed in place).
        centralized_weights: False keeps the raw weights of centralized layers (the exact reverse of
            ``convert_model(conv="centralized")``); True bakes the centralization into new weights, so the
            plain layer computes what the centralized one did (see :func:`mabn.to_batchnorm`).

    Returns:
        ``model``, or the new layer when ``model`` itself is a reverted layer.

    Raises:
        ValueError: a layer with post-norm modules and no recorded original class (the model is left
            unchanged).

    Example::

        >>> import mabn, torch
        >>> bn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> back = mabn.revert_model(mabn.convert_model(bn, "bn", conv="centralized", norm_batch_size=2))
        >>> [type(m).__name__ for m in back]
        ['Conv2d', 'BatchNorm2d']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replacements: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, StreamNorm) or (
            isinstance(module, FROZEN_CLASSES) and "converted_from" in module.__dict__
        ):
            new = _revert_norm(name, module)
        elif type(module) in PLAIN:
            new = _revert_conv(module, centralized_weights)
        else:
            continue
        replacements[id(module)] = carry_flags(module, new)
    return apply_replacements(model, replacements)
