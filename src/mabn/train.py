"""Train a ResNet with any normalization layer on Fashion-MNIST, an ImageFolder tree or synthetic data.

``mabn train`` (or ``python -m mabn.train``; under ``torchrun`` it trains with
DistributedDataParallel) builds ``mabn.models.build_model(model_config)`` with the chosen
normalization preset, trains it with SGD (momentum 0.9) under a cosine or step schedule with linear
warm-up (or a constant rate), and evaluates the top-1 test error of the model and of its folded inference form
(``mabn.fold``). The output directory receives:

* ``config.json``: the full configuration of the run;
* ``metrics.jsonl``: one JSON line per epoch (loss, errors, learning rate, time, images/s);
* ``checkpoint.pt``: written atomically at the end of every epoch (``{"format": "mabn-checkpoint",
  "version": 1, "model_config", "model", "epoch", ...}`` plus the optimizer, schedule step and RNG
  states), so ``--resume`` continues a stopped run and ends with the same weights as an
  uninterrupted one;
* ``result.json``: the final errors and costs, written when the run is complete;
* ``batch_stats.csv.gz`` (with ``--monitor-every N``): the records of a
  :class:`mabn.BatchStatsMonitor` attached to the normalization layers (every N-th step), rewritten
  with each checkpoint; ``mabn stats --log`` plots it.

Batch sizes are per process: ``--batch-size`` is the gradient batch of one process (one GPU in the
paper's protocol), split into groups of ``--norm-batch-size`` samples for batch statistics.

Example::

    mabn train --norm mabn --conv centralized --norm-batch-size 2 --epochs 5 --out runs/mabn2
    torchrun --nproc_per_node=2 -m mabn.train --data synthetic --epochs 1 --out runs/ddp
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data import DATA_SOURCES, DataSource, make_source
from .modules import PRESETS

__all__ = [
    "DEFAULTS",
    "config_from_args",
    "check_config",
    "train",
    "run_or_resume",
    "atomic_save",
    "load_checkpoint",
    "main",
]

ARCHS = ("resnet_small", "resnet18", "resnet34", "resnet50")
CONVS = ("none", "centralized")
SCHEDULES = ("cosine", "step", "constant")
#: Normalizations that use no batch statistics, so ``--norm-batch-size`` does not apply to them.
PER_SAMPLE_NORMS = ("gn", "ln", "in")

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
STATS_LOG = "batch_stats.csv.gz"
CHECKPOINT_FORMAT = "mabn-checkpoint"
CHECKPOINT_VERSION = 1

#: Every key of a training configuration and its default (``mabn train --help`` documents them).
DEFAULTS: dict[str, Any] = {
    "data": "fashion-mnist",
    "data_dir": None,
    "limit_train": None,
    "limit_test": None,
    "image_size": 224,
    "arch": "resnet_small",
    "depth": None,
    "width": None,
    "norm": "bn",
    "norm_opts": {},
    "conv": "none",
    "batch_size": 32,
    "norm_batch_size": None,
    "epochs": 5,
    "max_steps": None,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "milestones": None,
    "lr_gamma": 0.1,
    "seed": 0,
    "eval_every": 1,
    "eval_batch_size": 500,
    "device": "auto",
    "threads": None,
    "workers": 0,
    "out": "runs/train",
    "monitor_every": None,
    "monitor_layers": None,
}

#: Keys that may differ between a run and its ``--resume`` (they do not change the computation).
RUNTIME_KEYS = frozenset({"data_dir", "eval_batch_size", "threads", "workers", "out", "device"})


# ---- configuration ------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """``--norm-opt`` values: JSON literals (1, 0.5, true, null, "x"), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_norm_opts(items: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--norm-opt expects KEY=VALUE, got {item!r}")
        opts[key.strip()] = _parse_value(value.strip())
    return opts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``mabn train`` to ``parser``."""
    d = DEFAULTS
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d["data"], help=f"data source: {', '.join(DATA_SOURCES)} (default: %(default)s)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="data directory (fashion-mnist default: /usr/share/datasets/fashion-mnist; imagefolder: "
        "a directory with train/ and val/ folders of class folders)",
    )
    g.add_argument("--limit-train", type=int, default=None, help="use only this many training samples")
    g.add_argument("--limit-test", type=int, default=None, help="use only this many test samples")
    g.add_argument("--image-size", type=int, default=d["image_size"], help="imagefolder input size (default: 224)")
    g.add_argument("--workers", type=int, default=0, help="imagefolder decoding processes (default: 0)")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=d["arch"], help=f"{', '.join(ARCHS)} (default: %(default)s)")
    g.add_argument("--depth", type=int, default=None, help="resnet_small: basic blocks per stage")
    g.add_argument("--width", type=int, default=None, help="resnet_small: channels of the first stage")
    g.add_argument(
        "--norm",
        default=d["norm"],
        help="normalization: any mabn.create_norm_layer name (bn, ghost_bn, brn, mabn, gn, ln, in, or a "
        f"preset: {', '.join(PRESETS)}) (default: %(default)s)",
    )
    g.add_argument(
        "--norm-opt",
        action="append",
        metavar="KEY=VALUE",
        help="extra keyword of the normalization layer, repeatable (e.g. r_max=3, warmup_iters=100)",
    )
    g.add_argument("--window", type=int, default=None, help="SMA window m of the norm (default: the layer's, 16)")
    g.add_argument("--momentum", type=float, default=None, help="running-statistics momentum of the norm")
    g.add_argument("--eps", type=float, default=None, help="eps of the norm")
    g.add_argument(
        "--conv",
        default=d["conv"],
        help="convolutions: none (plain) or centralized (weight centralization, the paper's WC); "
        "default: none. The reproduction grids set it explicitly (WC for MABN).",
    )
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="gradient batch per process (default: 32)")
    g.add_argument(
        "--norm-batch-size",
        type=int,
        default=None,
        help="samples per normalization group; must divide --batch-size (default: the whole batch)",
    )
    g.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    g.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="end the run after this many optimizer steps, inside an epoch if need be; the schedule "
        "still spans --epochs (default: no limit)",
    )
    g.add_argument("--lr", type=float, default=d["lr"], help="peak SGD learning rate (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD momentum is 0.9)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="default: %(default)s")
    g.add_argument("--schedule", default=d["schedule"], help="cosine, step or constant (default: %(default)s)")
    g.add_argument(
        "--warmup-epochs", type=float, default=d["warmup_epochs"], help="linear warm-up length (default: 0.5)"
    )
    g.add_argument(
        "--milestones",
        default=None,
        help="step schedule: comma-separated epochs where the rate is multiplied by --lr-gamma "
        "(default: 50%% and 75%% of the epochs)",
    )
    g.add_argument("--lr-gamma", type=float, default=d["lr_gamma"], help="step schedule factor (default: 0.1)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of weights, data order and augmentation")
    g = parser.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs and at the end (default: 1)")
    g.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"], help="default: %(default)s")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", default=d["out"], help="output directory (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop once this many epochs are done (continue later with --resume)",
    )
    g.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a tty)"
    )
    g = parser.add_argument_group("batch-statistics monitor")
    g.add_argument(
        "--monitor-every",
        type=int,
        default=None,
        metavar="N",
        help=f"record the batch statistics (mu, sigma^2, g, Psi) of the normalization layers every N steps "
        f"into OUT/{STATS_LOG} (mabn.BatchStatsMonitor; plot with mabn stats --log)",
    )
    g.add_argument(
        "--monitor-layers",
        default=None,
        metavar="NAMES",
        help="comma-separated layer names to monitor (default: every normalization layer)",
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training configuration (keys of :data:`DEFAULTS`) from parsed ``mabn train`` options."""
    norm_opts = _parse_norm_opts(args.norm_opt)
    for key in ("window", "momentum", "eps"):
        if getattr(args, key) is not None:
            norm_opts[key] = getattr(args, key)
    milestones = None
    if args.milestones:
        try:
            milestones = [float(m) for m in args.milestones.split(",") if m.strip()]
        except ValueError:
            raise ValueError(f"--milestones expects comma-separated epochs, got {args.milestones!r}") from None
    config = dict(DEFAULTS)
    config.update(
        data=args.data,
        data_dir=args.data_dir,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        image_size=args.image_size,
        arch=args.arch,
        depth=args.depth,
        width=args.width,
        norm=args.norm,
        norm_opts=norm_opts,
        conv=args.conv,
        batch_size=args.batch_size,
        norm_batch_size=args.norm_batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        milestones=milestones,
        lr_gamma=args.lr_gamma,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        out=args.out,
        monitor_every=args.monitor_every,
        monitor_layers=[n.strip() for n in args.monitor_layers.split(",") if n.strip()]
        if args.monitor_layers is not None
        else None,
    )
    return config


def is_batch_norm(norm: Any) -> bool:
    """Whether a normalization (name) uses batch statistics, so that a normalization batch applies."""
    return not (isinstance(norm, str) and norm in PER_SAMPLE_NORMS)


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a training configuration; return it completed with :data:`DEFAULTS`.

    Raises:
        ValueError: an unknown key, data source, architecture, convolution or schedule, a
            non-positive size, or a normalization batch that does not divide the gradient batch.
    """
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
    c = {**DEFAULTS, **config}
    if c["data"] not in DATA_SOURCES:
        raise ValueError(f"unknown data source {c['data']!r}; choose one of {', '.join(DATA_SOURCES)}")
    if c["arch"] not in ARCHS:
        raise ValueError(f"unknown --arch {c['arch']!r}; choose one of {', '.join(ARCHS)}")
    if c["arch"] != "resnet_small" and (c["depth"] is not None or c["width"] is not None):
        raise ValueError(f"--depth and --width apply to resnet_small only, not to {c['arch']}")
    if c["conv"] not in CONVS:
        raise ValueError(f"unknown --conv {c['conv']!r}; choose one of {', '.join(CONVS)}")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown --schedule {c['schedule']!r}; choose one of {', '.join(SCHEDULES)}")
    if c["device"] not in ("auto", "cpu", "cuda") and not str(c["device"]).startswith("cuda:"):
        raise ValueError(f"unknown --device {c['device']!r}; choose auto, cpu or cuda")
    for key in ("batch_size", "epochs", "eval_every", "eval_batch_size", "image_size"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {c[key]!r}")
    for key in ("depth", "width", "threads", "limit_train", "limit_test", "max_steps", "monitor_every"):
        if c[key] is not None and (not isinstance(c[key], int) or c[key] < 1):
            raise ValueError(f"{key} must be a positive integer, got {c[key]!r}")
    if not isinstance(c["workers"], int) or c["workers"] < 0:
        raise ValueError(f"workers must be >= 0, got {c['workers']!r}")
    for key in ("lr", "weight_decay", "warmup_epochs", "lr_gamma"):
        if not isinstance(c[key], (int, float)) or not math.isfinite(c[key]) or c[key] < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {c[key]!r}")
    if c["warmup_epochs"] > c["epochs"]:
        raise ValueError(f"--warmup-epochs {c['warmup_epochs']} exceeds --epochs {c['epochs']}")
    b = c["norm_batch_size"]
    if b is not None:
        if not is_batch_norm(c["norm"]):
            raise ValueError(f"--norm-batch-size does not apply to the per-sample normalization {c['norm']!r}")
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"--norm-batch-size must be a positive integer, got {b!r}")
        if c["batch_size"] % b:
            raise ValueError(f"--norm-batch-size {b} does not divide --batch-size {c['batch_size']}")
    if not isinstance(c["norm_opts"], dict):
        raise ValueError(f"norm_opts must be a dict, got {c['norm_opts']!r}")
    layers = c["monitor_layers"]
    if layers is not None:
        if c["monitor_every"] is None:
            raise ValueError("--monitor-layers needs --monitor-every")
        if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"--monitor-layers must name at least one layer, got {layers!r}")
    return c


def model_config(config: dict[str, Any], num_classes: int, in_channels: int) -> dict[str, Any]:
    """The ``mabn.models.build_model`` configuration of a training configuration."""
    norm_kwargs = dict(config["norm_opts"])
    if config["norm_batch_size"] is not None:
        norm_kwargs["norm_batch_size"] = config["norm_batch_size"]
    mc: dict[str, Any] = {
        "arch": config["arch"],
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm": config["norm"],
        "norm_kwargs": norm_kwargs,
        "conv": None if config["conv"] == "none" else config["conv"],
    }
    for key in ("depth", "width"):
        if config[key] is not None:
            mc[key] = config[key]
    return mc


def build_model(mc: dict[str, Any]) -> nn.Module:
    """``mabn.models.build_model`` with its errors turned into one-line ``ValueError``s."""
    from .models import build_model as _build

    try:
        return _build(mc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot build the model ({mc['arch']}, norm {mc['norm']!r}): {exc}") from None


# ---- files --------------------------------------------------------------------------------------


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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``mabn train`` checkpoint; a missing, unreadable or foreign file is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mabn training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    missing = [k for k in ("model_config", "model", "epoch", "optimizer", "step", "rng", "config") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


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


# ---- training pieces ----------------------------------------------------------------------------


def learning_rate(config: dict[str, Any], step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine, step or constant."""
    total = config["epochs"] * steps_per_epoch
    warmup = int(round(config["warmup_epochs"] * steps_per_epoch))
    base = config["lr"]
    if step < warmup:
        return base * (step + 1) / warmup
    if config["schedule"] == "constant":
        return base
    if config["schedule"] == "cosine":
        span = max(1, total - warmup)
        return 0.5 * base * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    milestones = config["milestones"] or [0.5 * config["epochs"], 0.75 * config["epochs"]]
    epoch = step / steps_per_epoch
    return base * config["lr_gamma"] ** sum(epoch >= m for m in milestones)


@torch.no_grad()
def evaluate(model: nn.Module, source: DataSource, batch_size: int, device: torch.device, workers: int = 0) -> float:
    """Top-1 error in percent of ``model`` (put in eval mode, restored after) on the test split."""
    was_training = model.training
    model.eval()
    wrong = total = 0
    try:
        for x, y in source.test_batches(batch_size, workers):
            pred = model(x.to(device)).argmax(1).cpu()
            wrong += int((pred != y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    return 100.0 * wrong / max(total, 1)


def evaluate_folded(
    model: nn.Module, source: DataSource, batch_size: int, device: torch.device, workers: int = 0
) -> tuple[float | None, str | None]:
    """Top-1 error of ``mabn.fold`` of the eval model, or (None, reason) when folding is unavailable."""
    try:
        from .fold import fold
    except ImportError:
        return None, "mabn.fold is not available"
    was_training = model.training
    model.eval()
    try:
        folded = fold(model)
    except (ValueError, TypeError, NotImplementedError) as exc:
        return None, f"fold failed: {exc}"
    finally:
        model.train(was_training)
    return evaluate(folded, source, batch_size, device, workers), None


class _Dist:
    """The process group of a ``torchrun`` launch (world size 1 without one)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - RUNTIME_KEYS)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


# ---- the trainer --------------------------------------------------------------------------------


def train(
    config: dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run; return its result (also written to ``<out>/result.json``).

    Args:
        config: training configuration (keys of :data:`DEFAULTS`; missing keys take the defaults).
        resume: continue the run in ``config["out"]`` from its checkpoint; the configuration must
            match the saved one except for :data:`RUNTIME_KEYS`.
        overwrite: start afresh even if the output directory holds a run.
        stop_after: return once this many epochs are done, as if interrupted (``result["stopped"]``).
        progress: show a tqdm progress bar (default: when stderr is a terminal).

    Returns:
        ``{"error", "error_folded", "epochs", "wall_time_s", "train_time_per_epoch_s", "diverged",
        "param_digest", ...}`` (``"stopped": True`` and no errors when stopped early).

    Raises:
        ValueError, FileNotFoundError: bad configuration, missing data, an output directory that
        already holds a run (without ``resume``/``overwrite``), a damaged checkpoint.

    Example::

        >>> result = train({"data": "synthetic", "limit_train": 64, "limit_test": 32, "epochs": 1,
        ...                 "width": 4, "out": "/tmp/mabn-doc-run"}, overwrite=True)  # doctest: +SKIP
        >>> 0.0 <= result["error"] <= 100.0  # doctest: +SKIP
        True
    """
    config = check_config(config)
    out = Path(config["out"])
    ckpt_path = out / CHECKPOINT
    ddp = _Dist()
    device = _device(config["device"], ddp.local_rank)

    # Everything that can fail on user input is checked before a single file is written.
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("world_size", 1) != ddp.world:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size', 1)} processes, not {ddp.world}")
        diffs = _config_differences(ckpt["config"], config)
        if diffs:
            raise ValueError(f"--resume with a different configuration than {ckpt_path}: {'; '.join(diffs)}")
    elif not overwrite and (ckpt_path.exists() or (out / RESULT).exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite, or another --out")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
    source = make_source(
        config["data"], config["data_dir"], config["limit_train"], config["limit_test"], config["image_size"]
    )
    if config["threads"] is not None:
        torch.set_num_threads(config["threads"])
    mc = model_config(config, source.num_classes, source.in_channels)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    model = build_model(mc).to(device)
    steps_per_epoch = (source.num_train // ddp.world) // config["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(
            f"{source.num_train} training samples make no batch of {config['batch_size']} on {ddp.world} process(es)"
        )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        nesterov=config["nesterov"],
        weight_decay=config["weight_decay"],
    )
    start_epoch, step, wall_time, history, diverged = 0, 0, 0.0, [], False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        wall_time, history = float(ckpt.get("wall_time", 0.0)), list(ckpt.get("history", []))
        diverged = bool(ckpt.get("diverged", False))
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(_to_tuple(ckpt["rng"]["python"]))

    # Every process builds the monitor, so that a bad layer name fails on all of them alike; rank 0 keeps it.
    monitor = _make_monitor(model, config, out if ddp.rank == 0 else None, step if ckpt is not None else None)
    if monitor is not None and ddp.rank != 0:
        monitor.remove()
        monitor = None

    if ddp.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            _write_json(out / CONFIG, {"train": config, "model_config": mc, "world_size": ddp.world})
            for stale in (RESULT, METRICS, STATS_LOG):
                with contextlib.suppress(FileNotFoundError):
                    (out / stale).unlink()
        # metrics.jsonl always mirrors the checkpoint's history (a kill may have cut it short).
        atomic_write(out / METRICS, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))

    ddp.init(device)
    net: nn.Module = model
    if ddp.active:
        # broadcast_buffers=False: each process keeps the normalization statistics of its own batches.
        with warnings.catch_warnings():
            # torch 2.13 flags broadcast_buffers as deprecated but still advises it for rank-local buffers.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(
        range(source.num_train),
        num_replicas=ddp.world,
        rank=ddp.rank,
        shuffle=True,
        seed=config["seed"],
        drop_last=True,
    )
    show = progress if progress is not None else sys.stderr.isatty()
    show = show and ddp.rank == 0
    _log(
        ddp.rank,
        f"training {config['arch']} with norm {config['norm']!r} (normalization batch "
        f"{config['norm_batch_size'] or config['batch_size']}, conv {config['conv']}) on {source.name}: "
        f"{source.num_train} images, {config['epochs']} epochs x {steps_per_epoch} steps of "
        f"{config['batch_size']} x {ddp.world} process(es)"
        + (f", ending after step {config['max_steps']}" if config["max_steps"] is not None else "")
        + f", out {out}",
    )
    epoch = start_epoch
    max_steps = config["max_steps"] if config["max_steps"] is not None else config["epochs"] * steps_per_epoch
    try:
        while epoch < config["epochs"] and step < max_steps and not diverged:
            if stop_after is not None and epoch >= stop_after:
                break
            record, diverged = _train_epoch(
                net, model, optimizer, source, sampler, config, epoch, step, min(steps_per_epoch, max_steps - step),
                steps_per_epoch, device, ddp, show,
            )  # fmt: skip
            step += record["steps"]
            epoch += 1
            last = epoch == config["epochs"] or step >= max_steps or diverged
            if ddp.rank == 0 and (last or epoch % config["eval_every"] == 0):
                t0 = time.perf_counter()
                record["test_error"] = evaluate(model, source, config["eval_batch_size"], device, config["workers"])
                if last:
                    folded, reason = evaluate_folded(
                        model, source, config["eval_batch_size"], device, config["workers"]
                    )
                    record["test_error_folded"] = folded
                    if reason:
                        record["fold_note"] = reason
                record["eval_time_s"] = time.perf_counter() - t0
            wall_time += record["train_time_s"] + record.get("eval_time_s", 0.0)
            record["wall_time_s"] = wall_time
            history.append(record)
            if ddp.rank == 0:
                if monitor is not None:
                    # Before the checkpoint: a kill in between leaves a log ahead of it, which the
                    # resumed run trims to the checkpoint's step.
                    _save_stats_log(monitor.records, out / STATS_LOG)
                atomic_save(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "version": CHECKPOINT_VERSION,
                        "model_config": mc,
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "optimizer": optimizer.state_dict(),
                        "schedule": {"kind": config["schedule"], "step": step, "steps_per_epoch": steps_per_epoch},
                        "rng": {"torch": torch.get_rng_state(), "python": list(_to_list(random.getstate()))},
                        "config": config,
                        "history": history,
                        "wall_time": wall_time,
                        "diverged": diverged,
                        "world_size": ddp.world,
                    },
                    ckpt_path,
                )
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                _log(ddp.rank, _epoch_line(record, config["epochs"]))
            ddp.barrier()
        done = epoch >= config["epochs"] or step >= max_steps or diverged
        digest = param_digest(model)
        if ddp.active:
            # Every process leaves its digest: equal digests prove the replicas stayed in sync.
            # The second line digests the buffers, which stay each process's own (broadcast_buffers=False).
            (out / f"params-rank{ddp.rank}.sha256").write_text(f"{digest}\n{buffer_digest(model)}\n")
        if not done:
            _log(ddp.rank, f"stopped after epoch {epoch}; continue with --resume")
            return {"stopped": True, "epochs_done": epoch, "param_digest": digest}
        final = history[-1] if history else {}
        train_times = [h["train_time_s"] for h in history if h.get("steps") == steps_per_epoch]
        result = {
            "error": final.get("test_error"),
            "error_folded": final.get("test_error_folded"),
            "fold_note": final.get("fold_note"),
            "epochs": config["epochs"],
            "epochs_done": epoch,
            "steps": step,
            "diverged": diverged,
            "final_train_loss": final.get("train_loss"),
            "wall_time_s": wall_time,
            "train_time_per_epoch_s": sum(train_times) / len(train_times) if train_times else None,
            "images_per_s": final.get("images_per_s"),
            "param_digest": digest,
            "world_size": ddp.world,
            "config": config,
        }
        if ddp.rank == 0:
            _write_json(out / RESULT, result)
            err, fold_err = result["error"], result["error_folded"]
            _log(
                ddp.rank,
                f"done: test error {err:.2f} %"
                + (f", folded {fold_err:.2f} %" if fold_err is not None else f" (folded: {result['fold_note']})")
                + (" (diverged)" if diverged else "")
                + f", {wall_time:.0f} s",
            )
        return result
    finally:
        if monitor is not None:
            monitor.remove()
        ddp.close()


