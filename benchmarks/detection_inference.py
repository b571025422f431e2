"""Detector inference cost (the paper's Table 9): a detector's backbone and feature pyramid at batch 1.

The paper times one image through the ResNet-50 + FPN backbone of its Mask R-CNN: BN and MABN,
folded into the convolutions, at the same speed, GroupNorm much slower. This benchmark times the
backbones of ``mabn.models.detection`` (a :class:`mabn.models.FeaturePyramid`, every norm in the
encoder and the pyramid), in evaluation mode, float32, NCHW, batch 1, under ``torch.no_grad``, on
the CPU, in three forms:

* MABN+WC folded: ``mabn.fold`` of the backbone with MABN and weight-centralized convolutions;
* BN folded: ``mabn.fold`` of the backbone with BatchNorm (the same graph of plain convolutions);
* GroupNorm(32): the backbone with GroupNorm, which normalizes each sample and cannot fold.

Two backbones (``--backbone``): ``resnet50``, the paper's layout (ResNet-50, pyramid levels P2-P6 of
256 channels, 53 encoder norms and 9 pyramid norms) at 512 and 800 px by default; and ``scenes``,
the backbone of the ``mabn reproduce detection`` grid's FCOS (``fcos_resnet_small``) at its 96 px
scenes, where the per-layer work, not the convolutions, dominates.

Running statistics come from one random batch (momentum 1), so activations keep a normal scale;
each folded backbone is checked against its unfolded source. The models are timed interleaved:
each round runs every model at every size in a fresh random order, ``--iters`` passes each; the
figures are medians over ``--rounds`` rounds and the ratios to "BN folded" medians of the
per-round ratios. One intra-op thread by default: on a shared machine one thread measures the work
per image rather than the scheduling. Run it on a quiet machine; it writes the table to
``results/detection_inference.md`` (``--out``), except with ``--quick``, which only checks that it runs.

    python benchmarks/detection_inference.py                       # resnet50 at 512 and 800 px
    python benchmarks/detection_inference.py --backbone scenes     # the grid's backbone at 96 px
    python benchmarks/detection_inference.py --quick               # tiny sizes, no file written
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

# name -> (norm, conv, fold)
SPECS = {
    "MABN+WC folded": ("mabn", "centralized", True),
    "BN folded": ("bn", None, True),
    "GroupNorm(32)": ("gn", None, False),
}
REFERENCE = "BN folded"
BACKBONES = {"resnet50": (512, 800), "scenes": (96,)}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "detection_inference.md"


class Levels(nn.Module):
    """A feature pyramid returning its levels as a tuple (what a detector's heads receive)."""

    def __init__(self, pyramid: nn.Module) -> None:
        super().__init__()
        self.pyramid = pyramid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.pyramid(x).values())


def pyramid(backbone: str, norm: str, conv: str | None) -> tuple[nn.Module, int]:
    """The backbone with its pyramid, and its input channels."""
    if backbone == "scenes":
        detector = models.build_model({"arch": "fcos_resnet_small", "norm": norm, "conv": conv})
        return detector.backbone, 1
    encoder = models.resnet50(norm_layer=norm, conv_layer=conv)
    # P2-P5 from the four stages and P6 from P5, 256 channels: the FPN of the paper's Mask R-CNN.
    return models.FeaturePyramid(encoder, 256, None, 1, norm, None, conv), 3


def build(backbone: str, norm: str, conv: str | None, folded: bool, calib_size: int) -> tuple[nn.Module, int]:
    """An eval-mode backbone (folded ones checked against their unfolded source) and its input channels."""
    torch.manual_seed(0)
    net, channels = pyramid(backbone, norm, conv)
    model = Levels(net)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, mabn.StreamNorm))]
    if norms:
        for m in norms:
            m.momentum = 1.0
        model.train()
        with torch.no_grad():
            model(torch.randn(2, channels, calib_size, calib_size))
    model.eval()
    if not folded:
        return model, channels
    result, report = mabn.fold(model, return_report=True)
    x = torch.randn(1, channels, calib_size + 3, calib_size - 5)
    with torch.no_grad():
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(result(x), model(x)))
    if report.unfolded or err > 1e-3:
        raise RuntimeError(
            f"{backbone} {norm}: folding check failed (relative error {err:.2e}, kept {report.unfolded})"
        )
    return result, channels


def run(args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    """size -> name -> seconds per image, one entry per round."""
    torch.set_num_threads(args.threads)
    built = {name: build(args.backbone, *spec, min(args.sizes)) for name, spec in SPECS.items()}
    nets = {name: net for name, (net, _) in built.items()}
    channels = next(iter(built.values()))[1]
    inputs = {s: torch.randn(1, channels, s, s) for s in args.sizes}
    return interleaved_rounds(nets, inputs, args.rounds, args.iters, args.seed)


def report(args: argparse.Namespace, text: str, footer: str) -> str:
    """The Markdown file: what was timed, the table, the command and the machine's state."""
    what = {
        "resnet50": "ResNet-50 + FPN (P2-P6, 256 channels, a norm after every lateral and output convolution)",
        "scenes": "the `mabn reproduce detection` FCOS backbone (`fcos_resnet_small`: small ResNet + 2-level FPN)",
    }[args.backbone]
    command = (
        f"python benchmarks/detection_inference.py --backbone {args.backbone} --sizes {' '.join(map(str, args.sizes))} "
        f"--rounds {args.rounds} --iters {args.iters}"
    )
    return (
        "# Detector backbone inference at batch 1 (the paper's Table 9)\n\n"
        f"{what}, evaluation mode, batch 1, one image per pass, medians over {args.rounds} interleaved rounds of "
        f"{args.iters} passes. Folded = `mabn.fold` (norms merged into the convolutions); GroupNorm cannot fold.\n\n"
        f"Produced by:\n\n    {command}\n\n{text}\n\n{footer}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default="resnet50", help="default: resnet50")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square input sides (default: per backbone)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--iters", type=int, default=2, help="passes per model, size and round (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round order")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds of 1 pass, no file: checks it runs")
    parser.add_argument("--out", type=Path, default=None, help=f"the Markdown report (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or list(BACKBONES[args.backbone])
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if args.quick:
        args.sizes, args.rounds, args.iters = [64, 80], 2, 1
    for name in ("sizes", "threads", "rounds", "iters"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name} must be positive, got {values}")
    start = time.perf_counter()
    samples = run(args)
    text = ratio_table(samples, REFERENCE, "backbone + pyramid")
    footer = (
        f"{args.backbone}, batch 1, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{time.perf_counter() - start:.0f} s, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(text)
    print(footer)
    if out is not None:
        out.write_text(report(args, text, footer))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
