"""Build a model by architecture name from a configuration dict (the form stored in checkpoints).

The detection architectures (torchvision's detectors, :mod:`mabn.models.detection`) are built
through small functions that import torchvision when called, so that importing this module does not.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet import ResNet, resnet18, resnet34, resnet50, resnet_small
from .segmentation import SegmentationFPN, fpn_resnet18, fpn_resnet50, fpn_resnet_small

__all__ = ["ARCHS", "ARCH_TASKS", "DETECTION_ARCHS", "build_model", "encoder_of"]


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
            :mod:`mabn.models.detection`, which imports torchvision). Only ``arch`` is required; the
            others default to the builder's defaults. ``"frozen_encoder": True`` makes the norm
            layers of the encoder (:func:`encoder_of`) :class:`mabn.FrozenBatchNorm2d`.

    Returns:
        The model (training mode, freshly initialized: load a state dict into it).

    Raises:
        ValueError: unknown arch or an option the arch does not take (named in the message).
        TypeError: ``model_config`` or ``norm_kwargs`` is not a dict.

    Example::

        >>> import mabn
        >>> cfg = {"arch": "resnet_small", "num_classes": 10, "in_channels": 1, "norm": "mabn",
        ...        "norm_kwargs": {"norm_batch_size": 2}, "conv": "centralized", "depth": 1, "width": 16}
        >>> type(mabn.models.build_model(cfg).bn1).__name__
        'MABN2d'
    """
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict, got {type(model_config).__name__}")
    arch = model_config.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} in model_config; known: {', '.join(ARCHS)}")
    builder = ARCHS[arch]
    if arch in DETECTION_ARCHS:
        builder = getattr(importlib.import_module("mabn.models.detection"), arch)  # its real signature
    norm_kwargs = model_config.get("norm_kwargs") or {}
    if not isinstance(norm_kwargs, dict):
        raise TypeError(f"model_config['norm_kwargs'] must be a dict, got {norm_kwargs!r}")
    params = inspect.signature(builder).parameters
    extra = {k: v for k, v in model_config.items() if k not in _CONFIG_KEYS}
    unknown = [k for k in extra if k not in params or params[k].kind is inspect.Parameter.VAR_KEYWORD]
    unknown += [k for k in ("norm_layer", "conv_layer") if k in extra]
    if unknown:
        raise ValueError(
            f"model_config has options that arch {arch!r} does not take: {', '.join(sorted(set(unknown)))}"
        )
    kwargs: dict[str, Any] = {k: model_config[k] for k in ("num_classes", "in_channels") if k in model_config}
    model = builder(
        **kwargs,
        norm_layer=model_config.get("norm", "bn"),
        conv_layer=model_config.get("conv"),
        **extra,
        **norm_kwargs,
    )
    if model_config.get("frozen_encoder"):
        from ..convert import convert_model

        convert_model(encoder_of(model), "frozen_bn")
    return model


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
