"""Plot batch statistics at small vs regular batch for BN, the uncentered form and MABN (the paper's Figures 2-4).

``mabn stats`` trains a small ResNet on Fashion-MNIST once per normalization method through
:func:`mabn.train.train` (what ``mabn train --monitor-every N`` runs: a
:class:`mabn.BatchStatsMonitor` attached, its log written into the run directory), or reads a saved
log with ``--log`` (for instance ``OUT/batch_stats.csv.gz`` of any ``mabn train`` run). It then
draws, for one normalization layer, the per-step norm over channels of each statistic (mu, sigma^2
or chi^2, g, Psi) computed over one normalization group ("small", B samples) and over the whole
gradient batch ("regular"), plus the moving average the layer holds (MABN). It prints, for each
statistic, the mean relative deviation ``||s - s_regular|| / ||s_regular||`` of the small-batch
value and of the moving average.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..monitor import log_format, read_stats_log, write_stats_csv, write_stats_jsonl
from .files import pyplot, save_figure

__all__ = [
    "RUNS",
    "add_arguments",
    "run",
    "run_config",
    "train_command",
    "summarize",
    "format_table",
    "plot_run",
    "plot_deviation",
]

#: run name -> the training options of the run and what the plots call it.
RUNS: dict[str, dict[str, Any]] = {
    "bn": {"norm": "bn", "conv": None, "title": "BN (ghost BN)"},
    "uncentered": {"norm": "uncentered", "conv": None, "title": "uncentered form, batch statistics"},
    "mabn": {"norm": "mabn", "conv": "centralized", "title": "MABN (+ weight centralization)"},
}

#: Statistics each form uses; the others are recorded but play no role in that form.
USED = {"centered": ("mu", "sigma2", "g", "psi"), "uncentered": ("chi2", "psi")}
_PANELS = {"centered": ("mu", "sigma2", "g", "psi"), "uncentered": ("mu", "chi2", "g", "psi")}
_LABELS = {
    "mu": "mu (mean)",
    "sigma2": "sigma^2 (variance)",
    "chi2": "chi^2 = E[x^2]",
    "g": "g = E[dL/dz]",
    "psi": "Psi = E[z dL/dz]",
}
_ORDER = ("mu", "sigma2", "chi2", "g", "psi")
_PREFERRED_LAYER = "layer1.0.bn1"  # the layer of the paper's figures (ResNet naming)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mabn stats``."""
    parser.add_argument(
        "--log",
        default=None,
        metavar="FILE",
        help="plot a saved log (.csv or .jsonl, optionally .gz) instead of training",
    )
    parser.add_argument(
        "--runs",
        default="bn,uncentered,mabn",
        help="comma-separated runs to train: bn, uncentered, mabn (default: all three)",
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps per run (default: 500)")
    parser.add_argument("--batch-size", type=int, default=32, help="gradient (regular) batch size (default: 32)")
    parser.add_argument("--norm-batch-size", type=int, default=2, help="normalization (small) batch size (default: 2)")
    parser.add_argument(
        "--lr", type=float, default=0.05, help="constant SGD learning rate, momentum 0.9 (default: 0.05)"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first ResNet stage (default: 16)")
    parser.add_argument("--depth", type=int, default=1, help="basic blocks per ResNet stage (default: 1)")
    parser.add_argument(
        "--layer", default=None, help=f"layer to plot (default: {_PREFERRED_LAYER} if present, else the first)"
    )
    parser.add_argument(
        "--all-layers", action="store_true", help="monitor every normalization layer, not only the plotted one"
    )
    parser.add_argument("--every", type=int, default=1, help="record every N-th step (default: 1)")
    parser.add_argument(
        "--table-from",
        type=int,
        default=100,
        help="average the table over steps >= this (default: 100, MABN's warm-up)",
    )
    parser.add_argument("--out", default="results", help="output directory for the PNGs and the log (default: results)")
    parser.add_argument("--prefix", default="statistics", help="file name prefix (default: statistics)")
    parser.add_argument(
        "--save-log",
        default=None,
        metavar="FILE",
        help="where to save the combined log when training (default: OUT/PREFIX_log.csv; .jsonl and .gz also work)",
    )
    parser.add_argument(
        "--runs-dir",
        default="runs/stats",
        help="training runs go to RUNS_DIR/<run>; a finished run with the same settings is reused, one "
        "with other settings is an error (default: runs/stats)",
    )
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (idx files)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialization and the data order (default: 0)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: on a tty)"
    )


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _default_layer(names: Sequence[str]) -> str:
    return _PREFERRED_LAYER if _PREFERRED_LAYER in names else names[0]


