"""The fused CPU step (``step.c``), built on first use with the machine's C compiler and loaded with ctypes.

A training call of a layer on a CPU tensor costs, in eager PyTorch, one dispatched operation per
step of its per-channel vector work: a few microseconds each, which at 1-2 samples per device is
more than the passes over the activations. ``step.c`` does a whole forward (statistics, the vector
step from the same coefficient tables, normalization, buffer writes) and a whole backward in one
call each. It needs no Python headers and no torch headers, so it builds in well under a second;
the shared library is kept in ``$MABN_CACHE_DIR`` (default ``~/.cache/mabn``), one per source, CPU
and compiler. Without a compiler, or when the build fails, the composed path runs (same results
within rounding), and :func:`status` says why. ``MABN_NATIVE=0`` switches the fused step off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["Spec", "library", "status", "centralize", "TYPES"]

_SOURCE = Path(__file__).with_name("step.c")
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]


class Spec(ctypes.Structure):
    """What a fused call is, besides its tensors (``Spec`` in ``step.c``)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n", "c", "s", "groups", "channels_last", "centered", "renorm", "m")),
        *((name, ctypes.c_int64) for name in ("rows_in", "rows_out", "var", "den", "bounds", "mean", "shift")),
        *((name, ctypes.c_int64) for name in ("target", "running", "bm")),
        ("d_max", ctypes.c_double),
    ]


TYPES = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_state: dict[str, Any] = {"library": None, "tried": False, "status": "not built yet"}


def _cpu_key() -> str:
    """What the build depends on besides the source: the CPU (built with -march=native) and the compiler."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{flags}|{_compiler()}|{' '.join(_FLAGS)}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MABN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mabn"
    )
    return Path(root)


def _build(compiler: str, target: Path) -> None:
    """Compile ``step.c`` to ``target``, atomically (parallel processes may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        flags = [*_FLAGS, "-march=native"]
        result = subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
        )
        if result.returncode != 0:  # -march=native is not known to every compiler: build for the baseline
            result = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
            )
        if result.returncode != 0:
            raise RuntimeError(
                result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "the compiler failed"
            )
        os.replace(built, target)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    spec = ctypes.POINTER(Spec)
    signatures = {
        # x, y, stats, A, window, running_mean, running_var, weight, bias, used, num_batches_tracked,
        # forward_steps, accum_sum, accum_calls; period, last; ema weight, unbias
        "forward": ([spec, *[p] * 14, i64, i64, f64, f64], i64),
        # dy, x, dx, used, weight, sums, A, window, backward_steps, backward_calls; mode, push; accum_sum;
        # last; numel; grad_weight, grad_bias
        "backward": ([spec, *[p] * 10, i64, i64, p, i64, f64, p, p], i64),
        "normalize": ([spec, p, p, p, p, p], None),
        "statistics": ([spec, p, p], None),
        "gradient_sums": ([spec, p, p, p, p], None),
        "centralize": ([i64, i64, p, p], None),  # rows, cols, in, out
    }
    for suffix in TYPES.values():
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, f"mabn_{name}_{suffix}")
            function.argtypes, function.restype = argtypes, restype


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MABN_NATIVE", "1") == "0":
        _state["status"] = "switched off (MABN_NATIVE=0)"
        return None
    if sys.platform == "win32":
        _state["status"] = "not built on Windows"
        return None
    compiler = _compiler()
    if compiler is None:
        _state["status"] = "no C compiler found (set CC)"
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + _cpu_key().encode()).hexdigest()[:16]
    target = _cache_dir() / f"mabn_step_{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _state["status"] = f"build failed: {exc}"
        return None
    _state["status"] = f"loaded from {target}"
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; None when it cannot be built (see :func:`status`)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["library"] = _load()
                _state["tried"] = True
    return _state["library"]


def status() -> str:
    """Whether the fused CPU step is in use, and if not, why."""
    library()
    return str(_state["status"])


def _rows_dense(t: torch.Tensor) -> bool:
    """Each output channel's values (dim 0) lie in one block of memory, the blocks one after another."""
    if t.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()])


def centralize(weight: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = weight - mean of each output channel's values``, in one pass, on the CPU (``out`` may be
    ``weight``, and has its layout). Returns False, writing nothing, where the native kernel does not apply:
    then the caller uses torch's operations."""
    suffix = TYPES.get(weight.dtype)
    if suffix is None or weight.device.type != "cpu" or weight.dim() < 2 or weight.numel() == 0:
        return False
    if not (_rows_dense(weight) and out.stride() == weight.stride() and out.dtype == weight.dtype):
        return False
    lib = library()
    if lib is None or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    rows = weight.shape[0]
    getattr(lib, f"mabn_centralize_{suffix}")(rows, weight.numel() // rows, weight.data_ptr(), out.data_ptr())
    return True
