"""Files that are either complete or absent: atomic writes and figures, and digests of a model's tensors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["atomic_write", "atomic_save", "write_json", "pyplot", "save_figure", "param_digest", "buffer_digest"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it is either the old or the complete new file.

    The data goes to a temporary file in the same directory, is flushed and fsync'ed, and replaces
    ``path`` with ``os.replace`` (atomic on POSIX); the directory is fsync'ed too. A process killed at
    any moment leaves at most a stray temporary file, never a truncated ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsync'ed
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def pyplot() -> Any:
    """matplotlib's ``pyplot`` on the file backend (Agg): figures are written, never shown.

    Imported on use: matplotlib is an optional dependency (the ``plot`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` (its directory created, the format from its suffix) through
    :func:`atomic_write`, close it and return ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or None, dpi=dpi))
    finally:
        pyplot().close(fig)
    return path


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes (equal digests = equal weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def buffer_digest(model: nn.Module) -> str:
    """SHA-256 of every floating-point buffer (running statistics, SMA windows) of ``model``."""
    h = hashlib.sha256()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            t = b.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
