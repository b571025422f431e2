"""Summaries of ``mabn reproduce`` grids: the CSV of runs, the markdown table, the plots."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from .files import atomic_write, pyplot, save_figure
from .grids import ABLATION_ROWS, GRID_SPECS, GridSpec, grid_runs

__all__ = ["CSV_COLUMNS", "markdown", "plot_predictions", "plot_rows", "plot_sweep", "summarize", "write_summary"]

CSV_COLUMNS = [
    "grid",
    "method",
    "label",
    "norm",
    "norm_batch_size",
    "wc",
    "processes",
    "seed",
    "epochs",
    "error",
    "error_folded",
    "miou",
    "miou_folded",
    "pixel_acc",
    "box_ap",
    "box_ap_folded",
    "box_ap50",
    "box_ap75",
    "diverged",
    "wall_time_s",
    "train_time_per_epoch_s",
]

_METRIC_NAMES = {"error": "error %", "miou": "mIoU %", "box_ap": "box AP %", "box_ap50": "AP50 %", "box_ap75": "AP75 %"}
# Where a metric is a point of, in sentences.
_UNITS = {"error": "error", "miou": "mIoU", "box_ap": "box AP"}


def _spec(grid: str) -> GridSpec:
    return GRID_SPECS.get(grid, GridSpec({}))


def summarize(
    rows: list[dict[str, Any]], metric: str = "error", baseline: str = "BN(32)", extra: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Group the runs by row label: seeds, mean and sample std of ``metric``, difference to ``baseline``.

    Returns one dict per row in first-seen order with ``n``, ``mean``, ``std`` (None for one seed),
    ``folded`` (mean of the folded model's metric or None), ``delta`` (mean minus the baseline's
    mean, None without a baseline), ``diverged`` (runs that diverged), ``time`` (mean wall time)
    and ``extra`` (the mean of each metric of ``extra``, None where no run has it).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    base = [float(r[metric]) for r in groups.get(baseline, []) if r.get(metric) not in (None, "")]
    base_mean = statistics.fmean(base) if base else None
    summary = []
    for label, members in groups.items():
        values = [float(m[metric]) for m in members if m.get(metric) not in (None, "")]
        folded = [float(m[f"{metric}_folded"]) for m in members if m.get(f"{metric}_folded") not in (None, "")]
        times = [m["wall_time_s"] for m in members if m.get("wall_time_s") is not None]
        epoch_times = [m["train_time_per_epoch_s"] for m in members if m.get("train_time_per_epoch_s") is not None]
        mean = statistics.fmean(values) if values else math.nan
        summary.append(
            {
                "label": label,
                "method": members[0]["method"],
                "norm": members[0]["norm"],
                "norm_batch_size": members[0]["norm_batch_size"],
                "wc": members[0]["wc"],
                "n": len(values),
                "values": values,
                "mean": mean,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "folded": statistics.fmean(folded) if folded else None,
                "delta": mean - base_mean if base_mean is not None else None,
                "diverged": sum(str(m["diverged"]) in ("True", "1") for m in members),
                "time": statistics.fmean(times) if times else None,
                "epoch_time": statistics.fmean(epoch_times) if epoch_times else None,
                "extra": {key: _mean(members, key) for key in extra},
            }
        )
    return summary


def _mean(members: list[dict[str, Any]], key: str) -> float | None:
    values = [float(m[key]) for m in members if m.get(key) not in (None, "")]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _protocol_line(base: dict[str, Any], rows: list[dict[str, Any]], spec: GridSpec) -> str:
    seeds = sorted({int(r["seed"]) for r in rows})
    epochs = rows[0]["epochs"] if rows else base["epochs"]
    model = f"{base['arch']} (depth {base.get('depth')}, width {base.get('width')})"
    data = base["data"]
    if spec.metric == "box_ap":
        data += f" ({base.get('image_size')} px scenes, {base.get('limit_train') or 'all'} for training)"
        tests = f"{base['limit_test']:,}" if base.get("limit_test") else "1,000"
        measure = (
            f"COCO box AP (IoU 0.50:0.95), AP50 and AP75 in percent on the {tests} test scenes, by pycocotools' "
            "COCOeval (items less than 25 % visible are ignored regions)"
        )
    elif spec.metric == "miou":
        data += f" ({base.get('image_size')} px scenes, {base.get('limit_train') or 'all'} for training)"
        measure = "Mean IoU over the 11 classes (background included) in percent on the test scenes"
    else:
        measure = "Error in percent on the " + (
            "10,000 test images" if base["data"] == "fashion-mnist" and not base.get("limit_test") else "test images"
        )
    return (
        f"Protocol: {model} on {data}, gradient batch {base['batch_size']}, {epochs} epochs, SGD momentum 0.9, "
        f"lr {base['lr']} ({base['schedule']}, {base['warmup_epochs']} warm-up epochs), weight decay "
        f"{base['weight_decay']}; seeds {', '.join(map(str, seeds)) or '–'}. {measure}; mean ± sample standard "
        f"deviation over seeds; Δ = difference of the means to {spec.baseline}; folded = the same model after "
        "`mabn.fold` (conv + norm merged)."
    )


def markdown(grid: str, rows: list[dict[str, Any]], base: dict[str, Any], command: str = "") -> str:
    """The ``<grid>.md`` report: protocol, table of mean ± std per row, and for table1 the paper's targets."""
    spec = _spec(grid)
    summary = summarize(rows, spec.metric, spec.baseline, spec.extra_metrics)
    what = {"error": "top-1 test error", "miou": "test mean IoU", "box_ap": "test COCO box AP"}[spec.metric]
    lines = [f"# {grid}: {what} on {base['data']}", ""]
    if command:
        lines += ["Produced by:", "", f"    {command}", ""]
    lines += [_protocol_line(base, rows, spec), ""]
    if spec.pretrain is not None:
        p = spec.pretrain
        lines += [
            f"Pre-training (once, `<out>/pretrain`): {p['arch']} with {p['norm']} at batch {p['batch_size']} on "
            f"{p['data']} classification, {p['epochs']} epochs, seed {p['seed']}. Every row but the from-scratch "
            "one starts from its weights (the classifier dropped) with the encoder's norms converted as the row "
            "says; the decoder starts fresh.",
            "",
        ]
    name = _METRIC_NAMES[spec.metric]
    header = (
        f"| method | norm batch | WC | seeds | {name} | folded {name} | Δ vs {spec.baseline} | s / epoch | s / run |"
    )
    if grid == "ablation":
        header = header.replace("| method |", "| row | method |")
    elif spec.metric != "error":
        header = header.replace("| method |", "| row |").replace("| norm batch | WC |", "| norm | norm batch | WC |")
        extra = "".join(f" {_METRIC_NAMES[key]} |" for key in spec.extra_metrics)
        header = header.replace(f" folded {name} |", f"{extra} folded {name} |")
        if spec.metric == "box_ap":  # the paper compares with GroupNorm too: a column of its own
            header = header.replace(f"| Δ vs {spec.baseline} |", f"| Δ vs {spec.baseline} | Δ vs GN |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    gn = next((s for s in summary if s["norm"] == "gn"), None)
    for s in summary:
        lines.append("| " + " | ".join(_cells(grid, spec, s, gn)) + " |")
    if grid in ("table1", "quick"):
        lines += ["", *_targets(summary)]
    if spec.metric != "error":
        lines += ["", *_comparisons(summary, spec), "", f"![{name} per row]({grid}.png)"]
        if spec.figure_rows:
            lines += ["", f"![test scenes, ground truth and predictions]({grid}_predictions.png)"]
    return "\n".join(lines) + "\n"


def _comparisons(summary: list[dict[str, Any]], spec: GridSpec) -> list[str]:
    """Each row against the baseline and against GroupNorm, with the seed spread to judge by."""
    by = {s["label"]: s for s in summary}
    base = by.get(spec.baseline)
    if base is None or len(summary) < 2:
        return ["Comparisons: the baseline row has not finished yet."]
    spreads = [s["std"] for s in summary if s["std"] is not None]
    spread = f"; the largest seed spread (std) is {max(spreads):.2f}" if spreads else "; one seed: no spread yet"
    out = [f"Differences of the means (points of {_UNITS[spec.metric]}){spread}:", ""]
    gn = next((s for s in summary if s["norm"] == "gn"), None)
    for s in summary:
        if s is base:
            continue
        line = f"- {s['label']} − {spec.baseline} = {s['mean'] - base['mean']:+.2f}"
        if gn is not None and s is not gn:
            line += f"; − {gn['label']} = {s['mean'] - gn['mean']:+.2f}"
        out.append(line)
    if spreads and spec.metric == "box_ap":
        # What the run length buys: which gaps the seeds resolve.
        big = [s["label"] for s in summary if s is not base and abs(s["mean"] - base["mean"]) > 2 * max(spreads)]
        out += [
            "",
            f"Gaps to {spec.baseline} larger than twice the largest seed spread: {', '.join(big) if big else 'none'}.",
        ]
    return out


def _cells(grid: str, spec: GridSpec, s: dict[str, Any], gn: dict[str, Any] | None = None) -> list[str]:
    value = _fmt(s["mean"]) + (f" ± {_fmt(s['std'])}" if s["std"] is not None else "")
    if s["diverged"]:
        value += f" (diverged in {s['diverged']}/{s['n']})"
    size = str(s["norm_batch_size"]) if s["norm_batch_size"] not in ("", None) else "per sample"
    cells = [s["label"].split("(")[0].removesuffix("+WC"), size, "yes" if str(s["wc"]) in ("True", "1") else "no"]
    cells += [str(s["n"]), value, *(_fmt(s["extra"].get(k)) for k in spec.extra_metrics)]
    cells += [_fmt(s["folded"]), _fmt(s["delta"], sign=True)]
    if spec.metric == "box_ap":
        cells.append(_fmt(s["mean"] - gn["mean"], sign=True) if gn is not None else "–")
    cells += [_fmt(s["epoch_time"], 0), _fmt(s["time"], 0)]
    if grid == "ablation":
        cells.insert(0, ABLATION_ROWS.get(s["norm"], s["norm"]))
    elif spec.metric != "error":
        cells[0] = s["label"]
        cells.insert(1, s["norm"])
    return cells


def _targets(summary: list[dict[str, Any]]) -> list[str]:
    """The paper's claims for Table 1, checked on the current numbers (judged only over several seeds)."""
    by = {s["label"]: s for s in summary}
    bn32, bn2, brn2, mabn2 = (by.get(k) for k in ("BN(32)", "BN(2)", "BRN(2)", "MABN(2)"))
    if not (bn32 and bn2 and mabn2):
        return ["Targets: not all of BN(32), BN(2), MABN(2) have finished yet."]
    spreads = [s["std"] for s in (bn32, bn2, brn2, mabn2) if s and s["std"] is not None]
    gap, d = bn2["mean"] - bn32["mean"], mabn2["mean"] - bn32["mean"]
    if not spreads:
        # One seed: a run-to-run spread of a few tenths of a point hides the differences being judged.
        return [
            "Differences (one seed: a spot check, not a result; the paper's claims are judged over three "
            "seeds with `mabn reproduce table1`):",
            "",
            f"- BN(2) − BN(32) = {gap:+.2f} points; MABN(2) − BN(32) = {d:+.2f} points"
            + (f"; BRN(2) = {brn2['mean']:.2f}" if brn2 else ""),
        ]
    spread = max(spreads)
    out = ["Targets (the paper's claims, checked on these numbers):", ""]
    verdict = "met" if gap > 2 * spread else "missed"
    out.append(
        f"- BN(2) − BN(32) = {gap:+.2f} points, more than twice the largest seed spread ({spread:.2f}): {verdict}"
    )
    out.append(f"- MABN(2) − BN(32) = {d:+.2f} points, target ≤ +0.30: {'met' if d <= 0.3 else 'missed'}")
    if brn2:
        between = min(bn32["mean"], bn2["mean"]) <= brn2["mean"] <= max(bn32["mean"], bn2["mean"])
        out.append(f"- BRN(2) = {brn2['mean']:.2f}, between BN(32) and BN(2): {'met' if between else 'missed'}")
    return out


def write_summary(
    grid: str, rows: list[dict[str, Any]], results_dir: Path, base: dict[str, Any], command: str = ""
) -> list[Path]:
    """Write ``<grid>.csv``, ``<grid>.md`` and (sweep, dense grids) ``<grid>.png`` into ``results_dir``."""
    if not rows:
        return []
    results_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    paths = [results_dir / f"{grid}.csv", results_dir / f"{grid}.md"]
    atomic_write(paths[0], lambda f: f.write(buffer.getvalue().encode()))
    atomic_write(paths[1], lambda f: f.write(markdown(grid, rows, base, command).encode()))
    if grid == "batch-sweep":
        paths.append(plot_sweep(rows, results_dir / f"{grid}.png", base))
    elif _spec(grid).metric != "error":
        paths.append(plot_rows(grid, rows, results_dir / f"{grid}.png", base))
    return paths


def plot_rows(grid: str, rows: list[dict[str, Any]], path: Path, base: dict[str, Any]) -> Path:
    """One horizontal bar per row (mean of the metric) with every seed as a dot: the seed spread at a glance."""
    plt = pyplot()
    spec = _spec(grid)
    summary = summarize(rows, spec.metric, spec.baseline)
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(summary) + 1.3), dpi=120)
    ys = list(range(len(summary)))[::-1]
    for y, s in zip(ys, summary):
        color = "tab:green" if s["norm"] == "mabn" else ("tab:gray" if s["label"] == spec.baseline else "tab:blue")
        ax.barh(y, s["mean"], color=color, alpha=0.35, height=0.6)
        ax.plot(s["values"], [y] * len(s["values"]), "o", color=color, markersize=4)
        ax.text(max([s["mean"], *s["values"]]), y, f"  {s['mean']:.1f}", va="center", fontsize=8)
    ax.set_yticks(ys, [s["label"] for s in summary])
    values = [v for s in summary for v in s["values"]]
    if values:
        ax.set_xlim(max(0.0, min(values) - 5), max(values) + 4)
    ax.set_xlabel(f"test {_METRIC_NAMES[spec.metric]} (bars: mean, dots: seeds)")
    ax.set_title(f"{grid}: {base['data']}, gradient batch {base['batch_size']}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(rows: list[dict[str, Any]], path: Path, base: dict[str, Any]) -> Path:
    """Error vs normalization batch size, one line per method (the paper's Figure 1(b))."""
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_predictions(grid: str, out: Path, path: Path, base: dict[str, Any], seed: int = 0, n: int = 6) -> Path | None:
    """Test scenes, their ground truth and the predictions of the grid's ``figure_rows`` (seed ``seed``).

    Segmentation grids draw label maps, the detection grid boxes (detections scoring 0.5 or more).
    Rows whose run has not finished are left out; returns None when none has.
    """
    import torch

    from ..serialization import load_checkpoint, model_from_checkpoint
    from .detection import ground_truth_rows, plot_detections
    from .scenes import plot_scenes
    from .sources import make_source

    runs = {r.label: r for r in grid_runs(grid)}
    done = [
        label for label in _spec(grid).figure_rows if (out / runs[label].slug / f"seed{seed}" / "result.json").is_file()
    ]
    if not done:
        return None
    size = base.get("image_size") or 96
    source = make_source(base["data"], base.get("data_dir"), 1, n, size, task=base.get("task"))
    x, targets = next(source.test_batches(n))
    predictions = {}
    for label in done:
        model = model_from_checkpoint(load_checkpoint(out / runs[label].slug / f"seed{seed}" / "checkpoint.pt"))
        with torch.no_grad():
            predictions[label] = model(list(x)) if source.task == "detection" else model(x).argmax(1)
    title = f"{grid}: test scenes, ground truth and predictions (seed {seed}, evaluation mode)"
    if source.task == "detection":
        truth, ignored = ground_truth_rows(source, n)
        rows = {"ground truth": truth, **predictions}
        title = title.replace("predictions", "detections scoring 0.5 or more; dashed: ignored regions")
        return plot_detections(source.test_images[:n], rows, path, score_min=0.5, ignored=ignored, title=title)
    return plot_scenes((source.test_images[:n], targets), path, n=n, predictions=predictions, title=title)
