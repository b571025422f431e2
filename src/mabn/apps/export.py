"""Export a trained checkpoint (folded, plain torch layers) to ONNX or TorchScript.

Classifiers and segmentation models are exported whole. A detector (torchvision's, see
:mod:`mabn.models.detection`) is exported as its backbone and feature pyramid by default: one
input, one output per pyramid level, every dimension of the input dynamic, written by
:func:`mabn.export_model` (``torch.export``) and checked in onnxruntime at three input sizes. The
whole detector, post-processing included, cannot be captured by ``torch.export`` (its number of
detections depends on the data); ``--whole-detector`` exports it with torch's TorchScript-based
ONNX exporter instead, the path torchvision supports, for one image of dynamic height and width.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..export import FORMATS, export_model
from ..models import DETECTION_ARCHS
from ..serialization import load_checkpoint, model_from_checkpoint

__all__ = ["default_input_shape", "add_arguments", "run"]


def default_input_shape(
    model_config: dict[str, Any], batch_size: int = 1, image_size: int | None = None
) -> tuple[int, ...]:
    """``(N, C, H, W)`` for a model config: 28x28 for one-channel ``resnet_small``, 32x32 for
    other ``resnet_small``, 96x96 for ``fpn_resnet_small`` and the detectors (the scenes' canvas),
    224x224 for the ImageNet ResNets and their FPNs."""
    scenes = ("fpn_resnet_small", *DETECTION_ARCHS)
    small = model_config.get("arch") in ("resnet_small", *scenes)
    channels = int(model_config.get("in_channels", 1 if small else 3))
    if image_size is None:
        if model_config.get("arch") == "resnet_small":
            image_size = 28 if channels == 1 else 32
        elif model_config.get("arch") in scenes:
            image_size = 96
        else:
            image_size = 224
    return (batch_size, channels, image_size, image_size)


class PyramidLevels(nn.Module):
    """A detector's backbone and feature pyramid as a plain module: image batch -> tuple of levels.

    Args:
        backbone: the detector's ``backbone`` (a :class:`mabn.models.FeaturePyramid`).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(x).values())


def _onnx_outputs(path: Path, x: Tensor) -> list[Tensor] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def _max_error(path: Path, format: str, model: nn.Module, x: Tensor) -> float | None:
    """Max absolute difference between the exported file and ``model`` on ``x`` (None: no runtime).

    Models with several outputs (a detector's pyramid levels) are compared output by output.
    """
    with torch.no_grad():
        expected = model(x)
        if isinstance(expected, tuple):
            got_all = _onnx_outputs(path, x)
            if got_all is None:
                return None
            return max((g.to(e.dtype) - e).abs().max().item() for g, e in zip(got_all, expected))
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
    parser.add_argument(
        "--whole-detector",
        action="store_true",
        help="detectors: export the whole folded detector (one image of dynamic height and width -> boxes, "
        "scores, labels; torch's TorchScript-based ONNX exporter) instead of its backbone and feature pyramid",
    )
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
    detector = getattr(model, "task", None) == "detection"
    if args.whole_detector:
        if not detector:
            raise ValueError(f"--whole-detector applies to detectors, not to {arch}")
        if args.format != "onnx":
            raise ValueError("--whole-detector writes ONNX only")
        return _export_whole_detector(model, output, shape, arch, args)
    if detector:
        # The backbone and pyramid: dense maps, exported like a segmentation model.
        model = PyramidLevels(model.backbone).eval()
        arch = f"{arch} backbone and feature pyramid"
    spatial = args.dynamic_spatial
    if spatial is None:
        spatial = args.format == "onnx" and (detector or getattr(model, "task", None) == "segmentation")
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


def _detections_error(expected: dict[str, Tensor], got: list[Tensor]) -> str:
    """How the exported detector's (boxes, scores, labels) differ from PyTorch's detections."""
    boxes, scores, labels = got
    if boxes.shape != expected["boxes"].shape:
        return f"{boxes.shape[0]} detections against {expected['boxes'].shape[0]}"
    if not torch.equal(labels.long(), expected["labels"]):
        return "the labels differ"
    error = max((boxes - expected["boxes"]).abs().max().item(), (scores - expected["scores"]).abs().max().item())
    return f"{boxes.shape[0]} detections, max abs difference of boxes and scores {error:.3g}"


def _export_whole_detector(
    model: nn.Module, output: Path, shape: tuple[int, ...], arch: str, args: argparse.Namespace
) -> int:
    """Fold the detector and export it whole (one image (C, H, W), H and W dynamic) with the TorchScript-based exporter."""
    from ..fold import fold

    folded, _ = fold(model, return_report=True)
    image = torch.rand(shape[1:])
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's tracer warnings about data-dependent shapes
            torch.onnx.export(
                folded,
                ([image],),
                str(tmp),
                dynamo=False,
                opset_version=args.opset or 17,
                input_names=["image"],
                # torchvision's detection dicts hold boxes, scores, labels in this order.
                output_names=["boxes", "scores", "labels"],
                dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                              "scores": {0: "detections"}, "labels": {0: "detections"}},
            )  # fmt: skip
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {output} (onnx, whole {arch}, one image {'x'.join(map(str, shape[1:]))}, height and width "
          f"dynamic, {output.stat().st_size} bytes)")  # fmt: skip
    if not args.no_check:
        c, h, w = shape[1:]
        for size in ((h, w), (h + 16, w + 40), (max(h // 2, 32), w + 8)):
            example = torch.rand(c, *size)
            got = _onnx_outputs(output, example)
            if got is None:
                print("check skipped: onnxruntime is not installed")
                break
            with torch.no_grad():
                expected = model([example])[0]
            print(f"at {c}x{size[0]}x{size[1]}: {_detections_error(expected, got)}")
    return 0