def _make_monitor(model: nn.Module, config: dict[str, Any], out: Path | None, resumed_step: int | None) -> Any:
    """The run's :class:`BatchStatsMonitor` (None without ``monitor_every``).

    A resumed run continues its step numbering and, when ``out`` is given, keeps the records of its
    log up to the checkpoint's step.
    """
    if config["monitor_every"] is None:
        return None
    from .monitor import BatchStatsMonitor, read_stats_log

    try:
        monitor = BatchStatsMonitor(
            model, layers=config["monitor_layers"], every=config["monitor_every"], start_step=resumed_step or 0
        )
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"--monitor-every/--monitor-layers: {exc}") from None
    if resumed_step is not None and out is not None and (out / STATS_LOG).is_file():
        monitor.records.extend(r for r in read_stats_log(out / STATS_LOG) if r["step"] <= resumed_step)
    return monitor


def _save_stats_log(records: list[dict[str, Any]], path: Path) -> None:
    """Write the monitor's records to ``path`` (gzip CSV) so that it is either the old or the complete new log."""
    from .monitor import write_stats_csv

    def write(f: Any) -> None:
        with gzip.GzipFile(fileobj=f, mode="wb") as packed, io.TextIOWrapper(packed, newline="") as text:
            write_stats_csv(records, text)

    atomic_write(path, write)


