"""Train a classifier, a segmentation model or a detector with any normalization layer (the loop of ``mabn train``).

``mabn train`` (or ``python -m mabn train``; under ``torchrun`` it trains with
DistributedDataParallel) builds ``mabn.models.build_model(model_config)`` with the chosen
normalization preset, trains it with SGD (momentum 0.9) under a cosine or step schedule with linear
warm-up (or a constant rate), and evaluates the model and its folded inference form (``mabn.fold``)
on the test split: top-1 error for classification, mean IoU and pixel accuracy for segmentation
(``--task segmentation --data fashion-scenes``), COCO box AP for detection (``--task detection
--data fashion-scenes``, torchvision's detectors). The output directory receives:

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
paper's protocol), split into ``--accumulate`` micro-batches (one forward and backward each) and
those into groups of ``--norm-batch-size`` samples for batch statistics. ``--sync-norm`` syncs the
statistics over the processes; ``--checkpoint-activations`` recomputes each stage in the backward.

Example::

    mabn train --norm mabn --conv centralized --norm-batch-size 2 --epochs 5 --out runs/mabn2
    torchrun --nproc_per_node=2 -m mabn train --data synthetic --epochs 1 --out runs/ddp
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...factory import canonical_name, is_batch_norm
from ...models import build_model
from ...serialization import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint
from ..files import atomic_save, atomic_write, buffer_digest, param_digest, write_json
from ..sources import make_source
from .config import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESULT,
    STATS_LOG,
    check_config,
    config_differences,
    model_config,
)
from .distributed import Distributed, select_device
from .evaluate import evaluate, evaluate_folded, to_device, training_loss
from .init import load_pretrained, recalibrate_run

__all__ = ["train", "run_or_resume", "learning_rate"]


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


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


@dataclasses.dataclass
class _Run:
    """The state of one training run while it is going."""

    config: dict[str, Any]
    out: Path
    ddp: Distributed
    device: torch.device
    source: Any
    mc: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    wall_time: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    diverged: bool = False
    net: nn.Module | None = None
    sampler: Any = None
    monitor: Any = None

    @property
    def max_steps(self) -> int:
        c = self.config
        return c["max_steps"] if c["max_steps"] is not None else c["epochs"] * self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.epoch >= self.config["epochs"] or self.step >= self.max_steps or self.diverged


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
        ``{"error", "error_folded"}`` (classification), ``{"miou", "pixel_acc", "miou_folded",
        "pixel_acc_folded"}`` (segmentation) or ``{"box_ap", "box_ap50", "box_ap75", "box_ap_folded",
        ...}`` (detection, COCO AP in percent), with ``"epochs", "wall_time_s",
        "train_time_per_epoch_s", "diverged", "param_digest", ...`` (``"stopped": True`` and no
        metrics when stopped early).

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
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
    ckpt = _checkpoint_to_resume(config, resume, overwrite)
    run = _open(config, ckpt)
    finished = False
    try:
        _start(run, fresh=ckpt is None)
        show = (progress if progress is not None else sys.stderr.isatty()) and run.ddp.rank == 0
        _log(run.ddp.rank, _header(run))
        while not run.done and (stop_after is None or run.epoch < stop_after):
            _epoch(run, show)
        result = _finish(run)
        finished = True
        return result
    finally:
        if run.monitor is not None:
            run.monitor.remove()
        run.net = run.model  # DDP's reducer goes before its process group
        run.ddp.close(finished)


def _checkpoint_to_resume(config: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` continues (checked against the configuration), or None for a new run."""
    out = Path(config["out"])
    path = out / CHECKPOINT
    world = Distributed().world
    if not resume:
        if not overwrite and (path.exists() or (out / RESULT).exists()):
            raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite, or another --out")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path} to resume from")
    ckpt = load_checkpoint(path, training=True)
    if ckpt.get("world_size", 1) != world:
        raise ValueError(f"{path} was written by {ckpt.get('world_size', 1)} processes, not {world}")
    diffs = config_differences(ckpt["config"], config)
    if diffs:
        raise ValueError(f"--resume with a different configuration than {path}: {'; '.join(diffs)}")
    return ckpt


