"""mabn: Moving Average Batch Normalization and the small-batch normalization family for PyTorch."""

from . import models
from .conv import CENTRALIZED, CenConv1d, CenConv2d, CenConv3d, CenLinear, centralize_weight
from .convert import convert_model, revert_model
from .export import export_model
from .factory import NORM_NAMES, create_norm_layer
from .fold import FoldReport, fold, to_batchnorm
from .functional import NormConfig, NormState, stream_norm
from .modules import (
    PRESETS,
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
)
from .monitor import BatchStatsMonitor, read_stats_log

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "NormConfig",
    "NormState",
    "stream_norm",
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
    "CenConv1d",
    "CenConv2d",
    "CenConv3d",
    "CenLinear",
    "CENTRALIZED",
    "centralize_weight",
    "create_norm_layer",
    "NORM_NAMES",
    "convert_model",
    "revert_model",
    "fold",
    "to_batchnorm",
    "FoldReport",
    "export_model",
    "BatchStatsMonitor",
    "read_stats_log",
    "models",
]
