"""The training configuration: its keys and defaults, the ``mabn train`` options, and its checks."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from torch import nn

from ...conv import CONV_CHOICES
from ...factory import NORM_NAMES, is_batch_norm
from ...models import ARCHS
from ..data import DATA_SOURCES

SCHEDULES = ("cosine", "step", "constant")

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
STATS_LOG = "batch_stats.csv.gz"

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
        help=f"normalization: {', '.join(NORM_NAMES)} (mabn.create_norm_layer names) (default: %(default)s)",
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
    if c["conv"] not in CONV_CHOICES:
        raise ValueError(f"unknown --conv {c['conv']!r}; choose one of {', '.join(CONV_CHOICES)}")
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
    from ...models import build_model as _build

    try:
        return _build(mc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot build the model ({mc['arch']}, norm {mc['norm']!r}): {exc}") from None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - RUNTIME_KEYS)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
