"""The training configuration: its keys and defaults, the ``mabn train`` options, and its checks."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from ...config import PRESETS
from ...conv import CONV_CHOICES as LIBRARY_CONV_CHOICES
from ...convert import PRESERVE_CHOICES
from ...factory import NORM_NAMES, canonical_name, is_batch_norm
from ...models import ARCHS, DETECTION_ARCHS
from ...models.build import arch_task, check_arch
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


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of ``mabn train``: its configuration key, default, command-line form and help.

    ``key`` is the key in the training configuration (``config=False``: an option of the command line
    only, such as ``--resume``) and the attribute of the parsed arguments; with ``_`` -> ``-`` it is
    the option's name, unless ``flag`` names it (``flag=None``: a configuration key without option).
    ``group`` is the ``--help`` section, ``type``, ``choices``, ``metavar`` and ``action`` are
    ``add_argument``'s, and ``parse`` turns a parsed value into the configuration's (for example
    comma-separated text into a list; ``None`` is never parsed).

    Example::

        >>> Option("lr", 0.05, "peak SGD learning rate (default: %(default)s)", "optimization", type=float).option
        '--lr'

    """

    key: str
    default: Any
    help: str
    group: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    action: str | type[argparse.Action] | None = None
    flag: str | None = ""
    config: bool = True
    parse: Callable[[Any], Any] | None = None

    @property
    def option(self) -> str | None:
        """The command-line option (``--data-dir``), or None for a configuration key with none."""
        if self.flag is None:
            return None
        return self.flag or "--" + self.key.replace("_", "-")

    def argparse_kwargs(self) -> dict[str, Any]:
        """The keywords of ``add_argument`` for this option."""
        kwargs: dict[str, Any] = {"dest": self.key, "help": self.help, "action": self.action}
        if self.action not in ("store_true", argparse.BooleanOptionalAction):  # flags take no value
            kwargs.update(type=self.type, choices=self.choices, metavar=self.metavar)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        # A parsed option's default is the configuration's, filled in by config_from_args.
        kwargs["default"] = None if self.parse is not None else self.default
        return kwargs


