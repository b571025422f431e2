"""Dense-prediction inference throughput: folded MABN+WC and BN vs GroupNorm on an FPN segmentation model.

The model is ``mabn.models.fpn_resnet50`` by default: a ResNet-50 encoder with an FPN decoder is the
layout of the paper's Mask R-CNN backbone, whose one-image throughput the paper reports (BN or MABN
237.88 it/s, GroupNorm 99.37), and its 53 encoder norms plus the decoder's 8 make the cost of
unfoldable per-sample norms show at the resolutions dense prediction runs at. ``--arch fpn_resnet18``
is the lighter variant, for a quicker look. Every model is in evaluation mode,
float32, NCHW, batch 1, under ``torch.no_grad``, on the CPU:

* MABN+WC folded: ``mabn.fold`` of the MABN model with weight-centralized convolutions (every
  norm, the decoder's after transposed convolutions included, merged into its convolution);
* BN folded: ``mabn.fold`` of the BatchNorm model (the same graph of plain convolutions);
* GroupNorm(32): the same network with GroupNorm, which normalizes each sample with its own
  statistics and cannot fold.

Running statistics come from one random batch (momentum 1), so activations keep a normal scale.
The models are timed interleaved: each round runs every model at every size in a fresh random
order, ``--iters`` passes each, and the figures are medians over ``--rounds`` rounds; ratios to
"BN folded" are medians of the per-round ratios. One intra-op thread by default (``--threads``):
the machine is shared, and one thread measures the work per image rather than the scheduling.

    python benchmarks/dense_inference.py                # 256x256 and 512x512
    python benchmarks/dense_inference.py --quick        # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared machine

import torch  # noqa: E402
from interleaved import interleaved_rounds, ratio_table  # noqa: E402  (beside this script)
from torch import nn  # noqa: E402

import mabn  # noqa: E402
from mabn import models  # noqa: E402

ARCHS = ("fpn_resnet50", "fpn_resnet18")
# name -> (norm, conv, fold)
SPECS = {
    "MABN+WC folded": ("mabn", "centralized", True),
    "BN folded": ("bn", None, True),
    "GroupNorm(32)": ("gn", None, False),
}
REFERENCE = "BN folded"


def build(arch: str, norm: str, conv: str | None, folded: bool, calib_size: int) -> nn.Module:
    """An eval-mode model; folded ones are checked against their unfolded source."""
    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=21, norm_layer=norm, conv_layer=conv)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, mabn.StreamNorm))]
    if norms:
        for m in norms:
            m.momentum = 1.0
        model.train()
        with torch.no_grad():
            model(torch.randn(2, 3, calib_size, calib_size))
    model.eval()
    if not folded:
        return model
    result, report = mabn.fold(model, return_report=True)
    x = torch.randn(1, 3, calib_size + 3, calib_size - 5)
    with torch.no_grad():
        expected = model(x)
        err = ((result(x) - expected).abs().max() / expected.abs().max()).item()
    if report.unfolded or err > 1e-3:
        raise RuntimeError(f"{arch} {norm}: folding check failed (relative error {err:.2e}, kept {report.unfolded})")
    return result


def run(args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    """size -> name -> seconds per image, one entry per round."""
    torch.set_num_threads(args.threads)
    nets = {name: build(args.arch, *spec, min(args.sizes)) for name, spec in SPECS.items()}
    inputs = {s: torch.randn(1, 3, s, s) for s in args.sizes}
    return interleaved_rounds(nets, inputs, args.rounds, args.iters, args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="fpn_resnet50", help="default: fpn_resnet50")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="square input sides (default: 256 512)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--iters", type=int, default=2, help="passes per model, size and round (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round order")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (32, 48), 2 rounds of 1 pass: checks it runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.iters = [32, 48], 2, 1
    for name in ("sizes", "threads", "rounds", "iters"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name} must be positive, got {values}")
    start = time.perf_counter()
    samples = run(args)
    text = ratio_table(samples, REFERENCE, "model")
    print(text)
    print(
        f"{args.arch}, batch 1, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{time.perf_counter() - start:.0f} s, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
