"""mabn: Moving Average Batch Normalization and the small-batch normalization family for PyTorch.

The library (this package, importing torch only): the engine (:mod:`mabn.functional`), the layers
(:mod:`mabn.modules`), weight centralization (:mod:`mabn.conv`), the factory, the converters,
folding, export, activation checkpointing, the batch-statistics monitor and the models. The
application (the ``mabn`` command: training, data, reproduction grids, benchmarks) lives in
:mod:`mabn.apps` and is never imported from here.
"""

from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil
from typing import Any as _Any

from . import adapters, models
from .adapters import NormAdapter, is_frozen_batch_norm, register_norm_adapter, unregister_norm_adapter
from .config import PRESETS, NormConfig
from .conv import CENTRALIZED, CONV_CHOICES, CenConv1d, CenConv2d, CenConv3d, CenLinear, centralize_weight
from .convert import convert_model, is_norm_layer, revert_model
from .factory import NORM_NAMES, create_norm_layer
from .fold import FoldReport, fold, to_batchnorm
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .functional import NormState, stream_norm
from .modules import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GeneralBatchNorm1d,
    GeneralBatchNorm2d,
    GeneralBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    MABN1d,
    MABN2d,
    MABN3d,
    StreamNorm,
)
from .recalibrate import recalibrate, update_bn
from .recompute import checkpoint, checkpoint_context

__version__ = "0.3.0"

# Loaded on first use: the monitor (CSV/JSON logs) and the exporter (ONNX) are not needed to train.
_LAZY = {
    "BatchStatsMonitor": "mabn.monitor",
    "read_stats_log": "mabn.monitor",
    "export_model": "mabn.export",
}

#: The library's public submodules, each importable as ``mabn.<name>`` on first use (the
#: application, ``mabn.apps``, is not part of the library).
_SUBMODULES = tuple(m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "apps")


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mabn' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API and the public submodules."""
    return sorted({"__version__", *__all__, *_SUBMODULES})


__all__ = [
    "PRESETS",
    "NormConfig",
    "NormState",
    "stream_norm",
    "StreamNorm",
    "MABN1d",
    "MABN2d",
    "MABN3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GeneralBatchNorm1d",
    "GeneralBatchNorm2d",
    "GeneralBatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "is_frozen_batch_norm",
    "is_norm_layer",
    "register_norm_adapter",
    "unregister_norm_adapter",
    "NormAdapter",
    "adapters",
    "CenConv1d",
    "CenConv2d",
    "CenConv3d",
    "CenLinear",
    "CENTRALIZED",
    "CONV_CHOICES",
    "centralize_weight",
    "create_norm_layer",
    "NORM_NAMES",
    "convert_model",
    "revert_model",
    "fold",
    "to_batchnorm",
    "FoldReport",
    "recalibrate",
    "update_bn",
    "export_model",
    "checkpoint",
    "checkpoint_context",
    "BatchStatsMonitor",
    "read_stats_log",
    "models",
]
