"""Benchmark the layers, their memory and training steps against torch's BatchNorm (ratios, one run).

Every figure is a ratio of medians measured in the same run, the variants interleaved repeat by
repeat, so that the load of a shared machine falls on all of them alike. ``small`` times the layers
at every norm-layer shape of ResNet-50 (224 px) and FPN-ResNet-50 (512 px) at 1 and 2 samples,
``step`` whole training steps at 2 images per device; ``--out`` writes their tables as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conv import CenConv2d
from ..convert import is_norm_layer
from ..factory import default_num_groups
from ..frozen import FrozenBatchNorm2d
from ..kernels import use_paths
from ..modules import BatchRenorm2d, GhostBatchNorm2d, MABN2d, StreamNorm

LAYER_SHAPES = [
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (2, 256, 200, 200),
]


def _median_times(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each variant, the variants interleaved within each repeat."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    # A collection before each timed call keeps the collector out of the timings. The objects that
    # exist now (torch's, the models') are frozen first: otherwise each collection walks all of them,
    # a quarter of a second with torch imported, which would dominate runs of many small calls.
    gc.freeze()
    try:
        for _ in range(repeats):
            for name, fn in variants.items():
                gc.collect()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.unfreeze()
    return {name: statistics.median(ts) for name, ts in times.items()}


#: Warm-ups of 2 steps: past them after 2 calls, and the same phase tables (one boundary per warm-up)
#: as the default hyper-parameters, so a call runs the operations it runs after the real warm-ups.
PAST_WARMUP = {"warmup_iters": 2, "renorm_warmup_iters": 2}


def _past_warmup(layer: nn.Module, x: Tensor) -> nn.Module:
    """Run a layer until its SMAs and renormalization are active."""
    for _ in range(3):
        layer(x.detach().requires_grad_()).sum().backward()
    layer.zero_grad(set_to_none=True)
    return layer


def _fwd_bwd_variants(layers: dict[str, nn.Module], x: Tensor, dy: Tensor) -> dict[str, Callable[[], object]]:
    """A forward+backward closure per layer (past its warm-ups) on ``x`` with incoming gradient ``dy``."""
    for layer in layers.values():
        _past_warmup(layer, x)

    def step(layer: nn.Module) -> Callable[[], object]:
        def run() -> None:
            layer(x).backward(dy)
            x.grad = None
            layer.zero_grad(set_to_none=True)

        return run

    return {name: step(layer) for name, layer in layers.items()}


#: More layers to compare, ``name -> build(num_features)`` (``benchmarks/layers.py`` adds the naive MABN).
EXTRA_LAYERS: dict[str, Callable[[int], nn.Module]] = {}


def layer_variants(shape: tuple[int, ...], memory_format: torch.memory_format) -> dict[str, Callable[[], object]]:
    """fwd+bwd closures of every layer under test at ``shape`` (past warm-up, renorm active)."""
    c = shape[1]
    x = torch.randn(*shape).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(*shape).contiguous(memory_format=memory_format)
    b2 = 2 if shape[0] > 2 else 1
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(c),
        "MABN2d B=N": MABN2d(c, window=16, **PAST_WARMUP),
        f"MABN2d B={b2}": MABN2d(c, window=16, norm_batch_size=b2, **PAST_WARMUP),
        f"GhostBN2d B={b2}": GhostBatchNorm2d(c, norm_batch_size=b2),
        "BatchRenorm2d": BatchRenorm2d(c, renorm_warmup_iters=PAST_WARMUP["renorm_warmup_iters"]),
    }
    for name, build in EXTRA_LAYERS.items():
        layers[name] = build(c)
    return _fwd_bwd_variants(layers, x, dy)


def bench_layers(shapes: list[tuple[int, ...]], repeats: int, channels_last: bool = True) -> list[dict]:
    rows = []
    formats = [("contiguous", torch.contiguous_format)] + (
        [("channels_last", torch.channels_last)] if channels_last else []
    )
    for shape in shapes:
        for fmt_name, fmt in formats:
            variants = layer_variants(shape, fmt)
            medians = _median_times(variants, repeats)
            bn = medians["BatchNorm2d"]
            mabn_time = medians["MABN2d B=N"]
            row = {"shape": "x".join(map(str, shape)), "layout": fmt_name, "bn_ms": bn * 1e3}
            for name, t in medians.items():
                if name != "BatchNorm2d":
                    row[name] = t / bn
            if "naive MABN B=N" in medians:
                row["naive / MABN2d"] = medians["naive MABN B=N"] / mabn_time
            rows.append(row)
            print(_format_row(row), flush=True)
            del variants
            gc.collect()
    return rows


def _format_row(row: dict) -> str:
    parts = [f"{row['shape']:>16s} {row['layout']:>13s}  BN {row['bn_ms']:7.1f} ms"]
    parts += [f"{k} {v:.2f}x" for k, v in row.items() if k not in ("shape", "layout", "bn_ms")]
    return " | ".join(parts)


def set_past_warmup(model: nn.Module) -> nn.Module:
    """Give the model's layers with moving averages or renormalization warm-ups of :data:`PAST_WARMUP`."""
    for m in model.modules():
        if isinstance(m, StreamNorm):
            if m.config.forward_stats == "sma" or m.config.backward_stats == "sma":
                m.warmup_iters = PAST_WARMUP["warmup_iters"]
            if m.config.renorm:
                m.renorm_warmup_iters = PAST_WARMUP["renorm_warmup_iters"]
    return model