def _open(config: dict[str, Any], ckpt: dict[str, Any] | None) -> _Run:
    """Data, model and optimizer of the run, restored from ``ckpt`` when resuming (no file written yet)."""
    ddp = Distributed()
    device = select_device(config["device"], ddp.local_rank)
    source = make_source(
        config["data"],
        config["data_dir"],
        config["limit_train"],
        config["limit_test"],
        config["image_size"],
        task=config["task"],
        masks=config["arch"] == "maskrcnn_resnet_small",
    )
    if config["threads"] is not None:
        torch.set_num_threads(config["threads"])
    mc = model_config(config, source.num_classes, source.in_channels)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    try:
        model = build_model(mc)
    except (ValueError, TypeError) as exc:  # one line for the command: which model, what is wrong
        raise ValueError(f"cannot build the model ({mc['arch']}, norm {mc['norm']!r}): {exc}") from None
    if ckpt is None and config["init"] is not None:
        _log(ddp.rank, load_pretrained(model, config, mc))
    model = model.to(device)
    if config["checkpoint_activations"]:
        _checkpoint_stages(model, config["arch"])
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
    run = _Run(config, Path(config["out"]), ddp, device, source, mc, model, optimizer, steps_per_epoch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        run.epoch, run.step = int(ckpt["epoch"]), int(ckpt["step"])
        run.wall_time, run.history = float(ckpt.get("wall_time", 0.0)), list(ckpt.get("history", []))
        run.diverged = bool(ckpt.get("diverged", False))
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(_to_tuple(ckpt["rng"]["python"]))
    # Every process builds the monitor, so that a bad layer name fails on all of them alike; rank 0 keeps it.
    run.monitor = _make_monitor(model, config, run.out if ddp.rank == 0 else None, run.step if ckpt else None)
    if run.monitor is not None and ddp.rank != 0:
        run.monitor.remove()
        run.monitor = None
    return run


def _start(run: _Run, fresh: bool) -> None:
    """Output files, the process group, DDP (with synced norms on request) and the data sampler."""
    config, out, ddp = run.config, run.out, run.ddp
    if ddp.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            write_json(out / CONFIG, {"train": config, "model_config": run.mc, "world_size": ddp.world})
            for stale in (RESULT, METRICS, STATS_LOG):
                with contextlib.suppress(FileNotFoundError):
                    (out / stale).unlink()
        # metrics.jsonl always mirrors the checkpoint's history (a kill may have cut it short).
        atomic_write(out / METRICS, lambda f: f.write("".join(json.dumps(h) + "\n" for h in run.history).encode()))
    ddp.init(run.device)
    run.net = run.model
    if ddp.active:
        if config["sync_norm"]:
            import torch.distributed as dist

            from ...convert import convert_model

            # The same layers (parameters, statistics, settings), with their statistics synced.
            convert_model(run.model, config["norm"], process_group=dist.group.WORLD)
        # broadcast_buffers=False: each process keeps its own statistics stream. DDP's default would copy
        # rank 0's windows over the others' before every forward; synced windows are equal anyway, so the
        # copy would only cost a broadcast (docs/design.md, section 11).
        with warnings.catch_warnings():
            # torch 2.13 flags broadcast_buffers as deprecated but still advises it for rank-local buffers.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            run.net = nn.parallel.DistributedDataParallel(
                run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False
            )
    from torch.utils.data.distributed import DistributedSampler

    run.sampler = DistributedSampler(
        range(run.source.num_train),
        num_replicas=ddp.world,
        rank=ddp.rank,
        shuffle=True,
        seed=config["seed"],
        drop_last=True,
    )