#: Training images of Fashion-MNIST, to turn --steps into the epochs of the run.
_FASHION_MNIST_TRAIN = 60_000


def run_config(run_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`mabn.train.train` configuration of one run of ``mabn stats``.

    Fashion-MNIST with the training CLI's augmentation, ``resnet_small``, SGD at a constant rate,
    ``--steps`` steps, the monitor on ``--layer`` (or every normalization layer) every ``--every`` steps.
    """
    spec = RUNS[run_name]
    steps_per_epoch = _FASHION_MNIST_TRAIN // args.batch_size
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    return {
        "data": "fashion-mnist",
        "data_dir": args.data_dir,
        "arch": "resnet_small",
        "depth": args.depth,
        "width": args.width,
        "norm": spec["norm"],
        "conv": spec["conv"],
        "batch_size": args.batch_size,
        "norm_batch_size": args.norm_batch_size,
        "epochs": epochs,
        "max_steps": args.steps,
        "lr": args.lr,
        "schedule": "constant",
        "warmup_epochs": 0.0,
        "seed": args.seed,
        "eval_every": epochs,
        "threads": args.threads,
        "out": str(Path(args.runs_dir) / run_name),
        "monitor_every": args.every,
        "monitor_layers": None if args.all_layers else [args.layer or _PREFERRED_LAYER],
    }


def train_command(config: dict[str, Any]) -> str:
    """The ``mabn train`` command line that trains ``config`` (options at their defaults left out)."""
    from .train import check_config

    # The defaults as resolved for this data (the task, its architecture and input size follow the data).
    defaults = check_config({"data": config.get("data", "fashion-mnist")})
    flags = {"monitor_layers": lambda v: ",".join(v), "warmup_epochs": lambda v: f"{v:g}"}
    parts = ["mabn", "train"]
    for key, value in config.items():
        if value is None or value == defaults.get(key) or key in ("threads", "task"):
            continue
        option = f"--{key.replace('_', '-')}"
        parts += [option] if value is True else [option, flags.get(key, str)(value)]
    return shlex.join(parts)


def _train_runs(args: argparse.Namespace, runs: list[str]) -> list[dict[str, Any]]:
    from .train import STATS_LOG, run_or_resume

    records: list[dict[str, Any]] = []
    for run_name in runs:
        config = run_config(run_name, args)
        print(f"[{run_name}] {RUNS[run_name]['title']}: {args.steps} steps; {train_command(config)}", flush=True)
        run_or_resume(config, progress=args.progress, out_option="--runs-dir")
        run_records = read_stats_log(Path(config["out"]) / STATS_LOG)
        records += [{"run": run_name, **r} for r in run_records]
    return records


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(records: Sequence[dict[str, Any]], layer: str, table_from: int = 0) -> list[dict[str, Any]]:
    """Mean relative deviations per run and statistic for one layer.

    Args:
        records: monitor records (with ``run``; records without it count as run ``"run"``).
        layer: the layer to summarize.
        table_from: only steps >= this count.

    Returns:
        One dict a (run, statistic): ``run``, ``stat``, ``form``, ``used`` (the form uses it),
        ``steps`` (recorded steps averaged over), ``small_reldev`` (mean over steps of the mean over
        groups of ``||small - regular|| / ||regular||``), ``sma_reldev`` (the same for the moving
        average, over the steps where the layer used it; NaN without a moving average),
        ``sma_steps``, ``small_norm``, ``regular_norm`` (mean norms).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("layer") == layer and r.get("step", 0) >= table_from:
            groups.setdefault((r.get("run") or "run", r["stat"]), []).append(r)
    runs = list(dict.fromkeys(key[0] for key in groups))
    out = []
    for run_name in runs:
        for stat in _ORDER:
            rows = groups.get((run_name, stat))
            if not rows:
                continue
            form = rows[0]["form"]
            sma_rows = [r for r in rows if r.get("sma_reldev") is not None and r.get("sma_used")]
            out.append(
                {
                    "run": run_name,
                    "stat": stat,
                    "form": form,
                    "used": stat in USED.get(form, ()),
                    "steps": len(rows),
                    "small_reldev": _mean([r["small_reldev"] for r in rows]),
                    "sma_reldev": _mean([r["sma_reldev"] for r in sma_rows]) if sma_rows else math.nan,
                    "sma_steps": len(sma_rows),
                    "small_norm": _mean([r["small_norm"] for r in rows]),
                    "regular_norm": _mean([r["regular_norm"] for r in rows]),
                }
            )
    return out


def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.3e}"