# ---- layers at one or two samples: the norm-layer shapes of the workloads ------------------------------

#: The models whose norm-layer shapes ``bench small`` times: (name, builder name, image size).
WORKLOADS = (("ResNet-50", "resnet50", 224), ("FPN-ResNet-50", "fpn_resnet50", 512))

#: Samples per call of ``bench small`` (MABN's regime: one or two per device).
SMALL_BATCHES = (1, 2)


def norm_input_shapes(model: nn.Module, x: Tensor) -> list[tuple[int, ...]]:
    """The distinct per-sample input shapes (C, H, W) of ``model``'s norm layers on ``x``, in call order.

    Read by forward pre-hooks during one forward pass (on the meta device it computes nothing).
    """
    shapes: list[tuple[int, ...]] = []

    def record(module: nn.Module, args: tuple) -> None:
        shape = tuple(args[0].shape[1:])
        if shape not in shapes:
            shapes.append(shape)

    # Every norm a workload may be built with: the converters' (BatchNorms, this package's) and GroupNorm.
    norms = [m for m in model.modules() if is_norm_layer(m) or isinstance(m, nn.GroupNorm)]
    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def workload_shapes() -> list[tuple[int, ...]]:
    """The distinct (C, H, W) norm-layer inputs of ResNet-50 at 224 px and FPN-ResNet-50 at 512 px."""
    from .. import models

    shapes: list[tuple[int, ...]] = []
    for _, builder, size in WORKLOADS:
        with torch.device("meta"):  # shapes only: no weights, no arithmetic
            model = getattr(models, builder)()
            x = torch.empty(1, 3, size, size)
        shapes += [s for s in norm_input_shapes(model, x) if s not in shapes]
    return shapes