def _header(run: _Run) -> str:
    c = run.config
    micro = c["batch_size"] // c["accumulate"]
    if not is_batch_norm(c["norm"]):
        stats = "statistics per sample" if canonical_name(c["norm"]) != "frozen_bn" else "fixed statistics"
    else:
        stats = f"normalization batch {c['norm_batch_size'] or micro}"
    if c["freeze_norm"]:
        stats += ", pretrained norms frozen"
    parts = [
        f"training {c['arch']} ({c['task']}) with norm {c['norm']!r} ({stats}"
        + (", synced" if c["sync_norm"] and run.ddp.active else "")
        + f", conv {c['conv'] or 'plain'}) on {run.source.name}: {run.source.num_train} images, {c['epochs']} epochs x "
        f"{run.steps_per_epoch} steps of {c['batch_size']} x {run.ddp.world} process(es)"
    ]
    if c["accumulate"] > 1:
        parts.append(f"{c['accumulate']} micro-batches of {micro} per step")
    if c["max_steps"] is not None:
        parts.append(f"ending after step {c['max_steps']}")
    return ", ".join(parts) + f", out {run.out}"


def _epoch(run: _Run, show: bool) -> None:
    """Train one epoch (or up to max_steps), evaluate when due, write the checkpoint and the metrics line."""
    config, ddp = run.config, run.ddp
    record = _train_epoch(run, min(run.steps_per_epoch, run.max_steps - run.step), show)
    run.diverged = record["diverged"]
    run.step += record["steps"]
    run.epoch += 1
    if run.done and config["recalibrate"] and not run.diverged:
        # Every process, so that synced layers meet in their collectives.
        recalibrate_run(run.model, run.source, config, run.device, ddp.rank)
        record["recalibrated_batches"] = config["recalibrate"]
    if ddp.rank == 0 and (run.done or run.epoch % config["eval_every"] == 0):
        t0 = time.perf_counter()
        args = (run.source, config["eval_batch_size"], run.device, config["workers"])
        record.update({f"test_{k}": v for k, v in evaluate(run.model, *args).items()})
        if run.done:
            folded, reason = evaluate_folded(run.model, *args)
            record.update({f"test_{k}_folded": v for k, v in (folded or {}).items()})
            if reason:
                record["fold_note"] = reason
        record["eval_time_s"] = time.perf_counter() - t0
    run.wall_time += record["train_time_s"] + record.get("eval_time_s", 0.0)
    record["wall_time_s"] = run.wall_time
    run.history.append(record)
    if ddp.rank == 0:
        if run.monitor is not None:
            # Before the checkpoint: a kill in between leaves a log ahead of it, which the
            # resumed run trims to the checkpoint's step.
            _save_stats_log(run.monitor.records, run.out / STATS_LOG)
        _save_checkpoint(run)
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        _log(ddp.rank, _epoch_line(record, config["epochs"]))
    ddp.barrier()


def _save_checkpoint(run: _Run) -> None:
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": run.mc,
            "model": run.model.state_dict(),
            "epoch": run.epoch,
            "step": run.step,
            "optimizer": run.optimizer.state_dict(),
            "schedule": {"kind": run.config["schedule"], "step": run.step, "steps_per_epoch": run.steps_per_epoch},
            "rng": {"torch": torch.get_rng_state(), "python": list(_to_list(random.getstate()))},
            "config": run.config,
            "history": run.history,
            "wall_time": run.wall_time,
            "diverged": run.diverged,
            "world_size": run.ddp.world,
        },
        run.out / CHECKPOINT,
    )


