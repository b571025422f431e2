"""Build a model by architecture name from a configuration dict (the form stored in checkpoints).

The detection architectures (torchvision's detectors, :mod:`mabn.models.detection`) are built
through small functions that import torchvision when called, so that importing this module does not.
The classifiers of timm and torchvision (``"timm:resnet50d"``, ``"torchvision:mobilenet_v3_large"``)
are built by their library, imported then, and converted to the chosen norm by :func:`mabn.convert_model`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .resnet import ResNet, resnet18, resnet34, resnet50, resnet_small
from .segmentation import SegmentationFPN, fpn_resnet18, fpn_resnet50, fpn_resnet_small

__all__ = [
    "ARCHS",
    "ARCH_TASKS",
    "DETECTION_ARCHS",
    "LIBRARIES",
    "arch_task",
    "build_model",
    "check_arch",
    "encoder_of",
    "library_arch",
]


def _detection_builder(name: str) -> Callable[..., nn.Module]:
    """The builder ``name`` of :mod:`mabn.models.detection`, imported (with torchvision) on first call."""

    def build(**kwargs: Any) -> nn.Module:
        return getattr(importlib.import_module("mabn.models.detection"), name)(**kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Lazily imported :func:`mabn.models.detection.{name}` (torchvision is imported when called)."
    return build


#: The detectors (torchvision's FCOS, RetinaNet and Mask R-CNN on a small ResNet with a feature pyramid).
DETECTION_ARCHS = ("fcos_resnet_small", "retinanet_resnet_small", "maskrcnn_resnet_small")

#: arch name -> builder. Classifiers (``task = "classification"``), FPN segmentation models
#: (``task = "segmentation"``; the names start with ``fpn_``) and detectors (``task = "detection"``).
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet_small": resnet_small,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "fpn_resnet_small": fpn_resnet_small,
    "fpn_resnet18": fpn_resnet18,
    "fpn_resnet50": fpn_resnet50,
    **{name: _detection_builder(name) for name in DETECTION_ARCHS},
}

#: arch name -> the task its models do (the ``task`` attribute of the model classes).
ARCH_TASKS: dict[str, str] = {
    **{name: ResNet.task for name in ("resnet_small", "resnet18", "resnet34", "resnet50")},
    **{name: SegmentationFPN.task for name in ("fpn_resnet_small", "fpn_resnet18", "fpn_resnet50")},
    **{name: "detection" for name in DETECTION_ARCHS},
}

_CONFIG_KEYS = ("arch", "num_classes", "in_channels", "norm", "norm_kwargs", "conv", "frozen_encoder")

#: The libraries whose classifiers an arch may name: ``"timm:NAME"``, ``"torchvision:NAME"``.
LIBRARIES = ("timm", "torchvision")

#: torchvision classifiers built with other defaults: their auxiliary heads would make the training
#: output a tuple, and every classifier here trains on one output.
_TORCHVISION_OPTIONS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False},
    "inception_v3": {"aux_logits": False},
}


def library_arch(arch: object) -> tuple[str, str] | None:
    """``(library, name)`` of an arch written ``"library:name"``, None for any other.

    The library is not checked (:func:`check_arch` does).

    Example::

        >>> library_arch("timm:resnet50d"), library_arch("resnet50")
        (('timm', 'resnet50d'), None)
    """
    if not isinstance(arch, str) or ":" not in arch:
        return None
    library, _, name = arch.partition(":")
    return library.strip(), name.strip()


def _import_library(library: str) -> None:
    try:
        importlib.import_module(library)
    except ImportError:
        raise ValueError(f"{library} is not installed (pip install {library})") from None


def _classifiers(library: str) -> list[str]:
    """The names of ``library``'s classifiers (torchvision's other models left out)."""
    if library == "timm":
        return list(importlib.import_module("timm").list_models())
    models = importlib.import_module("torchvision.models")
    return list(models.list_models(module=models))


def _is_classifier(library: str, name: str) -> bool:
    if library == "timm":
        # timm also takes a name with a pretrained tag (resnet50d.a1_in1k), which its list leaves out.
        return bool(importlib.import_module("timm").is_model(name))
    return name in _classifiers(library)


def _unknown_model(option: str, arch: str, library: str, name: str) -> ValueError:
    where = "timm.list_models()" if library == "timm" else "torchvision.models.list_models(module=torchvision.models)"
    if library == "torchvision" and name in importlib.import_module("torchvision.models").list_models():
        return ValueError(f"{option} {arch!r} is not a classifier: torchvision:NAME takes the classifiers of {where}")
    close = difflib.get_close_matches(name, _classifiers(library), n=3)
    hint = f"; did you mean {', '.join(f'{library}:{c}' for c in close)}?" if close else ""
    return ValueError(f"unknown {option} {arch!r}: {library} has no classifier {name!r}{hint} (the names: {where})")


def check_arch(arch: object, option: str = "arch") -> str:
    """``arch`` if it names a model :func:`build_model` builds; else a ValueError naming it.

    Args:
        arch: a key of :data:`ARCHS`, or ``"timm:NAME"`` / ``"torchvision:NAME"`` for a classifier of
            those libraries (imported to check the name).
        option: what the messages call the value (``"--arch"`` on the command line).

    Returns:
        ``arch``.

    Raises:
        ValueError: an unknown arch, library or model name (with the closest names), or a library that
            is not installed.

    Example::

        >>> check_arch("resnet_small")
        'resnet_small'
        >>> check_arch("keras:resnet50")
        Traceback (most recent call last):
        ...
        ValueError: unknown arch 'keras:resnet50': the library must be one of timm, torchvision (timm:NAME, torchvision:NAME)
    """
    if arch in ARCHS:
        return str(arch)
    parts = library_arch(arch)
    if parts is None:
        raise ValueError(
            f"unknown {option} {arch!r}; choose one of {', '.join(ARCHS)}, or a classifier of timm or "
            "torchvision as timm:NAME or torchvision:NAME"
        )
    library, name = parts
    if library not in LIBRARIES:
        raise ValueError(
            f"unknown {option} {arch!r}: the library must be one of {', '.join(LIBRARIES)} "
            f"({', '.join(f'{lib}:NAME' for lib in LIBRARIES)})"
        )
    _import_library(library)
    if not _is_classifier(library, name):
        raise _unknown_model(option, str(arch), library, name)
    return str(arch)


def arch_task(arch: str) -> str:
    """The task of an arch's models: :data:`ARCH_TASKS`, ``"classification"`` for timm's and torchvision's.

    Example::

        >>> arch_task("fpn_resnet_small"), arch_task("timm:resnet50d")
        ('segmentation', 'classification')
    """
    if arch in ARCH_TASKS:
        return ARCH_TASKS[arch]
    if library_arch(arch) is not None:
        return "classification"
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}, timm:NAME, torchvision:NAME")


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """Build a model from its configuration, as stored in training checkpoints.

    Args:
        model_config: ``{"arch": name, "num_classes": int, "in_channels": int, "norm": name,
            "norm_kwargs": dict, "conv": None|"centralized"}`` plus the arch's own options (``depth``,
            ``width`` for ``resnet_small`` and ``fpn_resnet_small``; ``decoder_channels`` and
            ``stem_stride`` for the ``fpn_`` archs; ``zero_init_residual``). ``arch`` is a key of
            :data:`ARCHS`: ``resnet_small``, ``resnet18``, ``resnet34``, ``resnet50`` (classifiers),
            ``fpn_resnet_small``, ``fpn_resnet18``, ``fpn_resnet50`` (segmentation),
            ``fcos_resnet_small``, ``retinanet_resnet_small``, ``maskrcnn_resnet_small`` (detection,
            :mod:`mabn.models.detection`, which imports torchvision), or a classifier of timm or
            torchvision: ``"timm:NAME"`` (``timm.create_model(NAME, num_classes=..., in_chans=...)``)
            or ``"torchvision:NAME"`` (``torchvision.models.get_model(NAME, num_classes=...)``, its
            first convolution rebuilt for ``in_channels`` when that is not 3), built without
            pretrained weights and then converted by :func:`mabn.convert_model` with ``norm``,
            ``conv`` and ``norm_kwargs`` (these take no other options). Only ``arch`` is required;
            the others default to the builder's defaults. ``"frozen_encoder": True`` makes the norm
            layers of the encoder (:func:`encoder_of`) :class:`mabn.FrozenBatchNorm2d`.

    Returns:
        The model (training mode, freshly initialized: load a state dict into it).

    Raises:
        ValueError: unknown arch (library or model name too), an option the arch does not take, or a
            timm/torchvision model without a BatchNorm to convert (named in the message).
        TypeError: ``model_config`` or ``norm_kwargs`` is not a dict.

    Example::

        >>> import mabn
        >>> cfg = {"arch": "resnet_small", "num_classes": 10, "in_channels": 1, "norm": "mabn",
        ...        "norm_kwargs": {"norm_batch_size": 2}, "conv": "centralized", "depth": 1, "width": 16}
        >>> type(mabn.models.build_model(cfg).bn1).__name__
        'MABN2d'
        >>> cfg = {"arch": "torchvision:resnet18", "num_classes": 4, "in_channels": 1, "norm": "mabn"}
        >>> model = mabn.models.build_model(cfg)
        >>> type(model.bn1).__name__, model.conv1.in_channels
        ('MABN2d', 1)
    """
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict, got {type(model_config).__name__}")
    norm_kwargs = model_config.get("norm_kwargs") or {}
    if not isinstance(norm_kwargs, dict):
        raise TypeError(f"model_config['norm_kwargs'] must be a dict, got {norm_kwargs!r}")
    if library_arch(model_config.get("arch")) is not None:
        model = _build_library_model(model_config, norm_kwargs)
    else:
        model = _build_own_model(model_config, norm_kwargs)
    if model_config.get("frozen_encoder"):
        from ..convert import convert_model

        convert_model(encoder_of(model), "frozen_bn")
    return model


def _build_own_model(model_config: dict[str, Any], norm_kwargs: dict[str, Any]) -> nn.Module:
    """A model of :data:`ARCHS`, its norm and conv layers built by name."""
    arch = model_config.get("arch")
    if arch not in ARCHS:
        raise ValueError(
            f"unknown arch {arch!r} in model_config; known: {', '.join(ARCHS)}, timm:NAME, torchvision:NAME"
        )
    builder = ARCHS[arch]
    if arch in DETECTION_ARCHS:
        builder = getattr(importlib.import_module("mabn.models.detection"), arch)  # its real signature
    params = inspect.signature(builder).parameters
    extra = {k: v for k, v in model_config.items() if k not in _CONFIG_KEYS}
    unknown = [k for k in extra if k not in params or params[k].kind is inspect.Parameter.VAR_KEYWORD]
    unknown += [k for k in ("norm_layer", "conv_layer") if k in extra]
    if unknown:
        raise ValueError(
            f"model_config has options that arch {arch!r} does not take: {', '.join(sorted(set(unknown)))}"
        )
    kwargs: dict[str, Any] = {k: model_config[k] for k in ("num_classes", "in_channels") if k in model_config}
    return builder(
        **kwargs,
        norm_layer=model_config.get("norm", "bn"),
        conv_layer=model_config.get("conv"),
        **extra,
        **norm_kwargs,
    )


def _build_library_model(model_config: dict[str, Any], norm_kwargs: dict[str, Any]) -> nn.Module:
    """A timm or torchvision classifier (no pretrained weights) with its BatchNorms converted to the norm."""
    from ..convert import convert_model, is_norm_layer

    arch = check_arch(model_config["arch"])
    library, name = library_arch(arch) or ("", "")
    extra = sorted(k for k in model_config if k not in _CONFIG_KEYS)
    if extra:
        raise ValueError(f"model_config has options that arch {arch!r} does not take: {', '.join(extra)}")
    num_classes, in_channels = model_config.get("num_classes", 1000), model_config.get("in_channels", 3)
    if library == "timm":
        model = _create_timm(arch, name, num_classes, in_channels)
    else:
        model = _create_torchvision(arch, name, num_classes, in_channels)
    norm = model_config.get("norm", "bn")
    if not any(is_norm_layer(m) for m in model.modules()):
        # Training it with its own norms would report a norm the model does not have.
        found = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}) or ["none"]
        raise ValueError(
            f"arch {arch!r} has no BatchNorm for norm {norm!r} to replace (its normalization: {', '.join(found)})"
        )
    return convert_model(model, norm, conv=model_config.get("conv"), **norm_kwargs)


def _create_timm(arch: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    timm = importlib.import_module("timm")
    try:  # pretrained=False: nothing is downloaded
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except TypeError as exc:
        raise ValueError(f"cannot build arch {arch!r} with {in_channels} input channels: {exc}") from None


def _create_torchvision(arch: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    models = importlib.import_module("torchvision.models")
    options = _TORCHVISION_OPTIONS.get(name, {})
    model = models.get_model(name, weights=None, num_classes=num_classes, **options)  # weights=None: no download
    if in_channels != 3:
        _replace_input_conv(model, in_channels, arch)
    return model


def _replace_input_conv(model: nn.Module, in_channels: int, arch: str) -> None:
    """Give the model's first convolution, which reads the 3-channel image, ``in_channels`` inputs.

    Every other setting stays. Input channel ``c`` of the new weight is channel ``c mod 3`` of the old
    one, so the weight's values are those the model's own initialization drew.
    """
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or type(found[1]) is not nn.Conv2d or found[1].in_channels != 3 or found[1].groups != 1:
        raise ValueError(f"arch {arch!r}: no plain nn.Conv2d reads its 3-channel input, to give it {in_channels}")
    name, conv = found
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, torch.arange(in_channels) % conv.in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def encoder_of(model: nn.Module) -> nn.Module:
    """The ResNet a model is built on: the classifier itself, a segmentation model's ``encoder``,
    a detector's ``backbone.encoder`` (the part a pretrained classifier's weights fit).

    Example::

        >>> import mabn
        >>> model = mabn.models.fpn_resnet_small()
        >>> encoder_of(model) is model.encoder
        True
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(getattr(backbone, "encoder", None), ResNet):
        return backbone.encoder
    return model.encoder if isinstance(getattr(model, "encoder", None), ResNet) else model
