"""Swap the normalization and convolution layers of whole models, and back.

:func:`convert_model` turns every BatchNorm (and every layer of this package) of a model into the
chosen member of the family and, on request, every convolution and linear layer into its
weight-centralized twin; :func:`revert_model` goes back to plain torch layers. Both work like
:meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: in place, returning the model (a new module
only when the model itself is a replaced layer), with the affine parameters carried over as the
same ``nn.Parameter`` objects, so an optimizer built before the conversion keeps working.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .config import NormConfig
from .conv import CENTRALIZED, centralize_weight, check_conv
from .factory import NORM_NAMES, NormSpec, canonical_name, create_norm_layer, norm_class, same_family
from .frozen import is_frozen_batch_norm, num_channels
from .modules import FAMILIES, StreamNorm

__all__ = ["PRESERVE_CHOICES", "convert_model", "revert_model", "is_norm_layer", "norm_dim"]

#: What :func:`convert_model` keeps when a centered layer (BatchNorm) becomes an uncentered one (MABN).
PRESERVE_CHOICES = ("statistics", "function")

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_TORCH_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_PLAIN = {cen: plain for plain, cen in CENTRALIZED.items()}
# Hyper-parameters that carry over between layers of this package with the same structure.
_CONFIG_KEYS = tuple(
    f.name
    for f in dataclasses.fields(NormConfig)
    if f.name not in ("centered", "forward_stats", "renorm", "backward_stats", "eps", "norm_batch_size")
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers :func:`convert_model` replaces: torch's BatchNorm*d, SyncBatchNorm, this
    package's, and frozen BatchNorms of any library (:func:`mabn.is_frozen_batch_norm`)."""
    return isinstance(module, (*_TORCH_BN, StreamNorm)) or is_frozen_batch_norm(module)


def norm_dim(module: nn.Module) -> int | None:
    """1, 2 or 3 for a layer of a 1/2/3-D family (BatchNorm2d -> 2, MABN1d -> 1), else None.

    Other libraries' frozen BatchNorms count by their class name (``FrozenBatchNorm2d`` -> 2).
    """
    for cls in type(module).__mro__:
        for family in FAMILIES.values():
            if cls in family:
                return family.index(cls) + 1
    name = type(module).__name__
    if is_frozen_batch_norm(module) and name[-2:] in ("1d", "2d", "3d"):
        return int(name[-2])
    return None


def _form(module: nn.Module) -> str | None:
    """The form of a norm layer: "centered" (BatchNorm-like), "uncentered" (MABN-like) or None (no running stats)."""
    if isinstance(module, StreamNorm):
        return "centered" if module.config.centered else "uncentered"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return "centered"
    if is_frozen_batch_norm(module):
        return "centered"
    return None