def _finish(run: _Run) -> dict[str, Any]:
    """The result of a finished run (written to result.json), or a note that it stopped early."""
    config, ddp = run.config, run.ddp
    digest = param_digest(run.model)
    if ddp.active:
        # Every process leaves its digest: equal digests prove the replicas stayed in sync. The second
        # line digests the buffers (each process's own statistics, identical only when synced).
        (run.out / f"params-rank{ddp.rank}.sha256").write_text(f"{digest}\n{buffer_digest(run.model)}\n")
    if not run.done:
        _log(ddp.rank, f"stopped after epoch {run.epoch}; continue with --resume")
        return {"stopped": True, "epochs_done": run.epoch, "param_digest": digest}
    final = run.history[-1] if run.history else {}
    train_times = [h["train_time_s"] for h in run.history if h.get("steps") == run.steps_per_epoch]
    result = {key[5:]: value for key, value in final.items() if key.startswith("test_")}
    if config["task"] == "classification":
        result.setdefault("error", None)
        result.setdefault("error_folded", None)
    result.update(
        {
            "task": config["task"],
            "fold_note": final.get("fold_note"),
            "epochs": config["epochs"],
            "epochs_done": run.epoch,
            "steps": run.step,
            "diverged": run.diverged,
            "final_train_loss": final.get("train_loss"),
            "wall_time_s": run.wall_time,
            "train_time_per_epoch_s": sum(train_times) / len(train_times) if train_times else None,
            "images_per_s": final.get("images_per_s"),
            "param_digest": digest,
            "world_size": ddp.world,
            "config": config,
        }
    )
    if ddp.rank == 0:
        write_json(run.out / RESULT, result)
        _log(ddp.rank, _done_line(result, run.wall_time))
    return result


def _done_line(result: dict[str, Any], wall_time: float) -> str:
    if result["task"] == "detection":
        nan = float("nan")
        text = f"done: test box AP {result.get('box_ap', nan):.2f} %, AP50 {result.get('box_ap50', nan):.2f} %"
        if result.get("mask_ap") is not None:
            text += f", mask AP {result['mask_ap']:.2f} %"
        folded = result.get("box_ap_folded")
        text += f", folded box AP {folded:.2f} %" if folded is not None else f" (folded: {result['fold_note']})"
    elif result["task"] == "segmentation":
        text = f"done: test mIoU {result.get('miou', float('nan')):.2f} %, pixel accuracy {result.get('pixel_acc', float('nan')):.2f} %"
        folded = result.get("miou_folded")
        text += f", folded mIoU {folded:.2f} %" if folded is not None else f" (folded: {result['fold_note']})"
    else:
        err, fold_err = result["error"], result["error_folded"]
        text = f"done: test error {err:.2f} %"
        text += f", folded {fold_err:.2f} %" if fold_err is not None else f" (folded: {result['fold_note']})"
    return text + (" (diverged)" if result["diverged"] else "") + f", {wall_time:.0f} s"


def _make_monitor(model: nn.Module, config: dict[str, Any], out: Path | None, resumed_step: int | None) -> Any:
    """The run's :class:`BatchStatsMonitor` (None without ``monitor_every``).

    A resumed run continues its step numbering and, when ``out`` is given, keeps the records of its
    log up to the checkpoint's step.
    """
    if config["monitor_every"] is None:
        return None
    from ...monitor import BatchStatsMonitor, read_stats_log

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
    from ...monitor import write_stats_csv

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
        diffs = config_differences(result.get("config", {}), config)
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


def _checkpoint_stages(model: nn.Module, arch: str) -> None:
    """Recompute the stages of every ResNet in ``model`` in the backward pass (``ResNet.checkpoint_stages``)."""
    from ...models import ResNet

    encoders = [m for m in model.modules() if isinstance(m, ResNet)]
    if not encoders:
        raise ValueError(f"--checkpoint-activations: {arch} has no ResNet stages to checkpoint")
    for encoder in encoders:
        encoder.checkpoint_stages = True


def _micro_batches(x: torch.Tensor, y: Any, k: int) -> list[tuple[torch.Tensor, Any]]:
    """The ``k`` consecutive micro-batches of a gradient batch (targets: a tensor or a list per image)."""
    xs = x.chunk(k)
    if isinstance(y, torch.Tensor):
        return list(zip(xs, y.chunk(k)))
    size = xs[0].shape[0]
    return [(xm, y[i * size : i * size + xm.shape[0]]) for i, xm in enumerate(xs)]


