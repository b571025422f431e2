"""The training configuration: its keys and defaults, the ``mabn train`` options, and its checks."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from torch import nn

from ...config import PRESETS
from ...conv import CONV_CHOICES
from ...convert import PRESERVE_CHOICES
from ...factory import NORM_NAMES, canonical_name, is_batch_norm
from ...models import ARCH_TASKS, ARCHS, DETECTION_ARCHS
from ..sources import DATA_SOURCES, DATA_TASKS

SCHEDULES = ("cosine", "step", "constant")
TASKS = ("classification", "segmentation", "detection")


#: The input side of the data sources that have one, when --image-size is not given.
DEFAULT_IMAGE_SIZE = {"imagefolder": 224, "fashion-scenes": 96}
#: The architecture of a task when --arch is not given.
DEFAULT_ARCH = {"classification": "resnet_small", "segmentation": "fpn_resnet_small", "detection": "fcos_resnet_small"}
#: The architectures that take --depth and --width (the small ResNet and the models built on it).
SIZED_ARCHS = ("resnet_small", "fpn_resnet_small", *DETECTION_ARCHS)

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
STATS_LOG = "batch_stats.csv.gz"

#: Every key of a training configuration and its default (``mabn train --help`` documents them).
DEFAULTS: dict[str, Any] = {
    "task": None,
    "data": "fashion-mnist",
    "data_dir": None,
    "limit_train": None,
    "limit_test": None,
    "image_size": None,
    "arch": None,
    "depth": None,
    "width": None,
    "norm": "bn",
    "norm_opts": {},
    "conv": "none",
    "batch_size": 32,
    "norm_batch_size": None,
    "accumulate": 1,
    "sync_norm": False,
    "checkpoint_activations": False,
    "head_warmup_iters": None,
    "init": None,
    "init_preserve": "function",
    "freeze_norm": False,
    "recalibrate": None,
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
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="train the configuration in this JSON file (e.g. a run's config.json); only --out, --threads, "
        "--device, --data-dir, --workers and --eval-batch-size may be given with it",
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--task",
        default=None,
        choices=TASKS,
        help="classification (top-1 error), segmentation (pixel cross-entropy, mean IoU) or detection "
        "(torchvision's detector losses, COCO box AP; --data fashion-scenes); default: the data's first",
    )
    g.add_argument("--data", default=d["data"], help=f"data source: {', '.join(DATA_SOURCES)} (default: %(default)s)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="data directory (fashion-mnist default: /usr/share/datasets/fashion-mnist; imagefolder: "
        "a directory with train/ and val/ folders of class folders)",
    )
    g.add_argument("--limit-train", type=int, default=None, help="use only this many training samples")
    g.add_argument("--limit-test", type=int, default=None, help="use only this many test samples")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side: imagefolder crops (default: 224), fashion-scenes canvas (default: 96)",
    )
    g.add_argument("--workers", type=int, default=0, help="imagefolder decoding processes (default: 0)")
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        default=None,
        help=f"{', '.join(ARCHS)} (default: resnet_small for classification, fpn_resnet_small for segmentation, "
        "fcos_resnet_small for detection)",
    )
    g.add_argument(
        "--depth", type=int, default=None, help="resnet_small, fpn_resnet_small, detectors: basic blocks per stage"
    )
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="resnet_small, fpn_resnet_small, detectors: channels of the first stage",
    )
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
        choices=CONV_CHOICES,
        help="convolutions: none (plain) or centralized (weight centralization, the paper's WC); "
        "default: none. The reproduction grids set it explicitly (WC for MABN).",
    )
    g.add_argument(
        "--sync-norm",
        action="store_true",
        help="under torchrun: sync the normalization statistics over the processes (each normalization "
        "group is the union of the matching groups of every process; SyncBatchNorm for bn, on gloo too)",
    )
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="recompute each stage's activations in the backward pass (mabn.checkpoint: the recomputation "
        "reuses the statistics of the forward) to save memory; the stages of the model's ResNet encoder",
    )
    g.add_argument(
        "--head-warmup-iters",
        type=int,
        default=None,
        metavar="N",
        help="detection: the heads' norm layers use their batch statistics for their first N steps (the "
        "warmup_iters of moving-average norms such as mabn; the paper's Table 5 recipe); default: as the backbone",
    )
    g = parser.add_argument_group("fine-tuning")
    g.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start from the weights of a mabn train checkpoint (a classifier's become the encoder of a "
        "segmentation model); its BatchNorms are converted to --norm",
    )
    g.add_argument(
        "--init-preserve",
        default=d["init_preserve"],
        choices=PRESERVE_CHOICES,
        help="BatchNorm -> MABN seeding of --init (mabn.convert_model's preserve): function (the converted "
        "model computes what the pretrained one did) or statistics (R = var + mean^2); default: %(default)s",
    )
    g.add_argument(
        "--freeze-norm",
        action="store_true",
        help="with --init: the pretrained (encoder's) BatchNorms become mabn.FrozenBatchNorm (fixed statistics "
        "and affine parameters); the other norms follow --norm",
    )
    g.add_argument(
        "--recalibrate",
        type=int,
        default=None,
        metavar="N",
        help="after training, re-estimate the running statistics over N training batches (mabn.recalibrate)",
    )
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="gradient batch per process (default: 32)")
    g.add_argument(
        "--norm-batch-size",
        type=int,
        default=None,
        help="samples per normalization group; must divide the micro-batch --batch-size / --accumulate "
        "(default: the whole micro-batch)",
    )
    g.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="gradient accumulation: K micro-batches of --batch-size / K samples per optimizer step; the "
        "normalization statistics stream through them as through one batch (default: 1)",
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


def config_from_file(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The configuration in the JSON file ``path``, with the runtime options given on the command line.

    The file holds the training options as one JSON object, or is a run's ``config.json`` (whose
    ``"train"`` entry holds them).

    Raises:
        ValueError: the file is not UTF-8 JSON text (e.g. a checkpoint), not an object, or holds
            training options that the command line repeats (the message names the option and the file).
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(
            f"--config {path}: not a text file; expected a JSON object of training options (e.g. a run's "
            "config.json), not a checkpoint (start from a checkpoint's weights with --init, continue a run with --resume)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not JSON ({exc}); expected a JSON object of training options") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a JSON object of training options, got {type(config).__name__}")
    if isinstance(config.get("train"), dict) and "model_config" in config:
        config = config["train"]  # a run's config.json
    given = config_from_args(args)
    defaults = config_from_args(parser.parse_args([]))
    extra = sorted(k for k in given if given[k] != defaults[k] and k not in RUNTIME_KEYS)
    if extra:
        options = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ValueError(f"--config {path} holds the training options; {options} cannot be given with it")
    runtime = {k: given[k] for k in RUNTIME_KEYS if given[k] != defaults[k]}
    return {**config, **runtime}


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
        task=args.task,
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
        accumulate=args.accumulate,
        sync_norm=args.sync_norm,
        checkpoint_activations=args.checkpoint_activations,
        head_warmup_iters=args.head_warmup_iters,
        init=args.init,
        init_preserve=args.init_preserve,
        freeze_norm=args.freeze_norm,
        recalibrate=args.recalibrate,
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
    """Validate a training configuration; return it completed with :data:`DEFAULTS` and resolved.

    ``task`` (None: the data's), ``arch`` (None: the task's default) and ``image_size`` (None: the
    data source's default) are filled in.

    Raises:
        ValueError: an unknown key or choice, a task the data or the model cannot do, a non-positive
            size, or batch sizes that do not divide each other (the message names the values).
    """
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
    c = {**DEFAULTS, **config}
    _check_choices(c)
    _check_task(c)
    _check_numbers(c)
    _check_batches(c)
    c["image_size"] = c["image_size"] or DEFAULT_IMAGE_SIZE.get(c["data"])
    if c["monitor_every"] is not None and c["accumulate"] > 1:
        raise ValueError(
            "--monitor-every counts training calls, not optimizer steps: it cannot be used with --accumulate"
        )
    layers = c["monitor_layers"]
    if layers is not None:
        if c["monitor_every"] is None:
            raise ValueError("--monitor-layers needs --monitor-every")
        if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"--monitor-layers must name at least one layer, got {layers!r}")
    return c


def _check_choices(c: dict[str, Any]) -> None:
    if c["data"] not in DATA_SOURCES:
        raise ValueError(f"unknown data source {c['data']!r}; choose one of {', '.join(DATA_SOURCES)}")
    if c["arch"] is not None and c["arch"] not in ARCHS:
        raise ValueError(f"unknown --arch {c['arch']!r}; choose one of {', '.join(ARCHS)}")
    if c["conv"] not in CONV_CHOICES:
        raise ValueError(f"unknown --conv {c['conv']!r}; choose one of {', '.join(CONV_CHOICES)}")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown --schedule {c['schedule']!r}; choose one of {', '.join(SCHEDULES)}")
    if c["device"] not in ("auto", "cpu", "cuda") and not str(c["device"]).startswith("cuda:"):
        raise ValueError(f"unknown --device {c['device']!r}; choose auto, cpu or cuda")
    if not isinstance(c["norm_opts"], dict):
        raise ValueError(f"norm_opts must be a dict, got {c['norm_opts']!r}")
    for key in ("sync_norm", "checkpoint_activations", "freeze_norm"):
        if not isinstance(c[key], bool):
            raise ValueError(f"{key} must be true or false, got {c[key]!r}")
    if c["init_preserve"] not in PRESERVE_CHOICES:
        raise ValueError(f"unknown --init-preserve {c['init_preserve']!r}; choose one of {', '.join(PRESERVE_CHOICES)}")
    if c["init"] is not None and not isinstance(c["init"], str):
        raise ValueError(f"init must be a checkpoint path, got {c['init']!r}")
    if c["freeze_norm"] and c["init"] is None:
        raise ValueError("--freeze-norm freezes pretrained BatchNorms: it needs --init CKPT")


def _check_task(c: dict[str, Any]) -> None:
    """Resolve the task and the architecture; the data and the model must both do the task."""
    tasks = DATA_TASKS[c["data"]]
    if c["task"] is not None and c["task"] not in TASKS:
        raise ValueError(f"unknown --task {c['task']!r}; choose one of {', '.join(TASKS)}")
    if c["task"] is not None and c["task"] not in tasks:
        raise ValueError(f"--task {c['task']} with --data {c['data']}: that data source is for {' and '.join(tasks)}")
    task = c["task"] = c["task"] or tasks[0]
    c["arch"] = c["arch"] or DEFAULT_ARCH[task]
    if ARCH_TASKS[c["arch"]] != task:
        what = {"segmentation": "a segmentation head", "detection": "a detector"}.get(task, "a classifier")
        raise ValueError(f"--arch {c['arch']} is not {what}: --task {task} needs {what}")
    if c["arch"] not in SIZED_ARCHS and (c["depth"] is not None or c["width"] is not None):
        raise ValueError(f"--depth and --width apply to {', '.join(SIZED_ARCHS)} only, not to {c['arch']}")
    _check_detection(c)


def _check_detection(c: dict[str, Any]) -> None:
    """Options that only detectors take, and what detectors cannot do."""
    warmup = c["head_warmup_iters"]
    if warmup is not None:
        if c["task"] != "detection":
            raise ValueError("--head-warmup-iters applies to detectors (--task detection) only")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"head_warmup_iters must be an int >= 0, got {warmup!r}")
        preset = PRESETS.get(canonical_name(c["norm"])) if isinstance(c["norm"], str) else None
        if preset is None or "sma" not in (preset.forward_stats, preset.backward_stats):
            raise ValueError(
                f"--head-warmup-iters sets the warm-up of moving-average norms (e.g. mabn); {c['norm']!r} has none"
            )
    if c["task"] == "detection" and c["recalibrate"]:
        raise ValueError("--recalibrate runs the model on images alone; detectors train on images and targets")


def _check_numbers(c: dict[str, Any]) -> None:
    for key in ("batch_size", "epochs", "eval_every", "eval_batch_size", "accumulate"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {c[key]!r}")
    for key in (
        "depth",
        "width",
        "threads",
        "limit_train",
        "limit_test",
        "max_steps",
        "monitor_every",
        "image_size",
        "recalibrate",
    ):
        if c[key] is not None and (not isinstance(c[key], int) or c[key] < 1):
            raise ValueError(f"{key} must be a positive integer, got {c[key]!r}")
    if not isinstance(c["workers"], int) or c["workers"] < 0:
        raise ValueError(f"workers must be >= 0, got {c['workers']!r}")
    for key in ("lr", "weight_decay", "warmup_epochs", "lr_gamma"):
        if not isinstance(c[key], (int, float)) or not math.isfinite(c[key]) or c[key] < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {c[key]!r}")
    if c["warmup_epochs"] > c["epochs"]:
        raise ValueError(f"--warmup-epochs {c['warmup_epochs']} exceeds --epochs {c['epochs']}")


def _check_batches(c: dict[str, Any]) -> None:
    """Gradient batch = accumulate x micro-batch; the normalization batch divides the micro-batch."""
    k, batch = c["accumulate"], c["batch_size"]
    if batch % k:
        raise ValueError(f"--accumulate {k} does not divide --batch-size {batch} into equal micro-batches")
    micro = batch // k
    b = c["norm_batch_size"]
    per_sample = not is_batch_norm(c["norm"])
    if c["sync_norm"] and per_sample:
        raise ValueError(f"--sync-norm does not apply to the per-sample normalization {c['norm']!r}")
    if b is None:
        return
    if per_sample:
        raise ValueError(f"--norm-batch-size does not apply to the per-sample normalization {c['norm']!r}")
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"--norm-batch-size must be a positive integer, got {b!r}")
    if micro % b:
        if k == 1:
            raise ValueError(f"--norm-batch-size {b} does not divide --batch-size {batch}")
        raise ValueError(
            f"--norm-batch-size {b} does not divide the micro-batch of {micro} samples "
            f"(--batch-size {batch} / --accumulate {k})"
        )


def model_config(config: dict[str, Any], num_classes: int, in_channels: int) -> dict[str, Any]:
    """The ``mabn.models.build_model`` configuration of a training configuration."""
    norm_kwargs = dict(config["norm_opts"])
    if config["norm_batch_size"] is not None:
        norm_kwargs["norm_batch_size"] = config["norm_batch_size"]
    if config["accumulate"] > 1 and is_batch_norm(config["norm"]):
        norm_kwargs["accumulate"] = config["accumulate"]
    mc: dict[str, Any] = {
        "arch": config["arch"],
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm": config["norm"],
        "norm_kwargs": norm_kwargs,
        "conv": None if config["conv"] == "none" else config["conv"],
    }
    for key in ("depth", "width", "head_warmup_iters"):
        if config[key] is not None:
            mc[key] = config[key]
    if config["freeze_norm"]:
        mc["frozen_encoder"] = True
    return mc


def build_model(mc: dict[str, Any]) -> nn.Module:
    """``mabn.models.build_model`` with its errors turned into one-line ``ValueError``s."""
    from ...models import build_model as _build

    try:
        return _build(mc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot build the model ({mc['arch']}, norm {mc['norm']!r}): {exc}") from None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ (runtime keys aside), as ``"key: old -> new"``.

    A key the saved configuration lacks (written before the key existed) counts as its default.
    """
    keys = sorted((set(saved) | set(current)) - RUNTIME_KEYS)
    old = {k: saved.get(k, DEFAULTS.get(k)) for k in keys}
    new = {k: current.get(k, DEFAULTS.get(k)) for k in keys}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys if old[k] != new[k]]