class _Composed(nn.Module):
    """A layer run on the composed torch operations (what a CPU without a C compiler runs)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        with use_paths(step="composed"):
            return self.layer(x)


def small_batch_layers(channels: int, batch: int) -> dict[str, nn.Module]:
    """The layers ``bench small`` compares, BatchNorm2d first (the reference)."""
    return {
        "BatchNorm2d": nn.BatchNorm2d(channels),
        "MABN2d": MABN2d(channels, norm_batch_size=batch, **PAST_WARMUP),
        "MABN2d composed": _Composed(MABN2d(channels, norm_batch_size=batch, **PAST_WARMUP)),
        "GhostBN2d": GhostBatchNorm2d(channels, norm_batch_size=batch),
        "BatchRenorm2d": BatchRenorm2d(channels, renorm_warmup_iters=PAST_WARMUP["renorm_warmup_iters"]),
        "FrozenBN2d": FrozenBatchNorm2d(channels),
        "GroupNorm(32)": nn.GroupNorm(default_num_groups(channels, 32), channels),
    }


def bench_small(shapes: list[tuple[int, ...]], repeats: int) -> list[dict]:
    """Forward+backward of each layer of :func:`small_batch_layers` at each (N, C, H, W), both layouts."""
    rows = []
    for shape in shapes:
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
            dy = torch.randn(*shape).contiguous(memory_format=fmt)
            variants = _fwd_bwd_variants(small_batch_layers(shape[1], shape[0]), x, dy)
            medians = _median_times(variants, repeats)
            bn = medians["BatchNorm2d"]
            row: dict[str, Any] = {"shape": "x".join(map(str, shape)), "layout": layout, "bn_ms": bn * 1e3}
            row.update({name: t / bn for name, t in medians.items() if name != "BatchNorm2d"})
            rows.append(row)
            print(_format_row(row), flush=True)
            del variants, x, dy
            gc.collect()
    return rows


def ratio_columns(rows: list[dict]) -> list[str]:
    """The ratio columns of benchmark rows (every key but shape, layout and BN time), in order."""
    return [k for k in rows[0] if k not in ("shape", "layout", "bn_ms")] if rows else []


def small_markdown(rows: list[dict]) -> str:
    """The table of :func:`bench_small` rows: shape, layout, BatchNorm2d ms, then ratios to it."""
    columns = ratio_columns(rows)
    lines = [
        "| shape (N x C x H x W) | layout | BN ms | " + " | ".join(f"{c} / BN" for c in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = [row["shape"], row["layout"], f"{row['bn_ms']:.3f}", *(f"{row[c]:.2f}" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_summary(rows: list[dict]) -> list[str]:
    """One line per layer: min-max (median, shape of the max) of its ratio to BatchNorm2d per layout, over the rows."""
    lines = []
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    batches = sorted({int(row["shape"].split("x")[0]) for row in rows})
    shapes = len({row["shape"].split("x", 1)[1] for row in rows})
    for column in ratio_columns(rows):
        parts = []
        for layout in layouts:
            ratios = [row[column] for row in rows if row["layout"] == layout]
            worst = max((row for row in rows if row["layout"] == layout), key=lambda row: row[column])["shape"]
            median = statistics.median(ratios)
            parts.append(f"{layout} {min(ratios):.2f}-{max(ratios):.2f}x (median {median:.2f}x, max at {worst})")
        n = ", ".join(map(str, batches))
        lines.append(f"{column} / BatchNorm2d, N = {n}, {shapes} shapes: " + "; ".join(parts))
    return lines


# ---- whole training steps at 2 images per device ----------------------------------------------------


@dataclasses.dataclass
class StepWorkload:
    """A training step to time: the models of each row, the batch, the loss and the optimizer.

    ``loss(model, batch)`` runs the model on the batch and returns the scalar to backpropagate.
    """

    name: str
    models: dict[str, Callable[[], nn.Module]]
    make_batch: Callable[[], tuple[Any, Any]]
    loss: Callable[[Callable[..., Any], tuple[Any, Any]], Tensor]
    optimizer: dict[str, float]


#: The rows of ``bench step``, the first the reference.
STEP_ROWS = ("BN(2)", "MABN(2)+WC", "MABN(2), no WC", "GN")


def _grid_models(grid_name: str, protocol: dict[str, Any], num_classes: int) -> dict[str, Callable[[], nn.Module]]:
    """The rows of ``STEP_ROWS`` as the grid ``grid_name`` builds them, at 2 images per device.

    Exactly what ``mabn train`` builds for each row: the scenes are 1-channel images.
    """
    from ..models import build_model
    from .grids import grid_runs
    from .train.config import check_config, model_config

    grid = {run.label: run for run in grid_runs(grid_name)}
    runs = {
        "BN(2)": grid["BN(2)"],  # at batch 2: torch's BatchNorm2d (the grid's rule for B = the batch)
        "MABN(2)+WC": grid["MABN(2)"],
        "MABN(2), no WC": dataclasses.replace(grid["MABN(2)"], wc=False),
        "GN": grid["GN"],
    }

    def builder(run: Any) -> Callable[[], nn.Module]:
        config = check_config(run.config(protocol, 0, Path("unused")))
        return lambda: build_model(model_config(config, num_classes, 1))

    return {label: builder(run) for label, run in runs.items()}


def _classification_loss(model: Callable[..., Any], batch: tuple[Any, Any]) -> Tensor:
    from .train.evaluate import task_loss

    x, target = batch
    return task_loss(model(x), target)


def _scenes_step(
    grid: str, protocol: dict[str, Any], make_batch: Callable[[int, int], tuple[Any, Any]], loss: Callable[..., Tensor]
) -> StepWorkload:
    """A scenes grid's model at 2 images per device, on a batch ``make_batch(size, classes)``, with its SGD."""
    from .scenes import SCENE_CLASSES

    protocol = {**protocol, "batch_size": 2}
    size, classes = protocol["image_size"], len(SCENE_CLASSES)
    return StepWorkload(
        f"{grid} ({protocol['arch']}, {size} px, batch 2)",
        _grid_models(grid, protocol, classes),
        lambda: make_batch(size, classes),
        loss,
        {"lr": protocol["lr"], "momentum": 0.9, "weight_decay": protocol["weight_decay"]},
    )


