"""Export a trained checkpoint (folded, plain torch layers) to ONNX or TorchScript."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..export import FORMATS, export_model
from ..serialization import load_checkpoint, model_from_checkpoint

__all__ = ["default_input_shape", "add_arguments", "run"]


def default_input_shape(
    model_config: dict[str, Any], batch_size: int = 1, image_size: int | None = None
) -> tuple[int, ...]:
    """``(N, C, H, W)`` for a model config: 28x28 for one-channel ``resnet_small``, 32x32 for
    other ``resnet_small``, 96x96 for ``fpn_resnet_small`` (the scenes' canvas), 224x224 for the
    ImageNet ResNets and their FPNs."""
    small = model_config.get("arch") in ("resnet_small", "fpn_resnet_small")
    channels = int(model_config.get("in_channels", 1 if small else 3))
    if image_size is None:
        if model_config.get("arch") == "resnet_small":
            image_size = 28 if channels == 1 else 32
        elif model_config.get("arch") == "fpn_resnet_small":
            image_size = 96
        else:
            image_size = 224
    return (batch_size, channels, image_size, image_size)


def _max_error(path: Path, format: str, model: nn.Module, x: Tensor) -> float | None:
    """Max absolute difference between the exported file and ``model`` on ``x`` (None: no runtime)."""
    with torch.no_grad():
        expected = model(x)
        if format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                got = torch.jit.load(str(path))(x)
        else:
            try:
                import onnxruntime
            except ImportError:
                return None
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return (got.to(expected.dtype) - expected).abs().max().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint written by `mabn train`")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="output format (default: onnx)")
    parser.add_argument("-o", "--output", required=True, help="output file")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the example input (default: 1)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="height and width of the example input (default: 28 for 1-channel resnet_small, 32 for other "
        "resnet_small, 224 for resnet18/34/50)",
    )
    parser.add_argument(
        "--static-batch", action="store_true", help="ONNX: fix the batch size instead of a symbolic one"
    )
    parser.add_argument(
        "--dynamic-spatial",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX: symbolic height and width too (default: on for segmentation models, which are then "
        "checked at three input sizes)",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the exported file with PyTorch")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects in the checkpoint"
    )


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    output = Path(args.output)
    if not output.parent.exists():
        raise FileNotFoundError(f"output directory does not exist: {output.parent}")
    ckpt = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    model = model_from_checkpoint(ckpt)
    shape = default_input_shape(ckpt["model_config"], args.batch_size, args.image_size)
    x = torch.randn(shape)
    arch = ckpt["model_config"].get("arch")
    spatial = args.dynamic_spatial
    if spatial is None:
        spatial = args.format == "onnx" and getattr(model, "task", None) == "segmentation"
    if spatial and args.format != "onnx":
        raise ValueError("--dynamic-spatial applies to --format onnx only")
    export_model(
        model, output, args.format, x, dynamic_batch=not args.static_batch, dynamic_spatial=spatial, opset=args.opset
    )
    dims = "x".join(map(str, shape)) + (" (height and width dynamic)" if spatial else "")
    print(f"wrote {output} ({args.format}, {arch}, input {dims}, {output.stat().st_size} bytes)")
    if not args.no_check:
        # A dynamic-size export is checked at other sizes too: a size baked into the graph would fail.
        inputs = [x] + ([torch.randn(*shape[:2], shape[2] + 16, shape[3] + 40)] if spatial else [])
        inputs += [torch.randn(*shape[:2], max(shape[2] // 2, 8), shape[3] + 8)] if spatial else []
        for example in inputs:
            error = _max_error(output, args.format, model, example)
            if error is None:
                print("check skipped: onnxruntime is not installed")
                break
            size = "x".join(map(str, example.shape))
            print(f"max abs difference to the PyTorch model at {size}: {error:.3g}")
    return 0