def format_table(summary: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The summary of :func:`summarize` as a text (or Markdown) table."""
    header = ["run", "statistic", "used by form", "steps", "small vs regular", "moving avg vs regular", "MA steps"]
    rows = [
        [s["run"], s["stat"], "yes" if s["used"] else "no", str(s["steps"]), _fmt(s["small_reldev"]),
         _fmt(s["sma_reldev"]), str(s["sma_steps"]) if s["sma_steps"] else "-"]
        for s in summary
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _series(records: Sequence[dict[str, Any]], run_name: str, layer: str, stat: str) -> list[dict[str, Any]]:
    rows = [r for r in records if (r.get("run") or "run") == run_name and r.get("layer") == layer and r["stat"] == stat]
    return sorted(rows, key=lambda r: r["step"])


def plot_run(records: Sequence[dict[str, Any]], run_name: str, layer: str, path: str | os.PathLike) -> None:
    """One figure in the style of the paper's Figures 2-4: four panels of per-step norms.

    Each panel shows the L2 norm over channels of one statistic: the probed normalization group of
    the step (small batch; the record's ``group``), the whole batch (regular) and, where the layer
    has a window, its moving average at the probed group (a dotted line marks the step from which
    the layer uses it).
    """
    plt = pyplot()
    from matplotlib.lines import Line2D

    first = next((r for r in records if (r.get("run") or "run") == run_name and r.get("layer") == layer), None)
    if first is None:
        raise ValueError(f"the log has no records of run {run_name!r} for layer {layer!r}")
    form = first["form"]
    title = RUNS.get(run_name, {}).get("title", run_name)
    b, n = first["group_size"], first["group_size"] * first["groups"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    handles = {
        "small": Line2D([], [], color="tab:blue", lw=1, label=f"small batch ({b} samples, one group)"),
        "regular": Line2D([], [], color="tab:orange", lw=1.5, label=f"regular batch ({n} samples)"),
    }
    for ax, stat in zip(axes.flat, _PANELS.get(form, _PANELS["centered"])):
        rows = _series(records, run_name, layer, stat)
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["small_norm"] for r in rows], color="tab:blue", lw=0.6, alpha=0.8)
        ax.plot(steps, [r["regular_norm"] for r in rows], color="tab:orange", lw=1.2)
        values = [r["small_norm"] for r in rows] + [r["regular_norm"] for r in rows]
        sma = [(r["step"], r["sma_norm"], r.get("sma_used")) for r in rows if r.get("sma_norm") is not None]
        if sma:
            ax.plot([s for s, _, _ in sma], [v for _, v, _ in sma], color="tab:green", lw=1.0)
            values += [v for _, v, _ in sma]
            handles["sma"] = Line2D([], [], color="tab:green", lw=1.5, label="moving average (same group)")
            start = next((s for s, _, used in sma if used), None)
            if start is not None:
                ax.axvline(start, color="gray", ls=":", lw=1)
                handles["start"] = Line2D(
                    [], [], color="gray", ls=":", lw=1, label="layer uses the moving average from here"
                )
        note = "" if stat in USED.get(form, ()) else "  (not used by this form)"
        ax.set_title(_LABELS[stat] + note, fontsize=10)
        ax.set_ylabel("norm over channels")
        finite = sorted(v for v in values if v is not None and math.isfinite(v))
        if finite:
            # Clip the axis at a high quantile so that a few spikes do not flatten every line.
            top = finite[min(len(finite) - 1, int(0.995 * len(finite)))]
            ax.set_ylim(0, top * 1.1 if top > 0 else 1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    fig.suptitle(f"{title}: {layer}, normalization batch {b}, gradient batch {n}", fontsize=12)
    ncol = len(handles) if len(handles) <= 3 else 2
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if ncol == len(handles) else 0.07, 1, 1))
    save_figure(fig, path, dpi=110)


def plot_deviation(summary: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Bar chart of the table: mean relative deviation from the regular batch, per run and statistic."""
    plt = pyplot()
    rows = [s for s in summary if s["used"]]
    if not rows:
        raise ValueError("nothing to plot: no statistic used by its form in the summary")
    labels = [f"{s['run']}\n{s['stat']}" for s in rows]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.bar([x - 0.2 for x in xs], [s["small_reldev"] for s in rows], width=0.4, color="tab:blue", label="small batch")
    sma = [(x, s["sma_reldev"]) for x, s in zip(xs, rows) if math.isfinite(s["sma_reldev"])]
    if sma:
        ax.bar([x + 0.2 for x, _ in sma], [v for _, v in sma], width=0.4, color="tab:green", label="moving average")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("mean ||s - s_regular|| / ||s_regular||")
    ax.set_title("Deviation from the regular-batch statistic (statistics each form uses)", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    if not runs:
        raise ValueError("--runs is empty")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(map(repr, unknown))} in --runs; known: {', '.join(RUNS)}")
    return list(dict.fromkeys(runs))


def run(args: argparse.Namespace) -> int:
    """Train (or read the log), print the table, draw the plots."""
    _positive("--every", args.every)
    out = Path(args.out)
    if args.log is not None:
        records = read_stats_log(args.log)
        if not records:
            raise ValueError(f"the log {args.log!r} holds no records")
        layer_names = list(dict.fromkeys(r["layer"] for r in records))
        layer = args.layer if args.layer is not None else _default_layer(layer_names)
        if layer not in layer_names:
            raise ValueError(f"the log has no layer {layer!r}; layers: {', '.join(layer_names)}")
        print(f"read {len(records)} records from {args.log}")
    else:
        for name in ("--steps", "--batch-size", "--norm-batch-size", "--width", "--depth"):
            _positive(name, getattr(args, name[2:].replace("-", "_")))
        if args.batch_size % args.norm_batch_size:
            raise ValueError(f"--norm-batch-size {args.norm_batch_size} does not divide --batch-size {args.batch_size}")
        runs = _parse_runs(args.runs)
        log_path = Path(args.save_log) if args.save_log else out / f"{args.prefix}_log.csv"
        log_format(log_path)  # a bad name fails now, not after the training
        records = _train_runs(args, runs)
        layer = args.layer or _default_layer(list(dict.fromkeys(r["layer"] for r in records)))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        (write_stats_csv if log_format(log_path) == "csv" else write_stats_jsonl)(records, log_path)
        print(f"saved {len(records)} records to {log_path}")

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, layer, args.table_from)
    if not summary:
        raise ValueError(f"no records of layer {layer!r} at steps >= {args.table_from} (--table-from)")
    print(f"\nmean relative deviation from the regular-batch statistic, layer {layer}, steps >= {args.table_from}:")
    print(format_table(summary))
    print()
    for run_name in dict.fromkeys((r.get("run") or "run") for r in records):
        path = out / f"{args.prefix}_{run_name}.png"
        plot_run(records, run_name, layer, path)
        print(f"wrote {path}")
    path = out / f"{args.prefix}_deviation.png"
    plot_deviation(summary, path)
    print(f"wrote {path}")
    return 0