def segmentation_step() -> StepWorkload:
    """The segmentation grid's model, batch 2: fpn_resnet_small at 96 px, 11 classes, its SGD."""
    from .grids import SEGMENTATION_PROTOCOL

    def batch(size: int, classes: int) -> tuple[Tensor, Tensor]:
        return torch.randn(2, 1, size, size), torch.randint(0, classes, (2, size, size))

    return _scenes_step("segmentation", SEGMENTATION_PROTOCOL, batch, _classification_loss)


def _scene_targets(size: int, classes: int) -> list[dict[str, Tensor]]:
    """Two images' detection targets: three boxes each, of random classes, inside the canvas."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(2):
        corners = torch.randint(0, size // 2, (3, 2), generator=generator).float()
        sides = torch.randint(12, size // 2, (3, 2), generator=generator).float()
        boxes = torch.cat([corners, corners + sides], dim=1)
        labels = torch.randint(1, classes, (3,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def _detection_loss(model: Callable[..., Any], batch: tuple[Any, Any]) -> Tensor:
    x, targets = batch
    losses = model(list(x), targets)
    return torch.stack(list(losses.values())).sum()


def detection_step() -> StepWorkload:
    """The detection grid's model, batch 2: FCOS on the small ResNet with its pyramid, 96 px scenes."""
    from .grids import DETECTION_PROTOCOL

    def batch(size: int, classes: int) -> tuple[Tensor, list[dict[str, Tensor]]]:
        return torch.rand(2, 1, size, size), _scene_targets(size, classes)

    return _scenes_step("detection", DETECTION_PROTOCOL, batch, _detection_loss)


def resnet50_step(image_size: int = 224) -> StepWorkload:
    """ResNet-50 classification at ``image_size`` px, batch 2, 1000 classes, SGD with momentum."""
    from ..models import resnet50

    kwargs: dict[str, dict[str, Any]] = {
        "BN(2)": {"norm_layer": "bn"},
        "MABN(2)+WC": {"norm_layer": "mabn", "conv_layer": "centralized", "norm_batch_size": 2},
        "MABN(2), no WC": {"norm_layer": "mabn", "norm_batch_size": 2},
        "GN": {"norm_layer": "gn"},  # 32 groups
    }
    return StepWorkload(
        f"ResNet-50 ({image_size} px, batch 2)",
        {label: (lambda kw=kw: resnet50(**kw)) for label, kw in kwargs.items()},
        lambda: (torch.randn(2, 3, image_size, image_size), torch.randint(0, 1000, (2,))),
        _classification_loss,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    )


#: ``bench step --workloads``: name -> workload.
STEP_WORKLOADS: dict[str, Callable[[], StepWorkload]] = {
    "segmentation": segmentation_step,
    "detection": detection_step,
    "resnet50-160": lambda: resnet50_step(160),
    "resnet50-224": lambda: resnet50_step(224),
}


def training_step(
    model: nn.Module, batch: tuple[Any, Any], loss: Callable[..., Tensor], optimizer: dict, compile: bool
) -> Callable[[], None]:
    """One SGD training step of ``model`` on ``batch`` (the model compiled with ``torch.compile`` on request)."""
    opt = torch.optim.SGD(model.parameters(), **optimizer)
    run_model = torch.compile(model) if compile else model

    def step() -> None:
        value = loss(run_model, batch)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


