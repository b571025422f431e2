"""``mabn stats``: plots and table from a saved log, and a very short training run."""

from __future__ import annotations

import math
import shlex

import pytest
from PIL import Image

from mabn.apps.cli import main
from mabn.apps.stats import format_table, run_config, summarize, train_command
from mabn.apps.train import STATS_LOG, train
from mabn.monitor import read_stats_log, write_stats_csv, write_stats_jsonl


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """Records of the three runs of ``mabn stats``, trained by ``mabn.train`` on a width-2 ResNet for 4 steps."""
    root = tmp_path_factory.mktemp("stats-runs")
    records = []
    for run_name in ("bn", "uncentered", "mabn"):
        args = stats_parser().parse_args(
            ["--steps", "4", "--batch-size", "8", "--width", "2", "--runs-dir", str(root), "--lr", "0.01"]
            + (["--all-layers"] if run_name == "bn" else [])
        )
        config = {**run_config(run_name, args), "data": "synthetic", "limit_train": 64, "limit_test": 16}
        train(config, progress=False)
        records += [{"run": run_name, **r} for r in read_stats_log(root / run_name / STATS_LOG)]
    return records


def stats_parser():
    import argparse

    from mabn.apps.stats import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_records_of_the_runs(tiny_records):
    runs = {r["run"] for r in tiny_records}
    assert runs == {"bn", "uncentered", "mabn"}
    # The bn run watched every norm layer, the others only the plotted one.
    assert len({r["layer"] for r in tiny_records if r["run"] == "bn"}) > 1
    assert {r["layer"] for r in tiny_records if r["run"] != "bn"} == {"layer1.0.bn1"}
    forms = {r["run"]: r["form"] for r in tiny_records}
    assert forms == {"bn": "centered", "uncentered": "uncentered", "mabn": "uncentered"}
    assert all(r["groups"] == 4 and r["group_size"] == 2 for r in tiny_records)
    assert {r["step"] for r in tiny_records} == {1, 2, 3, 4}


def test_summary_and_table(tiny_records):
    summary = summarize(tiny_records, "layer1.0.bn1", table_from=2)
    assert [(s["run"], s["stat"]) for s in summary][:5] == [("bn", s) for s in ("mu", "sigma2", "chi2", "g", "psi")]
    rows = {(s["run"], s["stat"]): s for s in summary}
    bn_psi = [
        r
        for r in tiny_records
        if r["run"] == "bn" and r["layer"] == "layer1.0.bn1" and r["stat"] == "psi" and r["step"] >= 2
    ]
    assert rows["bn", "psi"]["steps"] == 3
    assert math.isclose(rows["bn", "psi"]["small_reldev"], sum(r["small_reldev"] for r in bn_psi) / 3)
    assert rows["bn", "g"]["used"] and not rows["mabn", "g"]["used"] and rows["mabn", "chi2"]["used"]
    # MABN's moving averages are still in warm-up (100 steps), so none is "used" yet.
    assert rows["mabn", "psi"]["sma_steps"] == 0 and math.isnan(rows["mabn", "psi"]["sma_reldev"])
    text = format_table(summary)
    assert "small vs regular" in text and len(text.splitlines()) == 1 + len(summary)
    assert format_table(summary, markdown=True).splitlines()[1].startswith("|---")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_stats_from_log_draws_plots(tiny_records, tmp_path, capsys, suffix):
    log = tmp_path / f"log{suffix}"
    (write_stats_csv if suffix == ".csv" else write_stats_jsonl)(tiny_records, log)
    out = tmp_path / "plots"
    assert main(["stats", "--log", str(log), "--out", str(out), "--table-from", "1"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.bn1" in text and "moving avg vs regular" in text
    for name in ("bn", "uncentered", "mabn", "deviation"):
        with Image.open(out / f"statistics_{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300


def test_stats_from_log_other_layer_and_errors(tiny_records, tmp_path, capsys):
    log = tmp_path / "log.csv"
    write_stats_csv([r for r in tiny_records if r["run"] == "bn"], log)
    out = tmp_path / "plots"
    argv = ["stats", "--log", str(log), "--out", str(out), "--layer", "layer2.0.bn2", "--prefix", "x"]
    assert main(argv) == 2
    assert "--table-from" in capsys.readouterr().err  # the 4-step log has nothing from step 100 on
    assert main(argv + ["--table-from", "0"]) == 0
    assert (out / "x_bn.png").exists() and not (out / "x_mabn.png").exists()
    assert main(["stats", "--log", str(log), "--out", str(out), "--layer", "nope"]) == 2
    assert "no layer 'nope'" in capsys.readouterr().err
    assert main(["stats", "--log", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert main(["stats", "--runs", "bn,xyz", "--out", str(out)]) == 2
    assert "'xyz'" in capsys.readouterr().err
    assert main(["stats", "--batch-size", "6", "--norm-batch-size", "4", "--out", str(out)]) == 2
    assert main(["stats", "--save-log", str(tmp_path / "log.txt"), "--out", str(out)]) == 2
    assert "log.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_stats_trains_through_mabn_train(tmp_path, capsys, fashion_mnist_dir):
    out, runs = tmp_path / "plots", tmp_path / "runs"
    argv = ["stats", "--steps", "3", "--width", "2", "--batch-size", "8", "--out", str(out), "--table-from", "0"]
    argv += ["--runs-dir", str(runs), "--save-log", str(out / "log.jsonl"), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    records = read_stats_log(out / "log.jsonl")
    assert {r["run"] for r in records} == {"bn", "uncentered", "mabn"}
    assert len(records) == 3 * 3 * 5
    assert (out / "statistics_mabn.png").exists()
    # Each run is an ordinary `mabn train` run; the command printed for it reproduces its log exactly.
    command = next(line for line in text.splitlines() if line.startswith("[mabn]")).split("; ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["mabn", "train"] and "--monitor-every" in args
    args[args.index("--out") + 1] = str(tmp_path / "again")
    assert main(args[1:] + ["--no-progress"]) == 0
    assert read_stats_log(tmp_path / "again" / STATS_LOG) == read_stats_log(runs / "mabn" / STATS_LOG)
    # A second invocation reuses the finished runs instead of training again.
    capsys.readouterr()
    assert main(argv) == 0
    assert "training resnet_small" not in capsys.readouterr().out


def test_train_command_lists_the_options_that_differ_from_the_defaults(tmp_path):
    args = stats_parser().parse_args(["--steps", "700", "--runs-dir", str(tmp_path)])
    command = train_command(run_config("mabn", args))
    assert command.startswith("mabn train --depth 1 --width 16 --norm mabn --conv centralized --norm-batch-size 2")
    assert "--epochs 1 --max-steps 700 --schedule constant --warmup-epochs 0" in command
    assert f"--out {tmp_path / 'mabn'} --monitor-every 1 --monitor-layers layer1.0.bn1" in command
