"""Inference throughput of ResNet-50 with folded BN / MABN vs GroupNorm, InstanceNorm, LayerNorm (paper Figure 1a).

Every model is ResNet-50 (ImageNet layout, 1000 classes) in evaluation mode, float32, NCHW, on the CPU:

* BN folded: ``mabn.fold`` of the BatchNorm model (plain convolutions with bias);
* MABN folded: ``mabn.fold`` of the MABN model with weight-centralized convolutions (the same graph);
* GroupNorm(32), InstanceNorm (affine), LayerNorm over (C, H, W) (``GroupNorm(1, C)``): these
  normalize each sample with its own statistics and cannot fold;
* optionally (``--unfolded``) BN and MABN + WC without folding.

Running statistics are calibrated on one random batch (so activations keep a normal scale; no
denormals), then the models are timed interleaved (``interleaved.py``): each round runs every model
at every batch size in a fresh random order, ``--iters`` forward passes per batch size, and the
figures are medians over ``--rounds`` rounds. Ratios to "BN folded" are medians of the per-round ratios (each round's models ran within
seconds of each other, so a slow period of the shared machine hits them alike).

OpenMP threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it): on a machine whose cores are shared with other work, spinning threads burn the
time slices the busy core needs, and two-thread passes become erratic (up to 20x slower).

    python benchmarks/inference.py --threads 2 --out results/inference.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import torch  # noqa: E402
from interleaved import interleaved_rounds  # noqa: E402  (beside this script)
from torch import nn  # noqa: E402

import mabn  # noqa: E402
from mabn import models  # noqa: E402


def _calibrate(model: nn.Module, batch: int, size: int) -> nn.Module:
    """Running statistics of one random batch (momentum 1), so evaluation-mode activations keep their scale."""
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, mabn.StreamNorm))]
    if norms:
        for m in norms:
            m.momentum = 1.0
        model.train()
        with torch.no_grad():
            model(torch.randn(batch, 3, size, size))
    return model.eval()


def build_models(size: int, unfolded: bool) -> dict[str, nn.Module]:
    """name -> eval-mode model (float32). Folded models are checked against their unfolded source."""
    out: dict[str, nn.Module] = {}
    specs = [
        ("BN folded", "bn", None, True),
        ("MABN folded", "mabn", "centralized", True),
        ("GroupNorm(32)", "gn", None, False),
        ("InstanceNorm", "in", None, False),
        ("LayerNorm (GN(1,C))", "ln", None, False),
    ]
    if unfolded:
        specs += [("BN unfolded", "bn", None, False), ("MABN+WC unfolded", "mabn", "centralized", False)]
    for name, norm, conv, folded in specs:
        torch.manual_seed(0)
        model = _calibrate(models.resnet50(norm_layer=norm, conv_layer=conv), 4, min(size, 128))
        if folded:
            x = torch.randn(2, 3, 64, 64)
            result, report = mabn.fold(model, return_report=True)
            with torch.no_grad():
                err = ((result(x) - model(x)).abs().max() / model(x).abs().max()).item()
            if err > 1e-3 or report.unfolded:
                raise RuntimeError(f"{name}: folding check failed (relative error {err:.2e}, kept {report.unfolded})")
            model = result
        out[name] = model
    return out


def run_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    nets = build_models(args.image_size, args.unfolded)
    names = list(nets)
    inputs = {b: torch.randn(b, 3, args.image_size, args.image_size) for b in args.batch_sizes}
    iters = dict(zip(args.batch_sizes, args.iters))
    # samples[batch][name] = seconds per pass, one entry per round
    samples = interleaved_rounds(nets, inputs, args.rounds, iters, args.seed, label="b{}")
    return {
        "names": names,
        "samples": samples,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": time.perf_counter() - t0,
    }


def summarize(result: dict, batch_sizes: list[int]) -> list[dict]:
    rows = []
    names, samples = result["names"], result["samples"]
    ref = names[0]
    for b in batch_sizes:
        for n in names:
            ips = [b / s for s in samples[b][n]]
            ratios = [samples[b][ref][i] / samples[b][n][i] for i in range(len(ips))]
            rows.append(
                {
                    "batch": b,
                    "name": n,
                    "ips": statistics.median(ips),
                    "ips_min": min(ips),
                    "ips_max": max(ips),
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | model | images/s (median) | min - max over rounds | ratio to BN folded (median) | ratio min - max |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['name']} | {r['ips']:.2f} | {r['ips_min']:.2f} - {r['ips_max']:.2f} "
            f"| {r['ratio']:.3f} | {r['ratio_min']:.3f} - {r['ratio_max']:.3f} |"
        )
    return "\n".join(lines)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--iters", type=int, nargs="+", default=[5, 2], help="passes per round per batch size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--unfolded", action="store_true", help="also time BN and MABN+WC without folding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round model order")
    parser.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = parser.parse_args(argv)
    if len(args.iters) != len(args.batch_sizes):
        parser.error(f"--iters needs one count per batch size ({len(args.batch_sizes)}), got {args.iters}")
    result = run_benchmark(args)
    rows = summarize(result, args.batch_sizes)
    text = table(rows)
    print(text)
    load = (
        ", ".join(f"{v:.2f}" for v in result["load_before"])
        + " -> "
        + ", ".join(f"{v:.2f}" for v in result["load_after"])
    )
    print(f"total {result['seconds']:.0f} s; load average (1, 5, 15 min) {load}")
    if args.out is not None:
        command = "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
        env = (
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {_cpu()} "
            f"({os.cpu_count()} logical CPUs), Python {platform.python_version()}"
        )
        body = [
            f"Command: `{command.strip()}`",
            "",
            f"Environment: {env}. Load average before -> after: {load}. Run time: {result['seconds']:.0f} s.",
            "",
            text,
            "",
        ]
        args.out.write_text("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
