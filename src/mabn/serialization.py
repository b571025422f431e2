"""Training checkpoint files: the format that ``mabn train`` writes and ``mabn export`` reads.

A checkpoint is a dict saved with ``torch.save``: ``{"format": "mabn-checkpoint", "version": 1,
"model_config": {...}, "model": state_dict, ...}`` plus the training state (epoch, step, optimizer,
RNG states, configuration) that ``--resume`` needs. :func:`load_checkpoint` reads and checks one;
:func:`model_from_checkpoint` rebuilds its model with :func:`mabn.models.build_model`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TRAINING_KEYS", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "mabn-checkpoint"
CHECKPOINT_VERSION = 1
#: Keys a checkpoint needs to resume training (beyond ``model_config`` and ``model``).
TRAINING_KEYS = ("epoch", "optimizer", "step", "rng", "config")


def _read(path: Path, trusted: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
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
        raise ValueError(f"cannot read checkpoint {path} (corrupt or unreadable): {reason}") from None
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}".rstrip(": ")
        raise ValueError(f"cannot read checkpoint {path} (corrupt or unreadable): {reason}") from None


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False, training: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by ``mabn train``; every failure is a one-line error.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only)
    unless ``trusted`` allows full unpickling.

    Args:
        path: the checkpoint file.
        trusted: allow arbitrary pickled objects (only for files you trust).
        training: also require the training state that ``--resume`` needs (:data:`TRAINING_KEYS`).

    Returns:
        The checkpoint dict (``format``, ``version``, ``model_config``, ``model``, ...).

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: a directory.
        ValueError: unreadable, not a mabn checkpoint, another version, or incomplete.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint is a directory, not a file: {path}")
    ckpt = _read(path, trusted)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a mabn checkpoint (expected format {CHECKPOINT_FORMAT!r}, found {found!r})")
    version = ckpt.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {version!r}; this mabn reads version {CHECKPOINT_VERSION}")
    for key in ("model_config", "model"):
        if not isinstance(ckpt.get(key), dict):
            raise ValueError(f"checkpoint {path} has no {key!r} dict")
    missing = [k for k in TRAINING_KEYS if training and k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}, which resuming needs")
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
    for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            problems.append(f"{kind} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else ""))
    if problems:
        raise ValueError(f"the checkpoint's weights do not fit its model_config: {'; '.join(problems)}")
    return model.eval()
