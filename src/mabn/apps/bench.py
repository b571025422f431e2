"""Benchmark the layers, their memory and a ResNet-50 step against torch's BatchNorm (ratios, one run).

Every figure is a ratio of medians measured in the same run, the variants interleaved repeat by
repeat, so that the load of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..conv import CenConv2d
from ..modules import BatchRenorm2d, GhostBatchNorm2d, MABN2d

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
    for _ in range(repeats):
        for name, fn in variants.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _past_warmup(layer: nn.Module, x: Tensor) -> nn.Module:
    """Run a layer until its SMAs and renormalization are active."""
    for _ in range(3):
        layer(x[: min(4, x.shape[0])].detach().requires_grad_()).sum().backward()
    return layer


#: More layers to compare, ``name -> build(num_features)`` (``benchmarks/layers.py`` adds the naive MABN).
EXTRA_LAYERS: dict[str, Callable[[int], nn.Module]] = {}


def layer_variants(shape: tuple[int, ...], memory_format: torch.memory_format) -> dict[str, Callable[[], object]]:
    """fwd+bwd closures of every layer under test at ``shape`` (past warm-up, renorm active)."""
    c = shape[1]
    x = torch.randn(*shape).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(*shape).contiguous(memory_format=memory_format)
    small = dict(warmup_iters=1, renorm_warmup_iters=1)
    b2 = 2 if shape[0] > 2 else 1
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(c),
        "MABN2d B=N": MABN2d(c, window=16, **small),
        f"MABN2d B={b2}": MABN2d(c, window=16, norm_batch_size=b2, **small),
        f"GhostBN2d B={b2}": GhostBatchNorm2d(c, norm_batch_size=b2),
        "BatchRenorm2d": BatchRenorm2d(c, renorm_warmup_iters=1),
    }
    for name, build in EXTRA_LAYERS.items():
        layers[name] = build(c)
    for layer in layers.values():
        _past_warmup(layer, x)

    def step(layer: nn.Module) -> Callable[[], object]:
        def run() -> None:
            layer(x).backward(dy)
            x.grad = None
            layer.zero_grad(set_to_none=True)

        return run

    return {name: step(layer) for name, layer in layers.items()}


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
    small = dict(warmup_iters=1, renorm_warmup_iters=1)
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(c),
        "MABN2d B=N": MABN2d(c, **small),
        "MABN2d B=2": MABN2d(c, norm_batch_size=2, **small),
        "GhostBN2d B=2": GhostBatchNorm2d(c, norm_batch_size=2),
        "BatchRenorm2d": BatchRenorm2d(c, renorm_warmup_iters=1),
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
        for m in model.modules():  # past the warm-ups, renormalization on
            if isinstance(m, MABN2d):
                m.warmup_iters = m.renorm_warmup_iters = 1
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
            for m in model.modules():  # past the warm-ups, renormalization on
                if isinstance(m, MABN2d):
                    m.warmup_iters = m.renorm_warmup_iters = 1
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
        choices=["layers", "memory", "model", "centralization"],
        help="benchmarks to run (default: layers memory)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (median; default 10)")
    parser.add_argument("--quick", action="store_true", help="layers: only the two smallest shapes, contiguous")
    parser.add_argument(
        "--shapes",
        default=None,
        metavar="NxCxHxW,...",
        help="layers: these shapes instead of the default ResNet-50 ones (e.g. 32x1024x14x14,32x2048x7x7)",
    )
    parser.add_argument("--batch", type=int, default=16, help="model: batch size (default 16)")
    parser.add_argument("--image-size", type=int, default=112, help="model: image size (default 112)")
    parser.add_argument("--no-compile", action="store_true", help="model: skip the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes expects comma-separated NxCxHxW with positive sizes, got {item.strip()!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def run(args: argparse.Namespace) -> int:
    """Benchmark MABN against torch's BatchNorm: speed ratios and memory."""
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios of medians over {args.repeats} "
        "interleaved repeats",
        flush=True,
    )
    for what in args.what:
        print(f"\n== {what}", flush=True)
        if what == "layers":
            shapes = [LAYER_SHAPES[0], LAYER_SHAPES[4]] if args.quick else LAYER_SHAPES
            if args.shapes is not None:
                shapes = _parse_shapes(args.shapes)
            print(
                "forward+backward time relative to torch.nn.BatchNorm2d (naive / MABN2d, with benchmarks/layers.py: the speed-up)"
            )
            bench_layers(shapes, args.repeats, channels_last=not args.quick)
        elif what == "memory":
            bench_memory()
            bench_model_memory(args.batch, args.image_size)
        elif what == "model":
            bench_model(args.batch, args.image_size, args.repeats, compile=not args.no_compile)
        elif what == "centralization":
            bench_centralization(args.repeats)
    return 0


run.__doc__ = __doc__