def _parse_value(text: str) -> Any:
    """``--norm-opt`` values: JSON literals (1, 0.5, true, null, "x"), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_norm_kwargs(items: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--norm-opt expects KEY=VALUE, got {item!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    return kwargs


def _parse_milestones(text: str) -> list[float] | None:
    try:
        return [float(m) for m in text.split(",") if m.strip()] or None
    except ValueError:
        raise ValueError(f"--milestones expects comma-separated epochs, got {text!r}") from None


def _parse_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


#: ``--conv`` on the command line: "none" is the library's None (plain convolutions).
CONV_CHOICES = ("none", *LIBRARY_CONV_CHOICES)


def _parse_conv(text: str) -> str | None:
    return None if text == "none" else text


#: The options of ``mabn train`` in ``--help`` order, by group: the one table the parser, the
#: configuration keys and their defaults (:data:`DEFAULTS`) come from.
OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        None,
        "train the configuration in this JSON file (e.g. a run's config.json); only --out, --threads, "
        "--device, --data-dir, --workers and --eval-batch-size may be given with it",
        metavar="FILE",
        config=False,
    ),
    # data
    Option(
        "task",
        None,
        "classification (top-1 error), segmentation (pixel cross-entropy, mean IoU) or detection "
        "(torchvision's detector losses, COCO box AP; --data fashion-scenes); default: the data's first",
        "data",
        choices=TASKS,
    ),
    Option("data", "fashion-mnist", f"data source: {', '.join(DATA_SOURCES)} (default: %(default)s)", "data"),
    Option(
        "data_dir",
        None,
        "data directory (fashion-mnist default: /usr/share/datasets/fashion-mnist; imagefolder: "
        "a directory with train/ and val/ folders of class folders)",
        "data",
    ),
    Option("limit_train", None, "use only this many training samples", "data", type=int),
    Option("limit_test", None, "use only this many test samples", "data", type=int),
    Option(
        "image_size",
        None,
        "input side: imagefolder crops (default: 224), fashion-scenes canvas (default: 96)",
        "data",
        type=int,
    ),
    Option("workers", 0, "imagefolder decoding processes (default: %(default)s)", "data", type=int),
    # model
    Option(
        "arch",
        None,
        f"{', '.join(ARCHS)}, or a classifier of timm or torchvision as timm:NAME or torchvision:NAME "
        "(e.g. timm:resnet50d, torchvision:mobilenet_v3_large: built for the data's channels and classes, "
        "no pretrained weights, its BatchNorms converted to --norm) (default: resnet_small for classification, "
        "fpn_resnet_small for segmentation, fcos_resnet_small for detection)",
        "model",
    ),
    Option("depth", None, "resnet_small, fpn_resnet_small, detectors: basic blocks per stage", "model", type=int),
    Option("width", None, "resnet_small, fpn_resnet_small, detectors: channels of the first stage", "model", type=int),
    Option(
        "norm",
        "bn",
        f"normalization: {', '.join(NORM_NAMES)} (mabn.create_norm_layer names) (default: %(default)s)",
        "model",
    ),
    Option(
        "norm_kwargs",
        {},
        "extra keyword of the normalization layer, repeatable (e.g. r_max=3, warmup_iters=100)",
        "model",
        metavar="KEY=VALUE",
        action="append",
        flag="--norm-opt",
        parse=_parse_norm_kwargs,
    ),
    # --window, --momentum and --eps are shorthands for --norm-opt window=..., momentum=..., eps=...
    Option("window", None, "SMA window m of the norm (default: the layer's, 16)", "model", type=int, config=False),
    Option(
        "norm_momentum",
        None,
        "running-statistics momentum of the norm",
        "model",
        type=float,
        metavar="MOMENTUM",
        flag="--momentum",
        config=False,
    ),
    Option("eps", None, "eps of the norm", "model", type=float, config=False),
    Option(
        "conv",
        None,
        "convolutions: none (plain) or centralized (weight centralization, the paper's WC); "
        "default: none. The reproduction grids set it explicitly (WC for MABN).",
        "model",
        choices=CONV_CHOICES,
        parse=_parse_conv,
    ),
    Option(
        "sync_norm",
        False,
        "under torchrun: sync the normalization statistics over the processes (each normalization "
        "group is the union of the matching groups of every process; SyncBatchNorm for bn, on gloo too)",
        "model",
        action="store_true",
    ),
    Option(
        "checkpoint_activations",
        False,
        "recompute each stage's activations in the backward pass (mabn.checkpoint: the recomputation "
        "reuses the statistics of the forward) to save memory; the stages of the model's ResNet encoder",
        "model",
        action="store_true",
    ),
    Option(
        "head_warmup_iters",
        None,
        "detection: the heads' norm layers use their batch statistics for their first N steps (the "
        "warmup_iters of moving-average norms such as mabn; the paper's Table 5 recipe); default: as the backbone",
        "model",
        type=int,
        metavar="N",
    ),
    # fine-tuning
    Option(
        "init",
        None,
        "start from the weights of a mabn train checkpoint (a classifier's become the encoder of a "
        "segmentation model); its BatchNorms are converted to --norm",
        "fine-tuning",
        metavar="CKPT",
    ),
    Option(
        "init_preserve",
        "function",
        "BatchNorm -> MABN seeding of --init (mabn.convert_model's preserve): function (the converted "
        "model computes what the pretrained one did) or statistics (R = var + mean^2); default: %(default)s",
        "fine-tuning",
        choices=PRESERVE_CHOICES,
    ),
    Option(
        "freeze_norm",
        False,
        "with --init: the pretrained (encoder's) BatchNorms become mabn.FrozenBatchNorm (fixed statistics "
        "and affine parameters); the other norms follow --norm",
        "fine-tuning",
        action="store_true",
    ),
    Option(
        "recalibrate",
        None,
        "after training, re-estimate the running statistics over N training batches (mabn.recalibrate)",
        "fine-tuning",
        type=int,
        metavar="N",
    ),
    # optimization
    Option("batch_size", 32, "gradient batch per process (default: %(default)s)", "optimization", type=int),
    Option(
        "norm_batch_size",
        None,
        "samples per normalization group; must divide the micro-batch --batch-size / --accumulate "
        "(default: the whole micro-batch)",
        "optimization",
        type=int,
    ),
    Option(
        "accumulate",
        1,
        "gradient accumulation: K micro-batches of --batch-size / K samples per optimizer step; the "
        "normalization statistics stream through them as through one batch (default: %(default)s)",
        "optimization",
        type=int,
        metavar="K",
    ),
    Option("epochs", 5, "training epochs (default: %(default)s)", "optimization", type=int),
    Option(
        "max_steps",
        None,
        "end the run after this many optimizer steps, inside an epoch if need be; the schedule "
        "still spans --epochs (default: no limit)",
        "optimization",
        type=int,
    ),
    Option("lr", 0.05, "peak SGD learning rate (default: %(default)s)", "optimization", type=float),
    Option("momentum", 0.9, "SGD momentum", flag=None),
    Option("nesterov", False, "Nesterov momentum (SGD momentum is 0.9)", "optimization", action="store_true"),
    Option("weight_decay", 1e-4, "default: %(default)s", "optimization", type=float),
    Option("schedule", "cosine", "cosine, step or constant (default: %(default)s)", "optimization"),
    Option("warmup_epochs", 0.5, "linear warm-up length (default: %(default)s)", "optimization", type=float),
    Option(
        "milestones",
        None,
        "step schedule: comma-separated epochs where the rate is multiplied by --lr-gamma "
        "(default: 50%% and 75%% of the epochs)",
        "optimization",
        parse=_parse_milestones,
    ),
    Option("lr_gamma", 0.1, "step schedule factor (default: %(default)s)", "optimization", type=float),
    Option("seed", 0, "seed of weights, data order and augmentation", "optimization", type=int),
    # run
    Option("eval_every", 1, "evaluate every N epochs and at the end (default: %(default)s)", "run", type=int),
    Option("eval_batch_size", 500, "default: %(default)s", "run", type=int),
    Option("device", "auto", "auto (CUDA when available), cpu, cuda (default: %(default)s)", "run"),
    Option("threads", None, "torch CPU threads (default: torch's choice)", "run", type=int),
    Option("out", "runs/train", "output directory (default: %(default)s)", "run"),
    Option(
        "resume", False, "continue the run in --out from its last checkpoint", "run", action="store_true", config=False
    ),
    Option("overwrite", False, "start afresh even if --out holds a run", "run", action="store_true", config=False),
    Option(
        "stop_after",
        None,
        "stop once this many epochs are done (continue later with --resume)",
        "run",
        type=int,
        metavar="EPOCHS",
        config=False,
    ),
    Option(
        "progress",
        None,
        "progress bar (default: on a tty)",
        "run",
        action=argparse.BooleanOptionalAction,
        config=False,
    ),
    # batch-statistics monitor
    Option(
        "monitor_every",
        None,
        "record the batch statistics (mu, sigma^2, g, Psi) of the normalization layers every N steps "
        f"into OUT/{STATS_LOG} (mabn.BatchStatsMonitor; plot with mabn stats --log)",
        "batch-statistics monitor",
        type=int,
        metavar="N",
    ),
    Option(
        "monitor_layers",
        None,
        "comma-separated layer names to monitor (default: every normalization layer)",
        "batch-statistics monitor",
        metavar="NAMES",
        parse=_parse_names,
    ),
)

#: Every key of a training configuration and its default (``mabn train --help`` documents them).
DEFAULTS: dict[str, Any] = {o.key: o.default for o in OPTIONS if o.config}

#: Configuration key -> its command-line option.
_OPTION_OF: dict[str, str] = {o.key: o.option for o in OPTIONS if o.config and o.option is not None}

#: Keys that may differ between a run and its ``--resume`` (they do not change the computation).
RUNTIME_KEYS = frozenset({"data_dir", "eval_batch_size", "threads", "workers", "out", "device"})

#: Configuration keys of earlier versions and their names now (configurations written then still load).
RENAMED_KEYS = {"norm_opts": "norm_kwargs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``mabn train`` (:data:`OPTIONS`) to ``parser``, in their groups."""
    groups: dict[str | None, Any] = {None: parser}
    for option in OPTIONS:
        if option.option is None:
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        groups[option.group].add_argument(option.option, **option.argparse_kwargs())


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration written by an earlier version, in today's keys and values (a new dict).

    ``norm_opts`` is now ``norm_kwargs`` and ``conv: "none"`` is ``None``, as in :mod:`mabn`.

    Raises:
        ValueError: the configuration holds both a key and its old name, with different values.
    """
    config = dict(config)
    for old, new in RENAMED_KEYS.items():
        if old in config:
            value = config.pop(old)
            if new in config and config[new] != value:
                raise ValueError(f"the configuration has both {old!r} (the old name of {new!r}) and {new!r}")
            config[new] = value
    if config.get("conv") == "none":
        config["conv"] = None
    return config


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
        options = ", ".join(_OPTION_OF.get(k, "--" + k.replace("_", "-")) for k in extra)
        raise ValueError(f"--config {path} holds the training options; {options} cannot be given with it")
    runtime = {k: given[k] for k in RUNTIME_KEYS if given[k] != defaults[k]}
    return {**upgrade_config(config), **runtime}


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training configuration (keys of :data:`DEFAULTS`) from parsed ``mabn train`` options."""
    config = copy.deepcopy(DEFAULTS)
    for option in OPTIONS:
        if not option.config or option.option is None:
            continue
        value = getattr(args, option.key)
        if value is not None and option.parse is not None:
            value = option.parse(value)
        config[option.key] = copy.deepcopy(option.default) if value is None else value
    # The shorthands of --norm-opt.
    for key, dest in (("window", "window"), ("momentum", "norm_momentum"), ("eps", "eps")):
        if getattr(args, dest) is not None:
            config["norm_kwargs"] = {**config["norm_kwargs"], key: getattr(args, dest)}
    return config


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a training configuration; return it completed with :data:`DEFAULTS` and resolved.

    ``task`` (None: the data's), ``arch`` (None: the task's default) and ``image_size`` (None: the
    data source's default) are filled in.

    Raises:
        ValueError: an unknown key or choice, a task the data or the model cannot do, a non-positive
            size, or batch sizes that do not divide each other (the message names the values).
    """
    config = upgrade_config(config)
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
    if c["arch"] is not None:
        check_arch(c["arch"], "--arch")  # a timm or torchvision name: its library is imported to check it
    if c["conv"] is not None and c["conv"] not in LIBRARY_CONV_CHOICES:
        raise ValueError(f"unknown --conv {c['conv']!r}; choose one of {', '.join(CONV_CHOICES)}")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown --schedule {c['schedule']!r}; choose one of {', '.join(SCHEDULES)}")
    if c["device"] not in ("auto", "cpu", "cuda") and not str(c["device"]).startswith("cuda:"):
        raise ValueError(f"unknown --device {c['device']!r}; choose auto, cpu or cuda")
    if not isinstance(c["norm_kwargs"], dict):
        raise ValueError(f"norm_kwargs must be a dict, got {c['norm_kwargs']!r}")
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
    if arch_task(c["arch"]) != task:
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
    norm_kwargs = dict(config["norm_kwargs"])
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
        "conv": config["conv"],
    }
    for key in ("depth", "width", "head_warmup_iters"):
        if config[key] is not None:
            mc[key] = config[key]
    if config["freeze_norm"]:
        mc["frozen_encoder"] = True
    return mc


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ (runtime keys aside), as ``"key: old -> new"``.

    A key the saved configuration lacks (written before the key existed) counts as its default, and
    keys and values of earlier versions are read as today's (:func:`upgrade_config`).
    """
    saved, current = upgrade_config(saved), upgrade_config(current)
    keys = sorted((set(saved) | set(current)) - RUNTIME_KEYS)
    old = {k: saved.get(k, DEFAULTS.get(k)) for k in keys}
    new = {k: current.get(k, DEFAULTS.get(k)) for k in keys}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys if old[k] != new[k]]