def _compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_step(workloads: list[str], repeats: int, compile: bool) -> list[dict]:
    """Training steps at 2 images per device: each row's time over BN(2)'s, eager and compiled.

    Each row also records its first step's time (the model's first call: the layers' plans and
    tables, and, compiled, the compilation), relative to BN(2)'s first step.
    """
    rows = []
    for key in workloads:
        workload = STEP_WORKLOADS[key]()
        for mode in ["eager"] + (["compiled"] if compile else []):
            torch.manual_seed(0)
            batch = workload.make_batch()
            variants, first = {}, {}
            for label, build in workload.models.items():
                model = set_past_warmup(build().train())
                variants[label] = training_step(model, batch, workload.loss, workload.optimizer, mode == "compiled")
                start = time.perf_counter()
                variants[label]()
                first[label] = time.perf_counter() - start
            # Compiled: the first calls compile (forward and backward graphs); 3 calls also pass the warm-ups.
            for fn in variants.values():
                for _ in range(2):
                    fn()
            graphs = _compiled_graphs()
            medians = _median_times(variants, repeats, warmup=0)
            recompiled = _compiled_graphs() - graphs
            if recompiled:
                print(f"warning: {recompiled} graph(s) compiled during the timed repeats", flush=True)
            bn = medians[STEP_ROWS[0]]
            row: dict[str, Any] = {"workload": workload.name, "mode": mode, "bn_s": bn, "recompiled": recompiled}
            row.update({label: t / bn for label, t in medians.items() if label != STEP_ROWS[0]})
            row["first_s"] = first
            rows.append(row)
            ratios = ", ".join(f"{label} {v:.2f}x" for label, v in row.items() if label in STEP_ROWS)
            firsts = ", ".join(f"{label} {t:.2f} s" for label, t in first.items())
            print(f"{workload.name:>40s} {mode:>8s}: BN(2) {bn * 1e3:8.1f} ms/step | {ratios}", flush=True)
            print(f"{'':>40s} {'':>8s}  first step: {firsts}", flush=True)
            del variants
            gc.collect()
    return rows