def _train_epoch(run: _Run, steps: int, show: bool) -> dict[str, Any]:
    """Train ``steps`` (<= steps per epoch) optimizer steps of the current epoch; return its record."""
    from tqdm import tqdm

    config, ddp, epoch, k = run.config, run.ddp, run.epoch, run.config["accumulate"]
    run.sampler.set_epoch(epoch)
    order = torch.tensor(list(run.sampler), dtype=torch.long)
    batches = order[: steps * config["batch_size"]].view(steps, config["batch_size"])
    # The augmentation seed depends on (seed, epoch, rank) only, so a resumed run sees the same data.
    aug_seed = (config["seed"] * 100_003 + epoch) * 1_009 + ddp.rank
    run.net.train()
    loss_sum = wrong = seen = 0.0
    diverged = False
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config['epochs']}", disable=not show, leave=False)
    t0 = time.perf_counter()
    done = 0
    window_loss, window_n = 0.0, 0
    for x, y in run.source.train_batches(batches, aug_seed, config["workers"]):
        lr = learning_rate(config, run.step + done, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        for i, (xm, ym) in enumerate(_micro_batches(x.to(run.device), to_device(y, run.device), k)):
            # Gradients are all-reduced once per step, after the last micro-batch.
            sync = ddp.active and i < k - 1
            with run.net.no_sync() if sync else contextlib.nullcontext():
                loss, logits = training_loss(run.net, xm, ym, config["task"])
                loss = loss / k
                loss.backward()
            value += float(loss.detach())
            if logits is not None and config["task"] == "classification":
                wrong += float((logits.detach().argmax(1) != ym).sum())
                seen += ym.numel()
        value = ddp.mean(value)
        if not math.isfinite(value):
            diverged = True  # the paper's "does not converge" rows: stop, evaluate, record it
            break
        run.optimizer.step()
        done += 1
        loss_sum += value
        window_loss, window_n = window_loss + value, window_n + 1
        bar.update(1)
        if show and (done % 20 == 0 or done == steps):
            rate = done * config["batch_size"] * ddp.world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{window_loss / window_n:.3f}", img_s=f"{rate:.0f}", refresh=False)
            window_loss, window_n = 0.0, 0
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "steps": done,
        "lr": learning_rate(config, run.step + max(done - 1, 0), run.steps_per_epoch),
        "train_loss": loss_sum / done if done else None,
        "train_error": 100.0 * wrong / seen if seen else None,
        "train_time_s": elapsed,
        "images_per_s": done * config["batch_size"] * ddp.world / elapsed if elapsed > 0 else None,
        "diverged": diverged,
    }


#: The measurements of an epoch's line, in order: each shown when its record holds a value for the key.
_EPOCH_PARTS = (
    ("train_loss", "loss {train_loss:.4f}"),
    ("train_error", "train error {train_error:.2f} %"),
    ("test_miou", "test mIoU {test_miou:.2f} %  pixel acc {test_pixel_acc:.2f} %"),
    ("test_miou_folded", "folded mIoU {test_miou_folded:.2f} %"),
    ("test_box_ap", "test box AP {test_box_ap:.2f} %  AP50 {test_box_ap50:.2f} %"),
    ("test_mask_ap", "mask AP {test_mask_ap:.2f} %"),
    ("test_box_ap_folded", "folded box AP {test_box_ap_folded:.2f} %"),
    ("test_error", "test error {test_error:.2f} %"),
    ("test_error_folded", "folded {test_error_folded:.2f} %"),
)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [text.format_map(record) for key, text in _EPOCH_PARTS if record.get(key) is not None]
    if record["diverged"]:
        parts.append("DIVERGED (non-finite loss)")
    rate = record["images_per_s"] or 0.0
    parts.append(f"{record['train_time_s']:.1f} s, {rate:.0f} img/s")
    return "  ".join(parts)