def _accepts(norm: NormSpec, key: str, dim: int) -> bool:
    """Whether the layer that ``norm`` names takes the keyword ``key``."""
    if isinstance(norm, str):
        func = norm_class(norm, dim)
        if canonical_name(norm) == "bn" and key == "norm_batch_size":
            return True  # "bn" with a normalization batch is ghost BN
        if func in FAMILIES["general"]:
            return key in ("eps", "affine", "device", "dtype") or key in _CONFIG_KEYS or key == "norm_batch_size"
    else:
        func = norm.func if isinstance(norm, functools.partial) else norm
        if inspect.isclass(func):
            func = same_family(func, dim) or func
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _retype(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance with the state of ``module`` (same parameters, hooks and attributes).

    Only valid between classes with the same state (a torch conv and its centralized twin).
    """
    new = cls.__new__(cls)
    # Fresh containers, shared tensors: the original module is left exactly as it was.
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()})
    return new


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


def _same_structure(src: nn.Module, dst: nn.Module) -> bool:
    """Both are layers of this package with the same form and the same kinds of statistics."""
    if not (isinstance(src, StreamNorm) and isinstance(dst, StreamNorm)):
        return False
    keys = ("centered", "forward_stats", "renorm", "backward_stats")
    return all(getattr(src.config, k) == getattr(dst.config, k) for k in keys)


def _same_stream(src: nn.Module, dst: nn.Module) -> bool:
    """Both layers run the same statistics stream, so windows and counters carry over as they are."""
    return _same_structure(src, dst) and src.config.window == dst.config.window


def _windowless(module: nn.Module) -> bool:
    """Batch statistics both ways (BatchNorm, ghost BN, BRN): no moving-average window to refill."""
    if isinstance(module, StreamNorm):
        return module.config.forward_stats == "batch" and module.config.backward_stats == "batch"
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def _keep_function(src: nn.Module, dst: nn.Module) -> None:
    """Seed an uncentered ``dst`` so that its evaluation map equals the centered ``src``'s.

    gamma (x - mu) / sqrt(var + eps) + beta = gamma x / sqrt(R + eps) + beta' with R = var and
    beta' = beta - gamma mu / sqrt(var + eps).
    """
    mean, var = src.running_mean.double(), src.running_var.double()
    gamma = src.weight.double() if isinstance(src.weight, Tensor) else torch.ones_like(var)
    beta = src.bias.double() if isinstance(src.bias, Tensor) else torch.zeros_like(var)
    dst.running_var.copy_(var)
    shift = beta - gamma * mean * torch.rsqrt(var + src.eps)
    if dst.bias is None:
        raise ValueError("an uncentered layer without affine parameters cannot keep a non-zero mean")
    # A new Parameter: the source's bias keeps its value (the model is left as it was on failure).
    dst.bias = nn.Parameter(shift.to(dst.bias.dtype), requires_grad=dst.bias.requires_grad)


@torch.no_grad()
def _copy_stats(src: nn.Module, dst: nn.Module, preserve: str = "statistics") -> None:
    src_form, dst_form = _form(src), _form(dst)
    if src_form is None or dst_form is None:
        return
    mean = src.running_mean
    var = src.running_var
    if src_form == "centered" and dst_form == "uncentered" and preserve == "function":
        _keep_function(src, dst)
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
    counted = hasattr(src, "num_batches_tracked") and hasattr(dst, "num_batches_tracked")
    if counted and (_same_stream(src, dst) or (src_form == dst_form and _windowless(dst))):
        dst.num_batches_tracked.copy_(src.num_batches_tracked)


def _check_source(name: str, src: nn.Module, preserve: str) -> None:
    """The errors of a layer that cannot be converted (named ``name`` in the model)."""
    where = f"{name or 'the model'} ({type(src).__name__}({num_channels(src)}))"
    if isinstance(src, nn.modules.batchnorm._BatchNorm) and not src.track_running_stats:
        raise ValueError(
            f"cannot convert {where} with track_running_stats=False: "
            "the layers of this package always keep running statistics"
        )
    if preserve != "function" or _form(src) != "centered":
        return
    if src.training and not is_frozen_batch_norm(src):
        raise ValueError(
            f"preserve='function' keeps the evaluation-mode function, but {where} is in training mode; "
            "call model.eval() first"
        )
    stats = [src.running_mean, src.running_var]
    stats += [t for t in (getattr(src, "weight", None), getattr(src, "bias", None)) if isinstance(t, Tensor)]
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise ValueError(f"cannot keep the function of {where}: its running statistics or parameters are not finite")


def _convert_norm(
    src: nn.Module, norm: NormSpec, norm_kwargs: dict[str, Any], default_dim: int, preserve: str = "statistics"
) -> nn.Module:
    dim = norm_dim(src) or default_dim
    ref = src.weight if src.weight is not None else src.running_var
    carried: dict[str, Any] = {"eps": getattr(src, "eps", 1e-5), "affine": getattr(src, "affine", True)}
    if ref is not None:
        carried.update(device=ref.device, dtype=ref.dtype)
    nbs = getattr(getattr(src, "config", None), "norm_batch_size", None)
    if nbs is not None:
        carried["norm_batch_size"] = nbs
    kwargs = {k: v for k, v in carried.items() if k not in norm_kwargs and _accepts(norm, k, dim)}
    new = create_norm_layer(norm, num_channels(src), dim=dim, **kwargs, **norm_kwargs)
    if _same_structure(src, new):
        # The same kind of layer (e.g. MABN -> MABN with another norm_batch_size): keep its settings.
        more = {k: getattr(src.config, k) for k in _CONFIG_KEYS if k not in norm_kwargs and _accepts(norm, k, dim)}
        new = create_norm_layer(norm, num_channels(src), dim=dim, **kwargs, **more, **norm_kwargs)
    same_form = _form(new) is not None and _form(new) == _form(src)
    _copy_params(src, new)
    _copy_stats(src, new, preserve)
    # Same form, same meaning of the running statistics: keep the source's EMA weight. A cumulative
    # average (None) carries over only with its call count, or its first update would discard the
    # statistics just copied.
    trainable = isinstance(new, (StreamNorm, nn.modules.batchnorm._BatchNorm))
    if "momentum" not in norm_kwargs and same_form and trainable and hasattr(src, "num_batches_tracked"):
        if src.momentum is not None or torch.equal(new.num_batches_tracked, src.num_batches_tracked):
            new.momentum = src.momentum
    return new


def _finish(src: nn.Module, new: nn.Module) -> nn.Module:
    new.train(src.training)
    if hasattr(src, "qconfig"):
        new.qconfig = src.qconfig
    return new


def _apply(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put every replacement in place (all were built before, so a failure cannot leave a half-converted model)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]
    return replacements.get(id(model), model)


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
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (as a 2-D layer unless ``dim`` is given) and every
    norm layer of this package; with ``conv="centralized"`` also every ``nn.Conv1d/2d/3d`` and
    ``nn.Linear`` (exact types: subclasses with their own forward are left alone) by
    :data:`mabn.CENTRALIZED`. Each new layer keeps the old one's parameters (the same
    ``nn.Parameter`` objects, hence ``requires_grad``), device, dtype and ``.training``; ``eps``,
    ``affine`` and ``norm_batch_size`` carry over unless given, ``momentum`` when old and new layer
    have the same form (centered or uncentered; a cumulative average, ``momentum=None``, only
    together with its call count), and every hyper-parameter (``window``, ``r_max``,
    warm-ups, ...) between layers of this package of the same structure (e.g. MABN -> MABN with
    another ``norm_batch_size``).

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
      mode and the statistics finite. This is the seeding to fine-tune a pretrained model with:
      in ``mabn reproduce finetune`` (results/finetune.md) it beats ``"statistics"`` by 3.7 points
      of mIoU and whole-batch BatchNorm by 1.5.

    Frozen BatchNorms (:class:`mabn.FrozenBatchNorm2d` and other libraries' by duck typing) count as
    centered layers: ``norm="frozen_bn"`` freezes a model's norms into their evaluation maps, and a
    frozen model converts back to any trainable layer. Windows and counters carry over between layers that
    run the same statistics stream. Otherwise ``num_batches_tracked`` (the count that drives the
    warm-ups) carries over to a layer of the same form without moving-average windows (BatchNorm,
    ghost BN, BRN) and starts at 0 in a layer with windows (MABN from BatchNorm), whose windows
    start empty.

    Args:
        model: the model (changed in place).
        norm: the new norm layer: a name, class or partial for :func:`mabn.create_norm_layer`.
            Default: ``"mabn"``.
        conv: ``None`` (leave convolutions) or ``"centralized"``. Centralizing a trained convolution
            changes its function (the weight's per-filter mean is removed, which no bias can make up
            for, as it scales with the input): plain convolutions keep a pretrained model's function.
        preserve: ``"statistics"`` or ``"function"``, see above. Default: ``"statistics"``.
        **norm_kwargs: passed to every new norm layer (e.g. ``norm_batch_size=2``); ``dim`` sets
            the dimensionality used for ``nn.SyncBatchNorm`` (default 2).

    Returns:
        ``model``, or the new layer when ``model`` itself is a replaced layer.

    Raises:
        ValueError: unknown ``norm`` name, ``conv`` or ``preserve`` value, a BatchNorm without running
            statistics (``track_running_stats=False``), or with ``preserve="function"`` a layer in
            training mode or with non-finite statistics (the error names the layer); the model is
            left unchanged.

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
        if is_norm_layer(module):
            _check_source(name, module, preserve)
            new = _convert_norm(module, norm, norm_kwargs, default_dim, preserve)
        elif conv == "centralized" and type(module) in CENTRALIZED:
            new = _retype(module, CENTRALIZED[type(module)])
        else:
            continue
        replacements[id(module)] = _finish(module, new)
    return _apply(model, replacements)


@torch.no_grad()
def _revert_norm(src: StreamNorm) -> nn.Module:
    cls = _TORCH_BN_BY_DIM[norm_dim(src) or 2]
    ref = src.weight if src.weight is not None else src.running_var
    new = cls(
        src.num_features,
        src.eps,
        src.momentum,
        src.affine,
        True,
        device=ref.device,
        dtype=ref.dtype,
    )
    _copy_params(src, new)
    new.running_mean.copy_(src.running_mean)  # zeros in the uncentered form
    new.running_var.copy_(src.running_var)
    new.num_batches_tracked.copy_(src.num_batches_tracked)
    return new


def _revert_conv(src: nn.Module, centered_weights: bool) -> nn.Module:
    new = _retype(src, _PLAIN[type(src)])
    if centered_weights:
        weight = nn.Parameter(centralize_weight(src.weight.detach()).clone(), requires_grad=src.weight.requires_grad)
        new._parameters["weight"] = weight
    return new


def revert_model(model: nn.Module, centered_weights: bool = False) -> nn.Module:
    """Turn every layer of this package back into the torch layer (the reverse of :func:`convert_model`).

    In place, recursive. Norm layers become ``nn.BatchNorm1d/2d/3d`` with the same ``eps``,
    ``momentum``, ``affine``, parameters, ``num_batches_tracked`` and ``.training``; centered layers
    keep their running statistics, uncentered ones (MABN) get ``running_mean = 0`` and
    ``running_var = R``, the same evaluation-mode map. Moving-average windows are dropped.
    ``CenConv*d`` / ``CenLinear`` become ``nn.Conv*d`` / ``nn.Linear``.

    A torch BatchNorm model converted to a centered preset (``"bn"``, ``"ghost_bn"``, ``"brn"``) and
    reverted is restored exactly (state dict, types, ``.training``).

    Args:
        model: the model (changed in place).
        centered_weights: False keeps the raw weights of centralized layers (the exact reverse of
            ``convert_model(conv="centralized")``); True bakes the centering into new weights, so the
            plain layer computes what the centralized one did (see :func:`mabn.to_batchnorm`).

    Returns:
        ``model``, or the new layer when ``model`` itself is a reverted layer.

    Example::

        >>> import mabn, torch
        >>> bn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> back = mabn.revert_model(mabn.convert_model(bn, "ghost_bn", conv="centralized"))
        >>> [type(m).__name__ for m in back]
        ['Conv2d', 'BatchNorm2d']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replacements: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, StreamNorm):
            new = _revert_norm(module)
        elif type(module) in _PLAIN:
            new = _revert_conv(module, centered_weights)
        else:
            continue
        replacements[id(module)] = _finish(module, new)
    return _apply(model, replacements)