def run_or_resume(config: dict[str, Any], progress: bool | None = None, out_option: str = "--out") -> dict[str, Any]:
    """The result of the run in ``config["out"]``: read when finished, else resumed or trained.

    A finished run is reused only when its configuration matches ``config`` (up to
    :data:`RUNTIME_KEYS`); a checkpoint without a result is resumed. This lets a series of runs
    (``mabn reproduce``, ``mabn stats``) pick up where an interrupted invocation stopped.

    Args:
        config: training configuration, as for :func:`train`.
        progress: show a progress bar (default: when stderr is a terminal).
        out_option: the option that sets the directory, named in the error message.

    Raises:
        ValueError: the directory holds a finished run with other settings, or see :func:`train`.
    """
    config = check_config(config)
    out = Path(config["out"])
    if (out / RESULT).is_file():
        result = json.loads((out / RESULT).read_text())
        diffs = _config_differences(result.get("config", {}), config)
        if diffs:
            raise ValueError(
                f"{out} holds a finished run with other settings ({'; '.join(diffs)}); use another {out_option}"
            )
        return result
    return train(config, resume=(out / CHECKPOINT).is_file(), progress=progress)


def _to_list(obj: Any) -> Any:
    return [_to_list(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuple(obj: Any) -> Any:
    return tuple(_to_tuple(o) for o in obj) if isinstance(obj, (tuple, list)) else obj


def _train_epoch(
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: DataSource,
    sampler: Any,
    config: dict[str, Any],
    epoch: int,
    step: int,
    steps: int,
    steps_per_epoch: int,
    device: torch.device,
    ddp: _Dist,
    show: bool,
) -> tuple[dict[str, Any], bool]:
    """Train ``steps`` (<= ``steps_per_epoch``) steps of epoch ``epoch``; return its record and divergence."""
    from tqdm import tqdm

    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    batches = order[: steps * config["batch_size"]].view(steps, config["batch_size"])
    # The augmentation seed depends on (seed, epoch, rank) only, so a resumed run sees the same data.
    aug_seed = (config["seed"] * 100_003 + epoch) * 1_009 + ddp.rank
    net.train()
    loss_sum = wrong = seen = 0.0
    diverged = False
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config['epochs']}", disable=not show, leave=False)
    t0 = time.perf_counter()
    done = 0
    window_loss, window_n = 0.0, 0
    for x, y in source.train_batches(batches, aug_seed, config["workers"]):
        lr = learning_rate(config, step + done, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = ddp.mean(float(loss.detach()))
        if not math.isfinite(value):
            diverged = True  # the paper's "does not converge" rows: stop, evaluate, record it
            break
        optimizer.step()
        done += 1
        loss_sum += value
        wrong += float((logits.detach().argmax(1) != y).sum())
        seen += y.numel()
        window_loss, window_n = window_loss + value, window_n + 1
        bar.update(1)
        if show and (done % 20 == 0 or done == steps):
            rate = done * config["batch_size"] * ddp.world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{window_loss / window_n:.3f}", img_s=f"{rate:.0f}", refresh=False)
            window_loss, window_n = 0.0, 0
    bar.close()
    elapsed = time.perf_counter() - t0
    record = {
        "epoch": epoch + 1,
        "steps": done,
        "lr": learning_rate(config, step + max(done - 1, 0), steps_per_epoch),
        "train_loss": loss_sum / done if done else None,
        "train_error": 100.0 * wrong / seen if seen else None,
        "train_time_s": elapsed,
        "images_per_s": done * config["batch_size"] * ddp.world / elapsed if elapsed > 0 else None,
        "diverged": diverged,
    }
    return record, diverged


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    if record["train_loss"] is not None:
        parts.append(f"loss {record['train_loss']:.4f}  train error {record['train_error']:.2f} %")
    if record.get("test_error") is not None:
        parts.append(f"test error {record['test_error']:.2f} %")
    if record.get("test_error_folded") is not None:
        parts.append(f"folded {record['test_error_folded']:.2f} %")
    if record["diverged"]:
        parts.append("DIVERGED (non-finite loss)")
    rate = record["images_per_s"] or 0.0
    parts.append(f"{record['train_time_s']:.1f} s, {rate:.0f} img/s")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mabn train``."""
    config = config_from_args(args)
    result = train(
        config, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, progress=args.progress
    )
    return 0 if result else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m mabn.train``: the same options and error handling as ``mabn train``."""
    from .cli import CLIError

    parser = argparse.ArgumentParser(prog="mabn train", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"mabn train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mabn train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
