"""Reproduce the paper's Table 1, ablation (Table 2) and Figure 1(b) on Fashion-MNIST, grid by grid.

``mabn reproduce GRID`` trains every run of a grid one after the other with ``mabn.train.train``
under one protocol (DESIGN.md section 3): the same ResNet (three stages of one basic block, widths
16/32/64), gradient batch 32, SGD with the same schedule and seeds for every row; only the
normalization layer, its normalization batch and weight centralization change. Grids:

* ``table1``: BN(32), BN(2) (ghost BN), BRN(2), MABN(2) with weight centralization, GroupNorm;
* ``ablation``: the rows of the paper's Table 2 (centered/uncentered form x forward batch / EMA-
  renormalized / SMA statistics x backward batch / SMA statistics), each without and with WC;
* ``batch-sweep``: BN and BRN at normalization batch 2-32 and MABN at 1-32 (Figure 1(b));
* ``quick``: BN(32), BN(2) and MABN(2), one seed and fewer epochs: the short demonstration.

Each run lives in ``<out>/<run>/seed<k>/`` (config, metrics, checkpoint, result). A finished run is
skipped and an interrupted one resumed from its checkpoint, so rerunning the command continues an
interrupted grid. After every run the grid's summary is rewritten: ``<results>/<grid>.csv`` (one
row per run), ``<results>/<grid>.md`` (mean ± std over seeds, difference to BN(32)) and, for the
sweep, ``<results>/batch-sweep.png``.

Example::

    mabn reproduce quick --threads 2
    mabn reproduce table1 --seeds 3 --out runs/table1
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from . import train as trainer
from .files import atomic_write

__all__ = ["GRIDS", "PROTOCOL", "GridRun", "grid_runs", "run_grid", "summarize"]

#: The training protocol shared by every row of every grid (``mabn train`` keys).
PROTOCOL: dict[str, Any] = {
    "data": "fashion-mnist",
    "arch": "resnet_small",
    "depth": 1,
    "width": 16,
    "batch_size": 32,
    "epochs": 6,
    "lr": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "weight_decay": 1e-4,
    "nesterov": False,
}
#: Epochs of the ``quick`` grid (each of its three runs takes a few minutes).
QUICK_EPOCHS = 3
#: Default number of seeds per grid.
DEFAULT_SEEDS = {"table1": 3, "ablation": 1, "batch-sweep": 1, "quick": 1}


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One row of a grid: a normalization at a normalization batch, with or without WC.

    Attributes:
        method: the name shown in tables and plots (``"BN"``, ``"MABN"``, ``"uncentered_ema"`` ...).
        norm: the ``mabn.create_norm_layer`` name.
        norm_batch_size: samples per normalization group; None for per-sample norms.
        wc: weight-centralized convolutions (the paper's WC).
        norm_opts: extra keywords of the norm layer.
    """

    method: str
    norm: str
    norm_batch_size: int | None
    wc: bool = False
    norm_opts: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``"MABN(2)+WC"``-style name of the row."""
        size = f"({self.norm_batch_size})" if self.norm_batch_size is not None else ""
        return f"{self.method}{size}" + ("+WC" if self.wc and self.method != "MABN" else "")

    @property
    def slug(self) -> str:
        """Directory name of the row."""
        size = f"-b{self.norm_batch_size}" if self.norm_batch_size is not None else ""
        return f"{self.method.lower()}{size}" + ("-wc" if self.wc else "")

    def config(self, base: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
        """The ``mabn train`` configuration of this row for ``seed``, writing under ``out``."""
        b = self.norm_batch_size
        # BN over the whole gradient batch is exactly torch's BatchNorm2d: use the native layer.
        if self.norm == "bn" and b == base["batch_size"]:
            b = None
        return {
            **base,
            "norm": self.norm,
            "norm_batch_size": b,
            "norm_opts": dict(self.norm_opts),
            "conv": "centralized" if self.wc else "none",
            "seed": seed,
            "out": str(out / self.slug / f"seed{seed}"),
        }


#: Descriptions of the ablation's presets (the paper's Table 2 wording).
ABLATION_ROWS = {
    "bn": "BN: centered, batch statistics in FP and BP",
    "brn": "BRN: centered, batch statistics renormalized to the EMA in FP, batch BP",
    "bn_ema_sma": "centered, EMA-renormalized FP, SMA in BP",
    "uncentered": "uncentered (modified) form, batch statistics in FP and BP",
    "uncentered_ema": "uncentered, EMA-renormalized FP, batch BP",
    "mabn": "MABN: uncentered, SMA renormalized to the EMA in FP, SMA in BP",
}


def _grids() -> dict[str, list[GridRun]]:
    table1 = [
        GridRun("BN", "bn", 32),
        GridRun("BN", "bn", 2),
        GridRun("BRN", "brn", 2),
        GridRun("MABN", "mabn", 2, wc=True),
        # 8 groups in every layer (2, 4, 8 channels per group in the three stages): torch's usual
        # 32 groups would leave one channel per group in the 16- and 32-channel stages.
        GridRun("GN", "gn", None, norm_opts=(("num_groups", 8),)),
    ]
    ablation_pairs = [
        ("bn", 32),
        ("uncentered", 32),
        ("bn", 2),
        ("brn", 2),
        ("bn_ema_sma", 2),
        ("uncentered", 2),
        ("uncentered_ema", 2),
        ("mabn", 2),
    ]
    ablation = [GridRun(n, n, b, wc=wc) for wc in (False, True) for n, b in ablation_pairs]
    sweep = [GridRun("BN", "bn", b) for b in (32, 16, 8, 4, 2)]
    sweep += [GridRun("BRN", "brn", b) for b in (32, 16, 8, 4, 2)]
    sweep += [GridRun("MABN", "mabn", b, wc=True) for b in (32, 16, 8, 4, 2, 1)]
    quick = [GridRun("BN", "bn", 32), GridRun("BN", "bn", 2), GridRun("MABN", "mabn", 2, wc=True)]
    return {"table1": table1, "ablation": ablation, "batch-sweep": sweep, "quick": quick}


#: grid name -> its rows.
GRIDS: dict[str, list[GridRun]] = _grids()


def grid_runs(grid: str) -> list[GridRun]:
    """The rows of a grid; a ValueError names the known grids."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[grid]


