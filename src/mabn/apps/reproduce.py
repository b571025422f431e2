"""Reproduce the paper's experiments on Fashion-MNIST: classification, segmentation, detection and fine-tuning grids.

``mabn reproduce GRID`` trains every run of a grid with ``mabn.train.train`` under one protocol
(:mod:`mabn.apps.grids`): the classification grids use the same ResNet (three stages of one basic
block, widths 16/32/64), gradient batch 32 and SGD schedule (docs/design.md, section 12) for every row;
only the normalization layer, its normalization batch and weight centralization change. Grids:

* ``table1``: BN(32), BN(2) (ghost BN), BRN(2), MABN(2) with weight centralization, GroupNorm;
* ``ablation``: the rows of the paper's Table 2 (centered/uncentered form x forward batch / EMA-
  renormalized / SMA statistics x backward batch / SMA statistics), each without and with WC;
* ``batch-sweep``: BN and BRN at normalization batch 2-32 and MABN at 1-32 (Figure 1(b));
* ``quick``: BN(32), BN(2) and MABN(2), one seed and fewer epochs: the short demonstration;
* ``segmentation``: FPN segmentation at gradient batch 16 = 8 simulated devices x 2 images: BN over
  the whole batch, per-device BN(2), BRN(2), GroupNorm, MABN(2)+WC, and the whole-batch row run for
  real as synced BN on 2 torchrun processes;
* ``finetune``: a BN(32) classifier pre-trained once, its encoder fine-tuned for segmentation at 2
  images per device with BN(2), BN(2) + recalibration, frozen BN, MABN(2) with each seeding (and
  WC), against GroupNorm from scratch and the whole-batch BN ceiling;
* ``detection``: torchvision's FCOS on the same scenes and the segmentation grid's rows, every
  norm of backbone, pyramid and heads swapped together; COCO box AP.

The dense grids carry weight-centralization controls (BN(16)+WC, BN(2)+WC) beside MABN(2)+WC.

Each run lives in ``<out>/<run>/seed<k>/`` (config, metrics, checkpoint, result). A finished run is
skipped and an interrupted one resumed from its checkpoint, so rerunning the command continues an
interrupted grid. After every run the grid's summary is rewritten: ``<results>/<grid>.csv`` (one
row per run), ``<results>/<grid>.md`` (mean ± std over seeds, difference to the baseline row) and,
for the sweep and the dense grids, ``<results>/<grid>.png``. ``--jobs 2`` trains two runs side by side.
Runs recorded in an existing ``<results>/<grid>.csv`` but absent from ``--out`` stay in the summary,
so ``--rows`` can add a row to a finished grid; ``--report-only`` rebuilds the summary and figures
from what is there, training nothing.

Example::

    mabn reproduce quick --threads 2
    mabn reproduce table1 --seeds 3 --out runs/table1
    mabn reproduce segmentation --jobs 2 --threads 1
    mabn reproduce segmentation --rows "BN(2)+WC" --jobs 2 --threads 1
    mabn reproduce detection --jobs 2 --threads 1
    mabn reproduce detection --report-only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import train as trainer
from .grids import GRID_SPECS, GRIDS, PROTOCOL, GridRun, grid_runs
from .report import markdown, plot_predictions, summarize, write_summary

__all__ = ["GRIDS", "GRID_SPECS", "PROTOCOL", "GridRun", "grid_runs", "run_grid", "summarize", "markdown"]


# ---- running ------------------------------------------------------------------------------------


def _train_one(config: dict[str, Any], progress: bool | None, title: str) -> float:
    """Train (or skip) one run; return the seconds it took here."""
    print(title, flush=True)
    t0 = time.perf_counter()
    trainer.run_or_resume(config, progress)
    return time.perf_counter() - t0


def _launch(config: dict[str, Any], processes: int) -> None:
    """Train (or resume) ``config`` under torchrun with ``processes`` processes on this machine."""
    out = Path(config["out"])
    if (out / trainer.RESULT).is_file():
        trainer.run_or_resume(config)  # checks that the finished run has this configuration
        return
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out.parent, delete=False) as f:
        json.dump(config, f)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd += ["-m", "mabn", "train", "--config", f.name, "--no-progress"]
        if (out / trainer.CHECKPOINT).is_file():
            cmd.append("--resume")
        done = subprocess.run(cmd, check=False)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {done.returncode}")


def _pretrain(grid: str, pretrain: dict[str, Any] | None, progress: bool | None) -> None:
    """The run the grid's ``pretrained`` rows start from (``<out>/pretrain``), trained once."""
    if pretrain is None:
        return
    what = f"{pretrain['arch']} with {pretrain['norm']} on {pretrain['data']}"
    print(f"[{grid}] pre-training the encoder: {what}, out {pretrain['out']}", flush=True)
    trainer.run_or_resume(pretrain, progress)


