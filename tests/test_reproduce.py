"""mabn reproduce: grid definitions, a tiny grid end to end, resuming, summaries and the sweep plot."""

import csv
import json

import pytest

from mabn.apps import cli, reproduce
from mabn.apps import train as trainer
from mabn.apps.grids import DETECTION_HEAD_WARMUP

TINY = ["--data", "synthetic", "--limit-train", "96", "--limit-test", "64", "--width", "4", "--epochs", "1",
        "--threads", "1", "--no-progress"]  # fmt: skip


def test_grids_follow_the_protocol(tmp_path):
    labels = {g: [r.label for r in reproduce.GRIDS[g]] for g in reproduce.GRIDS}
    assert labels["table1"] == ["BN(32)", "BN(2)", "BRN(2)", "MABN(2)", "GN"]
    assert labels["quick"] == ["BN(32)", "BN(2)", "MABN(2)"]
    sweep = {(r.method, r.norm_batch_size) for r in reproduce.GRIDS["batch-sweep"]}
    assert sweep == {(m, b) for m in ("BN", "BRN") for b in (2, 4, 8, 16, 32)} | {
        ("MABN", b) for b in (1, 2, 4, 8, 16, 32)
    }
    ablation = reproduce.GRIDS["ablation"]
    assert len(ablation) == 16 and sum(r.wc for r in ablation) == 8
    assert {r.norm for r in ablation} == {"bn", "brn", "bn_ema_sma", "uncentered", "uncentered_ema", "mabn"}
    for grid, runs in reproduce.GRIDS.items():
        base = {**trainer.DEFAULTS, **reproduce.GRID_SPECS[grid].protocol}
        configs = [trainer.check_config(r.config(base, 1, tmp_path)) for r in runs]
        assert len({c["out"] for c in configs}) == len(runs), grid  # one directory per row
        for c, r in zip(configs, runs):
            # Same gradient batch, model, schedule and seed everywhere; only the norm, B and WC change.
            assert (c["batch_size"] * r.processes, c["arch"], c["width"], c["depth"], c["lr"], c["epochs"]) == (
                base["batch_size"], base["arch"], 16, 1, base["lr"], base["epochs"])  # fmt: skip
            assert c["seed"] == 1 and c["conv"] == ("centralized" if r.wc else None)
    assert reproduce.GRID_SPECS["table1"].protocol["batch_size"] == 32
    seg = reproduce.GRIDS["segmentation"]
    assert [r.label for r in seg] == [
        "BN(16)", "BN(2)", "BRN(2)", "GN", "MABN(2)", "BN(16)+WC", "BN(2)+WC", "SyncBN(16) x2 processes"]  # fmt: skip
    synced = seg[-1].config({**trainer.DEFAULTS, **reproduce.GRID_SPECS["segmentation"].protocol}, 0, tmp_path)
    assert synced["sync_norm"] and synced["batch_size"] == 8 and synced["norm_batch_size"] is None
    mabn2 = next(r for r in reproduce.GRIDS["table1"] if r.norm == "mabn")
    assert mabn2.wc and mabn2.norm_batch_size == 2


