"""Build a model by architecture name from a configuration dict (the form stored in checkpoints)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet import ResNet, resnet18, resnet34, resnet50, resnet_small
from .segmentation import SegmentationFPN, fpn_resnet18, fpn_resnet50, fpn_resnet_small

__all__ = ["ARCHS", "ARCH_TASKS", "build_model"]

#: arch name -> builder. Classifiers (``task = "classification"``) and FPN segmentation models
#: (``task = "segmentation"``; the names start with ``fpn_``).
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet_small": resnet_small,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "fpn_resnet_small": fpn_resnet_small,
    "fpn_resnet18": fpn_resnet18,
    "fpn_resnet50": fpn_resnet50,
}

#: arch name -> the task its models do (the ``task`` attribute of the model classes).
ARCH_TASKS: dict[str, str] = {
    **{name: ResNet.task for name in ("resnet_small", "resnet18", "resnet34", "resnet50")},
    **{name: SegmentationFPN.task for name in ("fpn_resnet_small", "fpn_resnet18", "fpn_resnet50")},
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
            ``fpn_resnet_small``, ``fpn_resnet18``, ``fpn_resnet50`` (segmentation). Only ``arch`` is
            required; the others default to the builder's defaults. ``"frozen_encoder": True`` makes
            the norm layers of the encoder (of the whole classifier) :class:`mabn.FrozenBatchNorm2d`.

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

        convert_model(getattr(model, "encoder", model), "frozen_bn")
    return model
