"""Export a trained model (folded, plain torch layers) to ONNX or TorchScript."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fold import check_eval, fold

__all__ = ["export_model", "load_checkpoint", "model_from_checkpoint", "default_input_shape", "FORMATS"]

FORMATS = ("onnx", "torchscript")
CHECKPOINT_FORMAT = "mabn-checkpoint"


def _example(model: nn.Module, example_input: Tensor | None, input_shape: tuple[int, ...] | None) -> Tensor:
    if example_input is not None:
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a Tensor, got {type(example_input).__name__}")
        return example_input
    if input_shape is None:
        raise ValueError("export needs example_input (a Tensor) or input_shape, e.g. (1, 3, 224, 224)")
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    ref = next(model.parameters(), None)
    kwargs = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
    return torch.randn(shape, **kwargs)


@contextlib.contextmanager
def _quiet():
    """Silence the ONNX exporter's progress lines and its notes about optional packages."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch's exporter
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    example_input: Tensor | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Path:
    """Fold ``model`` and write it as ONNX or TorchScript.

    The model is folded first (:func:`mabn.fold`: every norm layer of the family merged into its
    convolution, weight centralization baked in), so the file holds plain convolutions and the
    layers that cannot fold. The caller's model is not changed.

    Args:
        model: the model, in evaluation mode.
        path: the output file.
        format: ``"onnx"`` or ``"torchscript"``.
        example_input: an input to trace with; or give ``input_shape`` for a random one.
        input_shape: shape of the random example input, e.g. ``(1, 3, 224, 224)``.
        dynamic_batch: ONNX only: the batch dimension is symbolic (any batch size runs).
            TorchScript traces of convolutional networks take any batch size anyway. (TorchScript
            is deprecated in recent PyTorch releases but still written and loaded.)
        opset: ONNX opset version (default: the exporter's).

    Returns:
        The path written.

    Raises:
        ValueError: the model is in training mode, unknown ``format``, or no example input.

    Example::

        >>> import mabn, tempfile, os
        >>> model = mabn.models.resnet_small(norm_layer="mabn", conv_layer="centralized").eval()
        >>> path = mabn.export_model(model, os.path.join(tempfile.mkdtemp(), "m.pt"), "torchscript",
        ...                          input_shape=(1, 1, 28, 28))
        >>> path.exists()
        True
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_eval(model, "export")
    example = _example(model, example_input, input_shape)
    folded = fold(model)
    path = Path(path)
    with torch.no_grad():
        if format == "torchscript":
            with warnings.catch_warnings():
                # Recent PyTorch marks TorchScript as deprecated; the caller asked for it explicitly.
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(folded, example)
                traced.save(str(path))
            return path
        dynamic_shapes = None
        if dynamic_batch:
            # torch.export specializes sizes 0 and 1, so a symbolic batch is traced with two samples.
            if example.shape[0] == 1:
                example = torch.cat([example, example])
            dynamic_shapes = ({0: torch.export.Dim("batch")},)
        with _quiet():
            torch.onnx.export(
                folded,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    return path


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """Read a training checkpoint written by ``mabn train``.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only),
    unless ``trusted`` allows full unpickling. Every failure is a one-line error.

    Args:
        path: the checkpoint file.
        trusted: allow arbitrary pickled objects (only for files you trust).

    Returns:
        The checkpoint dict (``format``, ``version``, ``model_config``, ``model``, ...).

    Raises:
        FileNotFoundError: no such file. IsADirectoryError: a directory.
        ValueError: unreadable, or not a mabn checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint is a directory, not a file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found and not trusted:
            raise ValueError(
                f"checkpoint {path} holds a {found.group(1)} object, which is not loaded without trust; "
                "pass --trust-checkpoint if you trust the file"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        reason = detail.group(1).strip() if detail else (message.strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from None
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}".rstrip(": ")) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a mabn checkpoint (expected format {CHECKPOINT_FORMAT!r}, found {found!r})")
    version = ckpt.get("version")
    if version != 1:
        raise ValueError(f"checkpoint {path} has version {version!r}; this mabn reads version 1")
    for key in ("model_config", "model"):
        if not isinstance(ckpt.get(key), dict):
            raise ValueError(f"checkpoint {path} has no {key!r} dict")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The model of a checkpoint (from :func:`load_checkpoint`): built, weights loaded, in eval mode.

    Raises:
        ValueError: the configuration is invalid or the weights do not fit the model.
    """
    from .models import build_model

    try:
        model = build_model(ckpt["model_config"])
    except TypeError as exc:
        raise ValueError(f"invalid model_config in checkpoint: {exc}") from None
    try:
        result = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ValueError(
            f"the checkpoint's weights do not fit its model_config: {lines[0] if lines else exc}{more}"
        ) from None
    problems = []
    if result.missing_keys:
        problems.append(
            f"missing {', '.join(result.missing_keys[:3])}" + (" ..." if len(result.missing_keys) > 3 else "")
        )
    if result.unexpected_keys:
        keys = result.unexpected_keys
        problems.append(f"unexpected {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else ""))
    if problems:
        raise ValueError(f"the checkpoint's weights do not fit its model_config: {'; '.join(problems)}")
    return model.eval()


def default_input_shape(
    model_config: dict[str, Any], batch_size: int = 1, image_size: int | None = None
) -> tuple[int, ...]:
    """``(N, C, H, W)`` for a model config: 28x28 for one-channel ``resnet_small``, 32x32 for
    other ``resnet_small``, 224x224 for the ImageNet ResNets."""
    channels = int(model_config.get("in_channels", 1 if model_config.get("arch") == "resnet_small" else 3))
    if image_size is None:
        if model_config.get("arch") == "resnet_small":
            image_size = 28 if channels == 1 else 32
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
    export_model(model, output, args.format, x, dynamic_batch=not args.static_batch, opset=args.opset)
    arch = ckpt["model_config"].get("arch")
    print(f"wrote {output} ({args.format}, {arch}, input {'x'.join(map(str, shape))}, {output.stat().st_size} bytes)")
    if not args.no_check:
        error = _max_error(output, args.format, model, x)
        if error is None:
            print("check skipped: onnxruntime is not installed")
        else:
            print(f"max abs difference to the PyTorch model: {error:.3g}")
    return 0