def _is_baseline(row: dict[str, Any]) -> bool:
    return row["norm"] == "bn" and str(row["norm_batch_size"]) == "32" and str(row["wc"]) in ("False", "0", "")


# ---- running ------------------------------------------------------------------------------------


def run_grid(
    grid: str,
    seeds: int,
    out: Path,
    results_dir: Path,
    base: dict[str, Any],
    progress: bool | None = None,
    command: str = "",
) -> list[dict[str, Any]]:
    """Train every run of ``grid`` for seeds 0..seeds-1 (skipping finished ones); return the CSV rows.

    The summary files are rewritten after each run, so an interrupted grid leaves a valid partial table.
    """
    runs = grid_runs(grid)
    jobs = [(run, seed) for seed in range(seeds) for run in runs]
    rows: list[dict[str, Any]] = []
    for i, (run, seed) in enumerate(jobs, 1):
        config = run.config(base, seed, out)
        finished = (Path(config["out"]) / trainer.RESULT).is_file()
        print(
            f"[{grid} {i}/{len(jobs)}] {run.label} seed {seed}" + (" (done, skipped)" if finished else ""), flush=True
        )
        t0 = time.perf_counter()
        trainer.run_or_resume(config, progress)
        if not finished:
            print(f"[{grid} {i}/{len(jobs)}] finished in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = collect(grid, seeds, out)
        write_summary(grid, rows, results_dir, base, command)
    return rows


def collect(grid: str, seeds: int, out: Path) -> list[dict[str, Any]]:
    """CSV rows of the finished runs of ``grid`` in ``out`` (seeds 0..seeds-1)."""
    rows = []
    for seed in range(seeds):
        for run in grid_runs(grid):
            path = out / run.slug / f"seed{seed}" / trainer.RESULT
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            rows.append(
                {
                    "grid": grid,
                    "method": run.method,
                    "label": run.label,
                    "norm": run.norm,
                    "norm_batch_size": run.norm_batch_size if run.norm_batch_size is not None else "",
                    "wc": run.wc,
                    "seed": seed,
                    "epochs": r["epochs"],
                    "error": _round(r["error"]),
                    "error_folded": _round(r.get("error_folded")),
                    "diverged": bool(r.get("diverged")),
                    "wall_time_s": _round(r.get("wall_time_s"), 1),
                    "train_time_per_epoch_s": _round(r.get("train_time_per_epoch_s"), 1),
                }
            )
    return rows


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- summaries ----------------------------------------------------------------------------------

CSV_COLUMNS = [
    "grid",
    "method",
    "label",
    "norm",
    "norm_batch_size",
    "wc",
    "seed",
    "epochs",
    "error",
    "error_folded",
    "diverged",
    "wall_time_s",
    "train_time_per_epoch_s",
]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the runs by row (label and WC): seeds, mean and sample std of the errors, difference to BN(32).

    Returns one dict per row in first-seen order with ``n``, ``mean``, ``std`` (None for one seed),
    ``folded`` (mean folded error or None), ``delta`` (mean minus the BN(32) mean, None without a
    baseline), ``diverged`` (runs that diverged) and ``time`` (mean wall time per run).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["wc"], row["norm"]), []).append(row)
    base = [r["error"] for r in rows if _is_baseline(r)]
    base_mean = statistics.fmean(base) if base else None
    summary = []
    for (label, wc, norm), members in groups.items():
        errors = [m["error"] for m in members]
        folded = [m["error_folded"] for m in members if m["error_folded"] is not None]
        times = [m["wall_time_s"] for m in members if m["wall_time_s"] is not None]
        epoch_times = [m["train_time_per_epoch_s"] for m in members if m["train_time_per_epoch_s"] is not None]
        mean = statistics.fmean(errors)
        summary.append(
            {
                "label": label,
                "method": members[0]["method"],
                "norm": norm,
                "norm_batch_size": members[0]["norm_batch_size"],
                "wc": wc,
                "n": len(errors),
                "mean": mean,
                "std": statistics.stdev(errors) if len(errors) > 1 else None,
                "folded": statistics.fmean(folded) if folded else None,
                "delta": mean - base_mean if base_mean is not None else None,
                "diverged": sum(bool(m["diverged"]) for m in members),
                "time": statistics.fmean(times) if times else None,
                "epoch_time": statistics.fmean(epoch_times) if epoch_times else None,
            }
        )
    return summary


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(grid: str, rows: list[dict[str, Any]], base: dict[str, Any], command: str = "") -> str:
    """The ``<grid>.md`` report: protocol, table of mean ± std per row, and the paper's targets for table1."""
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# {grid}: top-1 test error on {base['data']}", ""]
    if command:
        lines += ["Produced by:", "", f"    {command}", ""]
    lines += [
        f"Protocol: {base['arch']} (depth {base.get('depth')}, width {base.get('width')}), gradient batch "
        f"{base['batch_size']}, {rows[0]['epochs'] if rows else base['epochs']} epochs, SGD momentum 0.9, lr "
        f"{base['lr']} ({base['schedule']}, {base['warmup_epochs']} warm-up epochs), weight decay "
        f"{base['weight_decay']}; seeds {', '.join(map(str, seeds)) or '–'}. Error in percent on the "
        f"{'10,000 ' if base['data'] == 'fashion-mnist' and not base.get('limit_test') else ''}test images; "
        "mean ± sample standard deviation over seeds; Δ = difference of the means to BN(32); "
        "folded = the same model after `mabn.fold` (conv + norm merged).",
        "",
    ]
    header = "| method | norm batch | WC | seeds | error % | folded error % | Δ vs BN(32) | s / epoch | s / run |"
    if grid == "ablation":
        header = header.replace("| method |", "| row | method |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for s in summary:
        error = _fmt(s["mean"]) + (f" ± {_fmt(s['std'])}" if s["std"] is not None else "")
        if s["diverged"]:
            error += f" (diverged in {s['diverged']}/{s['n']})"
        cells = [
            s["label"].split("(")[0].removesuffix("+WC"),
            str(s["norm_batch_size"]) if s["norm_batch_size"] != "" else "per sample",
            "yes" if s["wc"] else "no",
            str(s["n"]),
            error,
            _fmt(s["folded"]),
            _fmt(s["delta"], sign=True),
            _fmt(s["epoch_time"], 0),
            _fmt(s["time"], 0),
        ]
        if grid == "ablation":
            cells.insert(0, ABLATION_ROWS.get(s["norm"], s["norm"]))
        lines.append("| " + " | ".join(cells) + " |")
    if grid in ("table1", "quick"):
        lines += ["", *_targets(summary)]
    return "\n".join(lines) + "\n"


def _targets(summary: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for Table 1, checked on the current numbers."""
    by = {s["label"]: s for s in summary}
    bn32, bn2, brn2, mabn2 = (by.get(k) for k in ("BN(32)", "BN(2)", "BRN(2)", "MABN(2)"))
    if not (bn32 and bn2 and mabn2):
        return ["Targets: not all of BN(32), BN(2), MABN(2) have finished yet."]
    spreads = [s["std"] for s in (bn32, bn2, brn2, mabn2) if s and s["std"] is not None]
    out = ["Targets (the paper's claims, checked on these numbers):", ""]
    gap = bn2["mean"] - bn32["mean"]
    if spreads:
        spread = max(spreads)
        verdict = "met" if gap > 2 * spread else "missed"
        out.append(
            f"- BN(2) − BN(32) = {gap:+.2f} points, more than twice the largest seed spread ({spread:.2f}): {verdict}"
        )
    else:
        out.append(f"- BN(2) − BN(32) = {gap:+.2f} points (one seed: no spread to compare with)")
    d = mabn2["mean"] - bn32["mean"]
    out.append(f"- MABN(2) − BN(32) = {d:+.2f} points, target ≤ +0.30: {'met' if d <= 0.3 else 'missed'}")
    if brn2:
        between = min(bn32["mean"], bn2["mean"]) <= brn2["mean"] <= max(bn32["mean"], bn2["mean"])
        out.append(f"- BRN(2) = {brn2['mean']:.2f}, between BN(32) and BN(2): {'met' if between else 'missed'}")
    return out


def write_summary(
    grid: str, rows: list[dict[str, Any]], results_dir: Path, base: dict[str, Any], command: str = ""
) -> list[Path]:
    """Write ``<grid>.csv``, ``<grid>.md`` and for the sweep ``<grid>.png`` into ``results_dir``."""
    if not rows:
        return []
    results_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    paths = [results_dir / f"{grid}.csv", results_dir / f"{grid}.md"]
    atomic_write(paths[0], lambda f: f.write(buffer.getvalue().encode()))
    atomic_write(paths[1], lambda f: f.write(markdown(grid, rows, base, command).encode()))
    if grid == "batch-sweep":
        paths.append(plot_sweep(rows, results_dir / f"{grid}.png", base))
    return paths


def plot_sweep(rows: list[dict[str, Any]], path: Path, base: dict[str, Any]) -> Path:
    """Error vs normalization batch size, one line per method (the paper's Figure 1(b))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    styles = {"BN": ("tab:blue", "o"), "BRN": ("tab:orange", "s"), "MABN": ("tab:green", "^")}
    for method, (color, marker) in styles.items():
        points = sorted(
            ((int(s["norm_batch_size"]), s["mean"], s["std"] or 0.0) for s in summary if s["method"] == method),
            reverse=True,
        )
        if not points:
            continue
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ticks = [1, 2, 4, 8, 16, 32]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(48, 0.7)  # large batches on the left, as in the paper's figure
    ax.set_xlabel("normalization batch size (gradient batch 32)")
    ax.set_ylabel("top-1 test error (%)")
    ax.set_title(f"{base['data']}: error vs normalization batch size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``mabn reproduce`` to ``parser``."""
    parser.add_argument("grid", help=f"one of {', '.join(GRIDS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: 3 for table1, else 1)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default: {PROTOCOL['epochs']}, quick: {QUICK_EPOCHS})",
    )
    parser.add_argument("--out", default=None, help="directory of the runs (default: runs/<grid>)")
    parser.add_argument(
        "--results-dir", default=None, help="where <grid>.csv/.md/.png go (default: results; quick: the --out dir)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--list", action="store_true", help="list the runs of the grid and exit")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: on a tty)"
    )
    g = parser.add_argument_group("deviations from the protocol (for tests and other data)")
    g.add_argument("--data", default=PROTOCOL["data"], help="data source (default: %(default)s)")
    g.add_argument("--data-dir", default=None, help="data directory")
    g.add_argument("--limit-train", type=int, default=None, help="use only this many training samples")
    g.add_argument("--limit-test", type=int, default=None, help="use only this many test samples")
    g.add_argument("--width", type=int, default=PROTOCOL["width"], help="resnet_small width (default: 16)")
    g.add_argument("--depth", type=int, default=PROTOCOL["depth"], help="resnet_small blocks per stage (default: 1)")


def _command(args: argparse.Namespace, seeds: int, epochs: int, out: Path) -> str:
    """The command line that reruns this grid (written into the report)."""
    parts = ["mabn", "reproduce", args.grid, "--seeds", str(seeds), "--epochs", str(epochs), "--out", str(out)]
    if args.results_dir:
        parts += ["--results-dir", args.results_dir]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    for key in ("data", "data_dir", "limit_train", "limit_test", "width", "depth"):
        value = getattr(args, key)
        default = PROTOCOL.get(key)
        if value is not None and value != default:
            parts += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mabn reproduce``."""
    runs = grid_runs(args.grid)
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.grid]
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.grid == "quick" else PROTOCOL["epochs"])
    out = Path(args.out) if args.out else Path("runs") / args.grid
    if args.results_dir:
        results_dir = Path(args.results_dir)
    else:
        results_dir = out if args.grid == "quick" else Path("results")
    base = {
        **trainer.DEFAULTS,
        **PROTOCOL,
        "epochs": epochs,
        "data": args.data,
        "data_dir": args.data_dir,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "width": args.width,
        "depth": args.depth,
        "threads": args.threads,
    }
    # Validate every run's configuration before the first one starts.
    for run_ in runs:
        trainer.check_config(run_.config(base, 0, out))
    if args.list:
        for seed in range(seeds):
            for run_ in runs:
                print(f"{run_.label:24s} seed {seed}  ->  {run_.config(base, seed, out)['out']}")
        return 0
    command = _command(args, seeds, epochs, out)
    t0 = time.perf_counter()
    rows = run_grid(args.grid, seeds, out, results_dir, base, args.progress, command)
    print()
    print(markdown(args.grid, rows, base, command))
    exts = ("csv", "md", "png") if args.grid == "batch-sweep" else ("csv", "md")
    files = ", ".join(str(results_dir / f"{args.grid}.{ext}") for ext in exts)
    print(f"{len(rows)} runs, {time.perf_counter() - t0:.0f} s; summary in {files}")
    return 0