@pytest.mark.slow  # a grid: three training runs
def test_quick_grid_end_to_end_then_skips_finished_runs(tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["reproduce", "quick", "--out", str(out), "--results-dir", str(results), *TINY]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| BN | 32 | no | 1 |" in printed and "MABN(2) − BN(32)" in printed
    with open(results / "quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["norm_batch_size"], r["wc"]) for r in rows] == [
        ("BN", "32", "False"), ("BN", "2", "False"), ("MABN", "2", "True")]  # fmt: skip
    for row, run in zip(rows, reproduce.GRIDS["quick"]):
        result = json.loads((out / run.slug / "seed0" / "result.json").read_text())
        assert float(row["error"]) == pytest.approx(result["error"], abs=0.005)
        assert row["epochs"] == "1" and float(row["wall_time_s"]) >= 0
    md = (results / "quick.md").read_text()
    assert "mabn reproduce quick" in md and "Δ vs BN(32)" in md
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert cli.main(argv) == 0  # everything is finished: nothing is trained again
    assert "(done, skipped)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps


def test_interrupted_grid_resumes_the_stopped_run(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["reproduce", "quick", "--out", str(out), "--results-dir", str(tmp_path), *TINY]
    argv[argv.index("--epochs") + 1] = "2"
    base = {**trainer.DEFAULTS, **reproduce.PROTOCOL, "data": "synthetic", "limit_train": 96, "limit_test": 64,
            "width": 4, "epochs": 2, "threads": 1}  # fmt: skip
    run = reproduce.GRIDS["quick"][2]
    trainer.train(run.config(base, 0, out), stop_after=1)  # as if the grid was killed after one epoch
    assert cli.main(argv) == 0
    capsys.readouterr()
    resumed = json.loads((out / run.slug / "seed0" / "result.json").read_text())
    fresh = trainer.train(run.config(base, 0, tmp_path / "fresh"))
    assert resumed["param_digest"] == fresh["param_digest"]
    assert resumed["epochs_done"] == 2


def test_summary_mean_std_and_difference_to_bn32():
    def row(label, norm, b, seed, error, wc=False):
        return {"label": label, "method": label.split("(")[0], "norm": norm, "norm_batch_size": b, "wc": wc,
                "seed": seed, "epochs": 3, "error": error, "error_folded": error, "diverged": False,
                "wall_time_s": 10.0, "train_time_per_epoch_s": 3.0}  # fmt: skip

    rows = [row("BN(32)", "bn", 32, 0, 10.0), row("BN(32)", "bn", 32, 1, 12.0), row("BN(2)", "bn", 2, 0, 15.0),
            row("BN(2)", "bn", 2, 1, 16.0), row("MABN(2)", "mabn", 2, 0, 11.0, True)]  # fmt: skip
    summary = {s["label"]: s for s in reproduce.summarize(rows)}
    assert summary["BN(32)"]["mean"] == pytest.approx(11.0) and summary["BN(32)"]["std"] == pytest.approx(2**0.5)
    assert summary["BN(2)"]["delta"] == pytest.approx(4.5) and summary["MABN(2)"]["std"] is None
    md = reproduce.markdown("table1", rows, {**trainer.DEFAULTS, **reproduce.PROTOCOL})
    assert "| BN | 2 | no | 2 | 15.50 ± 0.71 |" in md and "| MABN | 2 | yes | 1 | 11.00 |" in md
    assert "BN(2) − BN(32) = +4.50 points, more than twice the largest seed spread (1.41): met" in md
    assert "MABN(2) − BN(32) = +0.00 points, target ≤ +0.30: met" in md
    # One seed each (the quick grid): the differences, and no verdict a seed's spread could reverse.
    single = [r for r in rows if r["seed"] == 0]
    md = reproduce.markdown("table1", single, {**trainer.DEFAULTS, **reproduce.PROTOCOL})
    assert "one seed: a spot check, not a result" in md and "MABN(2) − BN(32) = +1.00 points" in md
    assert ": met" not in md and ": missed" not in md


def test_sweep_plot_is_a_png(tmp_path):
    rows = []
    for method, sizes in (("BN", (2, 8, 32)), ("MABN", (1, 2, 32))):
        for b in sizes:
            rows.append({"label": f"{method}({b})", "method": method, "norm": method.lower(), "norm_batch_size": b,
                         "wc": method == "MABN", "seed": 0, "epochs": 1, "error": 10.0 + 8 / b, "error_folded": None,
                         "diverged": False, "wall_time_s": 1.0, "train_time_per_epoch_s": 1.0})  # fmt: skip
    paths = reproduce.write_summary("batch-sweep", rows, tmp_path, {**trainer.DEFAULTS, **reproduce.PROTOCOL})
    assert [p.name for p in paths] == ["batch-sweep.csv", "batch-sweep.md", "batch-sweep.png"]
    assert (tmp_path / "batch-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["table9"], "unknown grid 'table9'"),
        (["quick", "--seeds", "0"], "--seeds must be >= 1"),
        (["quick", "--data", "cifar"], "unknown data source 'cifar'"),
    ],  # fmt: skip
)
def test_bad_input(tmp_path, capsys, argv, message):
    assert cli.main(["reproduce", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_list_prints_the_runs(tmp_path, capsys):
    assert cli.main(["reproduce", "batch-sweep", "--list", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 16 and "MABN(1)" in lines[-1]


@pytest.mark.slow
def test_segmentation_grid_runs_its_torchrun_row(tmp_path, capsys, fashion_mnist_dir):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["reproduce", "segmentation", "--seeds", "1", "--epochs", "1", "--limit-train", "32", "--limit-test",
            "16", "--width", "8", "--jobs", "2", "--threads", "1", "--no-progress", "--out", str(out),
            "--results-dir", str(results)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| SyncBN(16) x2 processes | bn | 16 | no | 1 |" in printed and "Δ vs BN(16)" in printed
    result = json.loads((out / "syncbn-b16-p2" / "seed0" / "result.json").read_text())
    assert result["world_size"] == 2 and result["config"]["sync_norm"] and 0 <= result["miou"] <= 100
    with open(results / "segmentation.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["miou"] and not r["error"] for r in rows)
    assert (results / "segmentation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "syncbn-b16-p2").glob("*.json"))  # the launch file is gone


@pytest.mark.slow
def test_finetune_grid_pretrains_once_then_fine_tunes(tmp_path, capsys, fashion_mnist_dir):
    out = tmp_path / "runs"
    argv = ["reproduce", "finetune", "--seeds", "1", "--epochs", "1", "--limit-train", "32", "--limit-test", "16",
            "--width", "8", "--threads", "1", "--no-progress", "--out", str(out), "--results-dir", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("pre-training the encoder") == 1 and "initialized the encoder from" in printed
    pre = json.loads((out / "pretrain" / "result.json").read_text())
    assert pre["config"]["data"] == "fashion-mnist" and pre["config"]["width"] == 8
    frozen = json.loads((out / "frozen-bn" / "seed0" / "config.json").read_text())
    assert frozen["model_config"]["frozen_encoder"] and frozen["train"]["init"].endswith("checkpoint.pt")
    gn = json.loads((out / "gn-scratch" / "seed0" / "config.json").read_text())
    assert gn["train"]["init"] is None
    md = (tmp_path / "finetune.md").read_text()
    assert "| MABN(2) function | mabn | 2 | no | 1 |" in md and "Δ vs BN(16) ceiling" in md


TINY_DENSE = ["--seeds", "1", "--epochs", "1", "--limit-train", "32", "--limit-test", "8", "--width", "8",
              "--threads", "1", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_rows_adds_a_row_to_a_recorded_grid_and_report_only_rebuilds(tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    base = {**trainer.DEFAULTS, **reproduce.GRID_SPECS["segmentation"].protocol}
    recorded = [
        {"grid": "segmentation", "method": r.method, "label": r.label, "norm": r.norm, "norm_batch_size": r.norm_batch_size,
         "wc": r.wc, "processes": r.processes, "seed": 0, "epochs": 3, "miou": 20.0 + i, "miou_folded": 20.0 + i,
         "pixel_acc": 90.0, "diverged": False, "wall_time_s": 400.0, "train_time_per_epoch_s": 130.0}
        for i, r in enumerate(reproduce.GRIDS["segmentation"]) if r.label != "BN(2)+WC"
    ]  # fmt: skip
    command = "mabn reproduce segmentation --seeds 1 --epochs 3 --out runs/segmentation"
    reproduce.write_summary("segmentation", recorded, results, base, command)
    argv = [
        "reproduce",
        "segmentation",
        "--rows",
        "BN(2)+WC",
        *TINY_DENSE,
        "--out",
        str(out),
        "--results-dir",
        str(results),
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert [p.name for p in out.iterdir()] == ["bn-b2-wc"]  # only the asked row was trained
    with open(results / "segmentation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [r.label for r in reproduce.GRIDS["segmentation"]]
    assert [float(r["miou"]) for r in rows if r["label"] != "BN(2)+WC"] == [r["miou"] for r in recorded]
    new = json.loads((out / "bn-b2-wc" / "seed0" / "result.json").read_text())
    assert float(rows[6]["miou"]) == pytest.approx(new["miou"], abs=0.005)
    md = (results / "segmentation.md").read_text()
    assert "| BN(2)+WC | bn | 2 | yes | 1 |" in md
    assert f"    {command}\n    mabn reproduce segmentation" in md and "--rows 'BN(2)+WC'" in md
    (results / "segmentation.md").unlink()
    assert cli.main(["reproduce", "segmentation", "--report-only", "--seeds", "1", "--out", str(out),
                     "--results-dir", str(results)]) == 0  # fmt: skip
    assert (results / "segmentation.md").read_text() != "" and len(
        list(csv.DictReader(open(results / "segmentation.csv")))
    ) == 8
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "segmentation", "--rows"])
    assert cli.main(["reproduce", "segmentation", "--rows", "BN(3)", "--out", str(out)]) == 2
    assert "BN(3) not a row of segmentation" in capsys.readouterr().err
    assert cli.main(["reproduce", "quick", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "no finished run of quick" in capsys.readouterr().err


@pytest.mark.slow
def test_detection_grid_reports_box_ap_and_draws_detections(fashion_mnist_dir, tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["reproduce", "detection", "--rows", "BN(16),GN,MABN(2)", *TINY_DENSE, "--jobs", "2", "--out", str(out),
            "--results-dir", str(results)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "box AP %" in printed and "| AP50 % | AP75 % |" in printed and "Δ vs GN" in printed
    mabn_run = json.loads((out / "mabn-b2-wc" / "seed0" / "config.json").read_text())
    assert mabn_run["model_config"]["head_warmup_iters"] == DETECTION_HEAD_WARMUP
    with open(results / "detection.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["BN(16)", "GN", "MABN(2)"] and all(r["box_ap"] != "" for r in rows)
    assert all(r["box_ap"] == r["box_ap_folded"] for r in rows)
    for name in ("detection.md", "detection.png", "detection_predictions.png"):
        assert (results / name).stat().st_size > 0
    before = (results / "detection.md").read_text()
    (results / "detection_predictions.png").unlink()
    assert cli.main(["reproduce", "detection", "--report-only", "--seeds", "1", "--out", str(out),
                     "--results-dir", str(results)]) == 0  # fmt: skip
    assert (results / "detection.md").read_text() == before and (results / "detection_predictions.png").exists()