def step_markdown(rows: list[dict]) -> str:
    """The tables of :func:`bench_step` rows: the steps' times over BN(2)'s, then the first steps' times."""
    columns = [label for label in STEP_ROWS[1:] if rows and label in rows[0]]
    lines = [
        "| workload | mode | BN(2) ms/step | " + " | ".join(f"{c} / BN(2)" for c in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for row in rows:
        mode = row["mode"] + (f" ({row['recompiled']} graphs compiled while timed)" if row.get("recompiled") else "")
        cells = [row["workload"], mode, f"{row['bn_s'] * 1e3:.1f}", *(f"{row[c]:.2f}" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "First step of each model (seconds; the layers' plans and tables, and compiled, the compilation):",
        "",
        "| workload | mode | " + " | ".join(STEP_ROWS) + " |",
        "|---|---|" + "---:|" * len(STEP_ROWS),
    ]
    for row in rows:
        first = row.get("first_s", {})
        lines.append(
            f"| {row['workload']} | {row['mode']} | " + " | ".join(f"{first.get(c, 0.0):.2f}" for c in STEP_ROWS) + " |"
        )
    return "\n".join(lines)


def saved_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes the autograd graph keeps for the backward of one call (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    # The input itself is counted: BatchNorm keeps it too.
    return sum(storages.values())


def bench_memory(shape: tuple[int, ...] = (32, 256, 56, 56)) -> list[dict]:
    c = shape[1]
    x = torch.randn(*shape)
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(c),
        "MABN2d B=N": MABN2d(c, **PAST_WARMUP),
        "MABN2d B=2": MABN2d(c, norm_batch_size=2, **PAST_WARMUP),
        "GhostBN2d B=2": GhostBatchNorm2d(c, norm_batch_size=2),
        "BatchRenorm2d": BatchRenorm2d(c, renorm_warmup_iters=PAST_WARMUP["renorm_warmup_iters"]),
        **{name: build(c) for name, build in EXTRA_LAYERS.items()},
    }
    rows = []
    bn = None
    for name, layer in layers.items():
        _past_warmup(layer, x)
        nbytes = saved_bytes(layer, x)
        bn = bn or nbytes
        rows.append({"layer": name, "saved_MB": nbytes / 2**20, "ratio": nbytes / bn})
        print(f"{name:>16s}: {nbytes / 2**20:8.1f} MB saved for backward ({nbytes / bn:.2f}x BatchNorm2d)", flush=True)
    return rows


def bench_model_memory(batch: int = 16, image_size: int = 112) -> list[dict]:
    """Activation memory of a ResNet-50 training step: bytes saved for backward by its forward."""
    from ..models import resnet50

    x = torch.randn(batch, 3, image_size, image_size)
    configs = {
        f"ResNet-50 BN (B={batch})": dict(norm_layer="bn"),
        "ResNet-50 MABN (B=2) + WC": dict(norm_layer="mabn", conv_layer=CenConv2d, norm_batch_size=2),
    }
    rows, bn = [], None
    for name, kwargs in configs.items():
        model = resnet50(**kwargs)
        set_past_warmup(model)
        nbytes = saved_bytes(model, x)
        bn = bn or nbytes
        rows.append({"layer": name, "saved_MB": nbytes / 2**20, "ratio": nbytes / bn})
        print(
            f"{name:>26s}: {nbytes / 2**20:8.1f} MB saved for backward at {image_size} px ({nbytes / bn:.3f}x BN)",
            flush=True,
        )
    return rows


def bench_model(batch: int, image_size: int, repeats: int, compile: bool) -> list[dict]:
    """ResNet-50 training step: BN at B=batch vs MABN at B=2 (with and without weight centralization)."""
    from ..models import resnet50

    configs = {
        f"BN (B={batch})": dict(norm_layer="bn"),
        "MABN (B=2) + WC": dict(norm_layer="mabn", conv_layer=CenConv2d, norm_batch_size=2),
        "MABN (B=2), no WC": dict(norm_layer="mabn", norm_batch_size=2),
    }
    x = torch.randn(batch, 3, image_size, image_size)
    target = torch.randint(0, 1000, (batch,))
    rows = []
    modes = [("eager", False)] + ([("compiled", True)] if compile else [])
    for mode, use_compile in modes:
        variants = {}
        for name, kwargs in configs.items():
            model = resnet50(**kwargs)
            set_past_warmup(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            run_model = torch.compile(model) if use_compile else model

            def step(run_model=run_model, opt=opt) -> None:
                loss = nn.functional.cross_entropy(run_model(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            variants[name] = step
        medians = _median_times(variants, repeats)
        bn = medians[f"BN (B={batch})"]
        for name, t in medians.items():
            row = {"mode": mode, "config": name, "step_s": t, "ratio": t / bn}
            rows.append(row)
            print(f"{mode:>8s} {name:>18s}: {t:6.2f} s/step  ({t / bn:.2f}x BN)", flush=True)
    return rows


def bench_centralization(repeats: int) -> list[dict]:
    """Weight centralization's own cost: CenConv2d vs Conv2d forward+backward at ResNet-50 shapes."""
    shapes = [(32, 64, 56, 56, 64, 3), (32, 256, 28, 28, 256, 3), (32, 1024, 14, 14, 256, 1)]
    rows = []
    for n, cin, h, w, cout, k in shapes:
        x = torch.randn(n, cin, h, w)
        plain = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        cen = CenConv2d(cin, cout, k, padding=k // 2, bias=False)

        def step(conv: nn.Module, x: Tensor = x) -> Callable[[], None]:
            def run() -> None:
                conv(x).sum().backward()
                conv.zero_grad(set_to_none=True)

            return run

        medians = _median_times({"Conv2d": step(plain), "CenConv2d": step(cen)}, repeats)
        ratio = medians["CenConv2d"] / medians["Conv2d"]
        label = f"{n}x{cin}x{h}x{w} -> {cout}, {k}x{k}"
        rows.append({"conv": label, "conv_ms": medians["Conv2d"] * 1e3, "ratio": ratio})
        print(f"{label:>32s}: Conv2d {medians['Conv2d'] * 1e3:7.1f} ms, CenConv2d {ratio:.3f}x", flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        nargs="*",
        default=["layers", "memory"],
        choices=["layers", "memory", "model", "centralization", "small", "step"],
        help="benchmarks to run (default: layers memory); small: layers at the workloads' norm-layer shapes at "
        "1 and 2 samples; step: training steps at 2 images per device",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (median; default 10)")
    parser.add_argument("--quick", action="store_true", help="layers: only the two smallest shapes, contiguous")
    parser.add_argument(
        "--shapes",
        default=None,
        metavar="NxCxHxW,...",
        help="layers, small: these shapes instead of the default ones (e.g. 32x1024x14x14,32x2048x7x7)",
    )
    parser.add_argument(
        "--batches",
        default=",".join(map(str, SMALL_BATCHES)),
        metavar="N,...",
        help="small: samples per call at every workload shape (default 1,2)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(STEP_WORKLOADS),
        metavar="NAME,...",
        help="step: segmentation and detection (the grids' models at 96 px), resnet50-160, resnet50-224; default: all",
    )
    parser.add_argument("--batch", type=int, default=16, help="model: batch size (default 16)")
    parser.add_argument("--image-size", type=int, default=112, help="model: image size (default 112)")
    parser.add_argument("--no-compile", action="store_true", help="model, step: skip the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="FILE", help="small, step: also write their tables (markdown)")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes expects comma-separated NxCxHxW with positive sizes, got {item.strip()!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _parse_batches(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"--batches expects comma-separated positive integers, got {text!r}")
    return [int(item) for item in items]


def _parse_workloads(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    unknown = [name for name in names if name not in STEP_WORKLOADS]
    if unknown or not names:
        raise ValueError(f"--workloads takes {', '.join(STEP_WORKLOADS)} (comma-separated), got {text!r}")
    return names


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (the options that matter for small and step)."""
    words = ["mabn", "bench", *args.what, "--repeats", str(args.repeats)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if "small" in args.what:
        words += ["--shapes", args.shapes] if args.shapes is not None else []
        words += ["--batches", args.batches] if _parse_batches(args.batches) != list(SMALL_BATCHES) else []
    if "step" in args.what and args.workloads != ",".join(STEP_WORKLOADS):
        words += ["--workloads", args.workloads]
    if args.no_compile:
        words.append("--no-compile")
    if args.out is not None:
        words += ["--out", args.out]
    env = [f"{k}={os.environ[k]}" for k in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY") if k in os.environ]
    return " ".join(env + words)


def run(args: argparse.Namespace) -> int:
    """Benchmark MABN against torch's BatchNorm: speed ratios and memory."""
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    # Every option is checked before anything runs.
    shapes = _parse_shapes(args.shapes) if args.shapes is not None else None
    batches = _parse_batches(args.batches)
    workloads = _parse_workloads(args.workloads)
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: its directory does not exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios of medians over {args.repeats} "
        "interleaved repeats"
    )
    print(header, flush=True)
    sections = []
    for what in args.what:
        print(f"\n== {what}", flush=True)
        if what == "layers":
            layer_shapes = [LAYER_SHAPES[0], LAYER_SHAPES[4]] if args.quick else LAYER_SHAPES
            print(
                "forward+backward time relative to torch.nn.BatchNorm2d (naive / MABN2d, with benchmarks/layers.py: the speed-up)"
            )
            bench_layers(shapes or layer_shapes, args.repeats, channels_last=not args.quick)
        elif what == "memory":
            bench_memory()
            bench_model_memory(args.batch, args.image_size)
        elif what == "model":
            bench_model(args.batch, args.image_size, args.repeats, compile=not args.no_compile)
        elif what == "centralization":
            bench_centralization(args.repeats)
        elif what == "small":
            small_shapes = shapes or [(n, *chw) for chw in workload_shapes() for n in batches]
            print("forward+backward time relative to torch.nn.BatchNorm2d, one row per shape and layout")
            rows = bench_small(small_shapes, args.repeats)
            table, summary = small_markdown(rows), ratio_summary(rows)
            print("\n" + table + "\n\n" + "\n".join(summary), flush=True)
            sections.append(
                "## Layers at one and two samples\n\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary)
            )
        elif what == "step":
            rows = bench_step(workloads, args.repeats, compile=not args.no_compile)
            table = step_markdown(rows)
            print("\n" + table, flush=True)
            sections.append("## Training steps at 2 images per device\n\n" + table)
    if args.out is not None and sections:
        text = "\n\n".join([f"Produced by:\n\n    {_command(args)}\n\n{header}.", *sections]) + "\n"
        Path(args.out).write_text(text)
        print(f"\nwrote {args.out}", flush=True)
    return 0


run.__doc__ = __doc__