def run_grid(
    grid: str,
    seeds: int,
    out: Path,
    results_dir: Path,
    base: dict[str, Any],
    progress: bool | None = None,
    command: str = "",
    jobs: int = 1,
    pretrain: dict[str, Any] | None = None,
    rows_to_train: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train every run of ``grid`` for seeds 0..seeds-1 (skipping finished ones); return the CSV rows.

    ``jobs`` single-process runs train side by side (each in its own process); multi-process rows
    run afterwards, one at a time. The summary files are rewritten after each run, so an interrupted
    grid leaves a valid partial table. ``pretrain`` is the configuration of the run the
    ``pretrained`` rows start from, trained first (see :func:`pretrain_config`). ``rows_to_train``
    (labels) restricts the training to those rows; the summary keeps every row's results.
    """
    _pretrain(grid, pretrain, progress)
    chosen = [r for r in grid_runs(grid) if rows_to_train is None or r.label in rows_to_train]
    todo = [(run, seed) for seed in range(seeds) for run in chosen]
    total = len(todo)
    rows: list[dict[str, Any]] = []

    def title(i: int, run: GridRun, seed: int) -> tuple[str, bool]:
        finished = (out / run.slug / f"seed{seed}" / trainer.RESULT).is_file()
        note = " (done, skipped)" if finished else ""
        return f"[{grid} {i}/{total}] {run.label} seed {seed}{note}", finished

    def finished(i: int, seconds: float, was_done: bool) -> None:
        nonlocal rows
        if not was_done:
            print(f"[{grid} {i}/{total}] finished in {seconds:.0f} s", flush=True)
        rows = collect(grid, seeds, out, results_dir)
        write_summary(grid, rows, results_dir, base, command)

    single = [(i, r, s) for i, (r, s) in enumerate(todo, 1) if r.processes == 1]
    multi = [(i, r, s) for i, (r, s) in enumerate(todo, 1) if r.processes > 1]
    if jobs > 1 and len(single) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {}
            for i, run, seed in single:
                text, was_done = title(i, run, seed)
                future = pool.submit(_train_one, run.config(base, seed, out), False, text)
                futures[future] = (i, was_done)
            for future in concurrent.futures.as_completed(futures):
                i, was_done = futures[future]
                finished(i, future.result(), was_done)
    else:
        for i, run, seed in single:
            text, was_done = title(i, run, seed)
            finished(i, _train_one(run.config(base, seed, out), progress, text), was_done)
    for i, run, seed in multi:
        (text, was_done), t0 = title(i, run, seed), time.perf_counter()
        print(text, flush=True)
        _launch(run.config(base, seed, out), run.processes)
        finished(i, time.perf_counter() - t0, was_done)
    if not todo:
        rows = collect(grid, seeds, out, results_dir)
        write_summary(grid, rows, results_dir, base, command)
    return rows


def recorded_rows(path: Path, grid: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(label, seed) -> the row of an earlier ``<grid>.csv`` (an absent file gives nothing)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grid") == grid]
    return {(r["label"], int(r["seed"])): {k: _parse_cell(v) for k, v in r.items()} for r in rows}


def _parse_cell(text: str) -> Any:
    """A CSV cell back as a number where it is one (empty cells as None)."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def collect(grid: str, seeds: int, out: Path, results_dir: Path | None = None) -> list[dict[str, Any]]:
    """CSV rows of the finished runs of ``grid`` in ``out`` (seeds 0..seeds-1), in grid order.

    With ``results_dir``, a run not in ``out`` but recorded in ``<results_dir>/<grid>.csv`` (an
    earlier invocation, perhaps elsewhere) keeps its recorded row.
    """
    recorded = recorded_rows(results_dir / f"{grid}.csv", grid) if results_dir is not None else {}
    rows = []
    for seed in range(seeds):
        for run in grid_runs(grid):
            path = out / run.slug / f"seed{seed}" / trainer.RESULT
            if not path.is_file():
                if (run.label, seed) in recorded:
                    rows.append(recorded[(run.label, seed)])
                continue
            r = json.loads(path.read_text())
            row = {
                "grid": grid,
                "method": run.method,
                "label": run.label,
                "norm": run.norm,
                "norm_batch_size": run.norm_batch_size if run.norm_batch_size is not None else "",
                "wc": run.wc,
                "processes": run.processes,
                "seed": seed,
                "epochs": r["epochs"],
                "diverged": bool(r.get("diverged")),
                "wall_time_s": _round(r.get("wall_time_s"), 1),
                "train_time_per_epoch_s": _round(r.get("train_time_per_epoch_s"), 1),
            }
            for key in ("error", "error_folded", "miou", "miou_folded", "pixel_acc"):
                row[key] = _round(r.get(key))
            for key in ("box_ap", "box_ap_folded", "box_ap50", "box_ap75"):
                row[key] = _round(r.get(key))
            rows.append(row)
    return rows


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- command line -------------------------------------------------------------------------------


_OVERRIDES = ("data", "data_dir", "limit_train", "limit_test", "width", "depth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``mabn reproduce`` to ``parser``."""
    parser.add_argument("grid", help=f"one of {', '.join(GRIDS)}")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default: 3 for table1 and the dense grids, else 1)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the grid's protocol)")
    parser.add_argument("--out", default=None, help="directory of the runs (default: runs/<grid>)")
    parser.add_argument(
        "--results-dir", default=None, help="where <grid>.csv/.md/.png go (default: results; quick: the --out dir)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="single-process runs trained side by side (default: 1)")
    parser.add_argument("--list", action="store_true", help="list the runs of the grid and exit")
    parser.add_argument(
        "--rows",
        default=None,
        metavar="LABELS",
        help='train only these rows (comma-separated labels, e.g. "BN(2)+WC"); the summary keeps the others',
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild <grid>.csv/.md/.png and the predictions figure from the finished runs",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: on a tty)"
    )
    g = parser.add_argument_group("deviations from the protocol (for tests and other data)")
    g.add_argument("--data", default=None, help="data source (default: the grid's)")
    g.add_argument("--data-dir", default=None, help="data directory")
    g.add_argument("--limit-train", type=int, default=None, help="use only this many training samples")
    g.add_argument("--limit-test", type=int, default=None, help="use only this many test samples")
    g.add_argument("--width", type=int, default=None, help="model width (default: the grid's, 16)")
    g.add_argument("--depth", type=int, default=None, help="blocks per stage (default: the grid's, 1)")


def _command(args: argparse.Namespace, seeds: int, epochs: int, out: Path) -> str:
    """The command line that reruns this grid (written into the report)."""
    parts = ["mabn", "reproduce", args.grid, "--seeds", str(seeds), "--epochs", str(epochs), "--out", str(out)]
    if args.results_dir:
        parts += ["--results-dir", args.results_dir]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    if args.rows:
        parts += ["--rows", args.rows]
    for key in _OVERRIDES:
        if getattr(args, key) is not None:
            parts += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return " ".join(shlex.quote(p) for p in parts)


def grid_base(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration shared by the grid's rows: the training defaults, the protocol, the options given."""
    protocol = GRID_SPECS[args.grid].protocol
    base = {**trainer.DEFAULTS, **protocol, "threads": args.threads}
    if args.epochs is not None:
        base["epochs"] = args.epochs
    base.update({key: getattr(args, key) for key in _OVERRIDES if getattr(args, key) is not None})
    return base


def pretrain_config(args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """The pre-training run of a grid that has one (in ``<out>/pretrain``): its protocol and the options given."""
    protocol = GRID_SPECS[args.grid].pretrain
    if protocol is None:
        return None
    config = {**trainer.DEFAULTS, **protocol, "threads": args.threads, "out": str(out / "pretrain")}
    # The same model size as the rows (their encoder), and the same data limits when asked for.
    config.update({key: getattr(args, key) for key in _OVERRIDES if key != "data" and getattr(args, key) is not None})
    return config


#: The configuration keys a report describes the protocol by.
_PROTOCOL_KEYS = ("data", "task", "arch", "depth", "width", "image_size", "limit_train", "limit_test", "batch_size",
                  "epochs", "lr", "schedule", "warmup_epochs", "weight_decay")  # fmt: skip


def protocol_of_runs(grid: str, seeds: int, out: Path, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the protocol the finished runs in ``out`` were trained under (their configuration).

    ``--report-only`` describes the runs that are there, whatever options it is given. The first
    finished single-process run counts (a multi-process row splits the batch).
    """
    for seed in range(seeds):
        for run in grid_runs(grid):
            path = out / run.slug / f"seed{seed}" / trainer.RESULT
            if run.processes == 1 and path.is_file():
                config = json.loads(path.read_text()).get("config", {})
                return {**base, **{k: config[k] for k in _PROTOCOL_KEYS if k in config}}
    return base


def _recorded_command(report: Path, fallback: str) -> str:
    """The command an existing report says produced it (a rebuilt report keeps naming the grid's command)."""
    if report.is_file():
        lines = report.read_text().splitlines()
        for i, line in enumerate(lines[:-2]):
            if line == "Produced by:":
                commands = []
                for text in lines[i + 2 :]:
                    if not text.startswith("    mabn reproduce"):
                        break
                    commands.append(text.strip())
                if commands:
                    return "\n    ".join(commands)
    return fallback


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mabn reproduce``."""
    runs = grid_runs(args.grid)
    seeds = args.seeds if args.seeds is not None else GRID_SPECS[args.grid].seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    out = Path(args.out) if args.out else Path("runs") / args.grid
    if args.results_dir:
        results_dir = Path(args.results_dir)
    else:
        results_dir = out if args.grid == "quick" else Path("results")
    base = grid_base(args)
    # Validate every run's configuration before the first one starts.
    for run_ in runs:
        trainer.check_config(run_.config(base, 0, out))
    chosen = None
    if args.rows:
        chosen = [label.strip() for label in args.rows.split(",") if label.strip()]
        unknown = [label for label in chosen if label not in {r.label for r in runs}]
        if unknown or not chosen:
            raise ValueError(
                f"--rows {args.rows!r}: {', '.join(unknown) or 'no label'} not a row of {args.grid}; "
                f"its rows: {', '.join(r.label for r in runs)}"
            )
    if args.list:
        for seed in range(seeds):
            for run_ in runs:
                print(f"{run_.label:24s} seed {seed}  ->  {run_.config(base, seed, out)['out']}")
        return 0
    command = _command(args, seeds, base["epochs"], out)
    if chosen:
        # The report names how the rest of the grid was made, then the rows added now.
        grid_command = _recorded_command(results_dir / f"{args.grid}.md", "")
        command = f"{grid_command}\n    {command}" if grid_command and grid_command != command else command
    t0 = time.perf_counter()
    if args.report_only:
        rows = collect(args.grid, seeds, out, results_dir)
        if not rows:
            raise ValueError(f"--report-only: no finished run of {args.grid} in {out} nor in {results_dir}")
        base = protocol_of_runs(args.grid, seeds, out, base)
        write_summary(args.grid, rows, results_dir, base, _recorded_command(results_dir / f"{args.grid}.md", command))
    else:
        pretrain = pretrain_config(args, out)
        if pretrain is not None:
            trainer.check_config(pretrain)
        rows = run_grid(args.grid, seeds, out, results_dir, base, args.progress, command, args.jobs, pretrain, chosen)
    if GRID_SPECS[args.grid].figure_rows:
        figure = plot_predictions(args.grid, out, results_dir / f"{args.grid}_predictions.png", base)
        if figure is not None:
            print(f"predictions of seed 0: {figure}")
    print()
    print(markdown(args.grid, rows, base, command))
    exts = (
        ("csv", "md", "png") if args.grid == "batch-sweep" or GRID_SPECS[args.grid].metric != "error" else ("csv", "md")
    )
    files = ", ".join(str(results_dir / f"{args.grid}.{ext}") for ext in exts)
    print(f"{len(rows)} runs, {time.perf_counter() - t0:.0f} s; summary in {files}")
    return 0
