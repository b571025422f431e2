"""Export a model (folded into plain torch layers) to ONNX or TorchScript."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
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


_SPATIAL_NAMES = {1: ["length"], 2: ["height", "width"], 3: ["depth", "height", "width"]}


def _spatial_names(count: int) -> list[str]:
    """Names of the symbolic dims after (N, C): they name the ONNX input's axes."""
    return _SPATIAL_NAMES.get(count, [f"dim{i + 2}" for i in range(count)])


def _dynamic(example: Tensor, dynamic_batch: bool, dynamic_spatial: bool) -> tuple[Tensor, tuple | None]:
    """The example to trace with and the ``dynamic_shapes`` of ``torch.export`` for the symbolic dims.

    ``torch.export`` specializes sizes 0 and 1, and gives dims of equal size one symbol (then the
    graph may assume they are equal), so every symbolic dim of the traced example gets a size of at
    least 2 that no other symbolic dim has: the batch is repeated, spatial dims are zero-padded at
    the end (the padded example is only traced, its values do not matter).
    """
    dims: dict[int, torch.export.Dim] = {}
    if dynamic_batch:
        if example.shape[0] == 1:
            example = torch.cat([example, example])
        dims[0] = torch.export.Dim("batch")
    if dynamic_spatial:
        if example.dim() < 3:
            raise ValueError(f"dynamic_spatial needs an input with dims after (N, C), got shape {tuple(example.shape)}")
        used = {example.shape[0]} if dynamic_batch else set()
        sizes = []
        for size in example.shape[2:]:
            size = max(size, 2)
            while size in used:
                size += 1
            used.add(size)
            sizes.append(size)
        pad = []
        for old, new in zip(reversed(example.shape[2:]), reversed(sizes)):
            pad += [0, new - old]  # F.pad lists the last dim first
        if any(pad):
            example = F.pad(example, pad)
        for i, name in enumerate(_spatial_names(example.dim() - 2)):
            dims[i + 2] = torch.export.Dim(name)
    return example, ((dims,) if dims else None)


# ONNX files are protocol buffers, limited to 2 GiB: larger weights go to a data file next to it.
_ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**26


def _too_large_for_one_file(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) > _ONNX_SINGLE_FILE_LIMIT


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
    dynamic_spatial: bool = False,
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
        dynamic_spatial: ONNX only: every dim after (N, C) is symbolic too (height and width of
            images), so e.g. a segmentation model runs at any input size. The model is traced with
            an example whose spatial sizes are at least 2 and differ from each other and from the
            batch (``example_input`` is zero-padded at the end of those dims when needed), since
            ``torch.export`` specializes sizes 0 and 1 and ties equal sizes together.
        opset: ONNX opset version (default: the exporter's).

    An ONNX model whose weights exceed the 2 GiB limit of one ONNX file is written with its weights
    in a data file next to ``path`` (ONNX's external data; onnxruntime loads both).

    Returns:
        The path written.

    Raises:
        ValueError: the model is in training mode, unknown ``format``, no example input, or
            ``dynamic_spatial`` with an input that has no dims after (N, C).

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
    if format == "onnx":
        # Checked before folding, which can take a while.
        example, dynamic_shapes = _dynamic(example, dynamic_batch, dynamic_spatial)
    # The example lets fold check the shapes of Linear + 1-D norm pairs (see mabn.fold).
    folded = fold(model, example_input=example)
    path = Path(path)
    with torch.no_grad():
        if format == "torchscript":
            with warnings.catch_warnings():
                # Recent PyTorch marks TorchScript as deprecated; the caller asked for it explicitly.
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(folded, example)
                traced.save(str(path))
            return path
        with _quiet():
            torch.onnx.export(
                folded,
                (example,),
                str(path),
                dynamo=True,
                external_data=_too_large_for_one_file(folded),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    return path
