"""The experiment grids of ``mabn reproduce``: their rows, protocols and metrics (data only).

A grid is a list of :class:`GridRun` rows trained under one protocol (a dict of ``mabn train``
keys); only the normalization, its normalization batch, weight centralization and, for the
fine-tuning grid, the initialization change between rows. See :mod:`mabn.apps.reproduce`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import PRESET_DESCRIPTIONS

__all__ = [
    "GRIDS",
    "GRID_SPECS",
    "PROTOCOL",
    "SEGMENTATION_PROTOCOL",
    "DETECTION_PROTOCOL",
    "GridRun",
    "GridSpec",
    "grid_runs",
]

#: The classification protocol (docs/design.md, section 12): Table 1, the ablation, the batch sweep.
PROTOCOL: dict[str, Any] = {
    "data": "fashion-mnist",
    "arch": "resnet_small",
    "depth": 1,
    "width": 16,
    "batch_size": 32,
    "epochs": 6,
    "lr": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "weight_decay": 1e-4,
    "nesterov": False,
}

#: The dense-prediction protocol: FPN on the small ResNet, 96 px scenes of 3-5 items, gradient batch
#: 16 (8 simulated devices x 2 images). 9,600 training scenes x 3 epochs keep one run near 4 minutes
#: on one CPU thread, so a 3-seed grid of 6 rows fits in about an hour on 2 cores.
SEGMENTATION_PROTOCOL: dict[str, Any] = {
    "data": "fashion-scenes",
    "arch": "fpn_resnet_small",
    "image_size": 96,
    "limit_train": 9600,
    "depth": 1,
    "width": 16,
    "batch_size": 16,
    "epochs": 3,
    "lr": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "weight_decay": 1e-4,
    "nesterov": False,
}

#: The detection protocol: torchvision's FCOS on the small ResNet with a two-level feature pyramid
#: (strides 4 and 8), the same 96 px scenes, gradient batch 16 (8 simulated devices x 2 images).
#: One 16-image step costs 0.20-0.30 s of one CPU thread depending on the norm, so 12,000 training
#: scenes x 3 epochs (2,250 steps) keep one run near 10 minutes and the 3-seed grid of 8 rows near
#: 2 hours on 2 cores; only the end of a run is evaluated (COCO AP of the model and its folded form).
DETECTION_PROTOCOL: dict[str, Any] = {
    "data": "fashion-scenes",
    "task": "detection",
    "arch": "fcos_resnet_small",
    "image_size": 96,
    "limit_train": 12000,
    "depth": 1,
    "width": 16,
    "batch_size": 16,
    "epochs": 3,
    "eval_every": 3,
    "lr": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "weight_decay": 1e-4,
    "nesterov": False,
}
#: The paper's Table 5 recipe for MABN in detection heads: batch statistics in the heads for about the
#: first ninth of training (10,000 of its 90,000 iterations), here 250 of the 2,250 steps.
DETECTION_HEAD_WARMUP = 250

#: Pre-training of the fine-tuning grid's encoder: the classification protocol's BN(32) ResNet.
PRETRAIN_PROTOCOL: dict[str, Any] = {**PROTOCOL, "epochs": 3, "norm": "bn", "seed": 0}

#: Fine-tuning: the segmentation protocol, shorter (the encoder starts trained).
FINETUNE_PROTOCOL: dict[str, Any] = {**SEGMENTATION_PROTOCOL, "epochs": 2}


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One row of a grid: a normalization at a normalization batch, with or without WC.

    Attributes:
        method: the name shown in tables and plots (``"BN"``, ``"MABN"``, ``"uncentered_ema"`` ...).
        norm: the ``mabn.create_norm_layer`` name.
        norm_batch_size: samples per normalization group; None for per-sample norms.
        wc: weight-centralized convolutions (the paper's WC).
        norm_kwargs: extra keywords of the norm layer.
        processes: run under ``torchrun`` with this many processes (the gradient batch is split
            between them); more than one syncs the statistics (``--sync-norm``).
        options: further ``mabn train`` keys of the row (fine-tuning: ``init``, ``freeze_norm`` ...).
        pretrained: start from the grid's pre-trained encoder (``init``).
        name: the row's label, when ``method(B)`` does not say it.
    """

    method: str
    norm: str
    norm_batch_size: int | None
    wc: bool = False
    norm_kwargs: tuple[tuple[str, Any], ...] = ()
    processes: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    pretrained: bool = False
    name: str | None = None

    @property
    def label(self) -> str:
        """``"MABN(2)+WC"``-style name of the row."""
        if self.name is not None:
            return self.name
        size = f"({self.norm_batch_size})" if self.norm_batch_size is not None else ""
        label = f"{self.method}{size}" + ("+WC" if self.wc and self.method != "MABN" else "")
        return label + (f" x{self.processes} processes" if self.processes > 1 else "")

    @property
    def slug(self) -> str:
        """Directory name of the row."""
        if self.name is not None:
            return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-").replace("--", "-")
        size = f"-b{self.norm_batch_size}" if self.norm_batch_size is not None else ""
        procs = f"-p{self.processes}" if self.processes > 1 else ""
        return f"{self.method.lower()}{size}" + ("-wc" if self.wc else "") + procs

    def config(self, base: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
        """The ``mabn train`` configuration of this row for ``seed``, writing under ``out``."""
        b = self.norm_batch_size
        batch = base["batch_size"] // self.processes
        # BN over the whole (per-process) batch is exactly torch's BatchNorm2d: use the native layer.
        if self.norm == "bn" and b == base["batch_size"]:
            b = None
        config = {
            **base,
            "norm": self.norm,
            "norm_batch_size": b,
            "norm_kwargs": dict(self.norm_kwargs),
            "conv": "centralized" if self.wc else None,
            "batch_size": batch,
            "seed": seed,
            "out": str(out / self.slug / f"seed{seed}"),
            **dict(self.options),
        }
        if self.processes > 1:
            config["sync_norm"] = True
        if self.pretrained:
            config["init"] = str(out / "pretrain" / "checkpoint.pt")
        return config


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """How a grid is run and reported.

    Attributes:
        protocol: the ``mabn train`` keys shared by every row.
        metric: ``"error"`` (top-1 %, lower is better), ``"miou"`` (mean IoU %) or ``"box_ap"``
            (COCO box AP %), both higher is better.
        extra_metrics: further metrics reported with their mean (detection: AP50, AP75).
        baseline: label of the row the others are compared with.
        seeds: default number of seeds.
        pretrain: the protocol of a pre-training run the rows start from (``pretrained`` rows).
        figure_rows: rows whose seed-0 predictions ``<grid>_predictions.png`` shows (dense grids).
    """

    protocol: dict[str, Any]
    metric: str = "error"
    extra_metrics: tuple[str, ...] = ()
    baseline: str = "BN(32)"
    seeds: int = 1
    pretrain: dict[str, Any] | None = None
    figure_rows: tuple[str, ...] = ()


#: Descriptions of the ablation's presets (the paper's Table 2 wording).
ABLATION_ROWS = PRESET_DESCRIPTIONS

# 8 groups in every layer: torch's usual 32 would leave one channel per group in 16-channel layers.
_GN = GridRun("GN", "gn", None, norm_kwargs=(("num_groups", 8),))


def _classification_grids() -> dict[str, list[GridRun]]:
    table1 = [GridRun("BN", "bn", 32), GridRun("BN", "bn", 2), GridRun("BRN", "brn", 2)]
    table1 += [GridRun("MABN", "mabn", 2, wc=True), _GN]
    pairs = [("bn", 32), ("uncentered", 32), ("bn", 2), ("brn", 2), ("bn_ema_sma", 2)]
    pairs += [("uncentered", 2), ("uncentered_ema", 2), ("mabn", 2)]
    ablation = [GridRun(n, n, b, wc=wc) for wc in (False, True) for n, b in pairs]
    sweep = [GridRun("BN", "bn", b) for b in (32, 16, 8, 4, 2)]
    sweep += [GridRun("BRN", "brn", b) for b in (32, 16, 8, 4, 2)]
    sweep += [GridRun("MABN", "mabn", b, wc=True) for b in (32, 16, 8, 4, 2, 1)]
    quick = [GridRun("BN", "bn", 32), GridRun("BN", "bn", 2), GridRun("MABN", "mabn", 2, wc=True)]
    return {"table1": table1, "ablation": ablation, "batch-sweep": sweep, "quick": quick}


def _segmentation_grid() -> list[GridRun]:
    return [
        GridRun("BN", "bn", 16),  # whole gradient batch: what SyncBN over 8 devices gives
        GridRun("BN", "bn", 2),  # per-device statistics at 2 images per device
        GridRun("BRN", "brn", 2),
        _GN,
        GridRun("MABN", "mabn", 2, wc=True),
        GridRun("BN", "bn", 16, wc=True),  # control: what WC alone does to the whole-batch row
        GridRun("BN", "bn", 2, wc=True),  # control: what WC alone does to per-device BN
        GridRun("SyncBN", "bn", 16, processes=2),  # the whole-batch row, for real on 2 processes
    ]


def _detection_grid() -> list[GridRun]:
    # The segmentation grid's rows; every norm of backbone, pyramid and heads changes together, and
    # MABN's heads keep their batch statistics for longer (the paper's Table 5 recipe).
    mabn = GridRun("MABN", "mabn", 2, wc=True, options=(("head_warmup_iters", DETECTION_HEAD_WARMUP),))
    return [mabn if r.norm == "mabn" else r for r in _segmentation_grid()]


def _finetune_grid() -> list[GridRun]:
    def tuned(name: str, norm: str, b: int | None, wc: bool = False, **options: Any) -> GridRun:
        return GridRun(norm.upper(), norm, b, wc=wc, options=tuple(options.items()), pretrained=True, name=name)

    return [
        tuned("BN(16) ceiling", "bn", 16),
        tuned("BN(2)", "bn", 2),
        tuned("BN(2)+recal", "bn", 2, recalibrate=200),
        # The pretrained encoder's BatchNorms frozen, the new decoder's BN(2) (as detectron2 freezes the backbone).
        tuned("frozen BN", "bn", 2, freeze_norm=True),
        tuned("MABN(2) function", "mabn", 2, init_preserve="function"),
        tuned("MABN(2) statistics", "mabn", 2, init_preserve="statistics"),
        tuned("MABN(2)+WC function", "mabn", 2, wc=True, init_preserve="function"),
        dataclasses.replace(_GN, name="GN scratch"),
    ]


def _grids() -> dict[str, list[GridRun]]:
    return {
        **_classification_grids(),
        "segmentation": _segmentation_grid(),
        "finetune": _finetune_grid(),
        "detection": _detection_grid(),
    }


#: grid name -> its rows.
GRIDS: dict[str, list[GridRun]] = _grids()

#: grid name -> how it is run and reported.
GRID_SPECS: dict[str, GridSpec] = {
    "table1": GridSpec(PROTOCOL, seeds=3),
    "ablation": GridSpec(PROTOCOL),
    "batch-sweep": GridSpec(PROTOCOL),
    "quick": GridSpec({**PROTOCOL, "epochs": 3}),
    "segmentation": GridSpec(
        SEGMENTATION_PROTOCOL,
        metric="miou",
        baseline="BN(16)",
        seeds=3,
        figure_rows=("BN(16)", "BN(2)", "GN", "MABN(2)"),
    ),
    "finetune": GridSpec(
        FINETUNE_PROTOCOL,
        metric="miou",
        baseline="BN(16) ceiling",
        seeds=3,
        pretrain=PRETRAIN_PROTOCOL,
        figure_rows=("BN(2)", "frozen BN", "MABN(2) function", "GN scratch"),
    ),
    "detection": GridSpec(
        DETECTION_PROTOCOL,
        metric="box_ap",
        extra_metrics=("box_ap50", "box_ap75"),
        baseline="BN(16)",
        seeds=3,
        figure_rows=("BN(2)", "GN", "MABN(2)"),
    ),
}


def grid_runs(grid: str) -> list[GridRun]:
    """The rows of a grid; a ValueError names the known grids."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[grid]
