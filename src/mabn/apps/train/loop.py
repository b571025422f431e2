"""Train a ResNet with any normalization layer on Fashion-MNIST, an ImageFolder tree or synthetic data.

``mabn train`` (or ``python -m mabn train``; under ``torchrun`` it trains with
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
    torchrun --nproc_per_node=2 -m mabn train --data synthetic --epochs 1 --out runs/ddp
"""

from __future__ import annotations

import contextlib
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

from ...checkpoint_io import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint
from ..data import DataSource, make_source
from ..files import atomic_save, atomic_write, buffer_digest, param_digest, write_json
from .config import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESULT,
    STATS_LOG,
    build_model,
    check_config,
    config_differences,
    model_config,
)
from .distributed import Distributed, select_device

__all__ = ["train", "run_or_resume", "learning_rate", "evaluate", "evaluate_folded"]


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
        from ...fold import fold
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
    ddp = Distributed()
    device = select_device(config["device"], ddp.local_rank)

    # Everything that can fail on user input is checked before a single file is written.
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint {ckpt_path} to resume from")
        ckpt = load_checkpoint(ckpt_path, training=True)
        if ckpt.get("world_size", 1) != ddp.world:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size', 1)} processes, not {ddp.world}")
        diffs = config_differences(ckpt["config"], config)
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
            write_json(out / CONFIG, {"train": config, "model_config": mc, "world_size": ddp.world})
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
            write_json(out / RESULT, result)
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
    ddp: Distributed,
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
