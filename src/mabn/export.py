"""Export a model (folded into plain torch layers) to ONNX or TorchScript."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .fold import check_eval, fold

__all__ = ["export_model", "FORMATS"]

FORMATS = ("onnx", "torchscript")


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
