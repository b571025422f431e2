"""mabn train: outputs, bit-identical resume, atomic checkpoints, schedules and bad input."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mabn.apps import cli, files
from mabn.apps import train as trainer


def _config(out, **overrides):
    config = {
        "data": "synthetic",
        "limit_train": 128,
        "limit_test": 64,
        "width": 4,
        "epochs": 2,
        "threads": 1,
        "out": str(out),
    }
    config.update(overrides)
    return config


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_writes_config_metrics_checkpoint_and_result(tmp_path):
    out = tmp_path / "run"
    result = trainer.train(_config(out, norm="mabn", norm_batch_size=2, conv="centralized"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "result.json"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all(m["steps"] == 4 for m in lines)
    assert all(math.isfinite(m["train_loss"]) and m["images_per_s"] > 0 for m in lines)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["norm"] == "mabn" and saved["model_config"]["norm_kwargs"] == {"norm_batch_size": 2}
    assert saved["model_config"]["conv"] == "centralized"
    ckpt = _load(out / "checkpoint.pt")
    assert ckpt["format"] == "mabn-checkpoint" and ckpt["version"] == 1 and ckpt["epoch"] == 2
    assert ckpt["model_config"] == saved["model_config"]
    # The checkpoint's model rebuilds from its own model_config (the contract `mabn export` relies on).
    from mabn.models import build_model

    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    assert files.param_digest(model) == result["param_digest"]
    assert 0.0 <= result["error"] <= 100.0 and result["error"] == lines[-1]["test_error"]
    assert json.loads((out / "result.json").read_text())["error"] == result["error"]


@pytest.mark.parametrize("norm,conv", [("mabn", "centralized"), ("brn", None), ("gn", None)])
def test_folded_model_has_the_same_error(tmp_path, norm, conv):
    nbs = None if norm == "gn" else 2
    result = trainer.train(_config(tmp_path, norm=norm, norm_batch_size=nbs, conv=conv, epochs=1, limit_test=256))
    # Folding changes float rounding only: at most one of 256 predictions may flip.
    assert abs(result["error_folded"] - result["error"]) <= 100.0 / 256 + 1e-9


def _state(path):
    ckpt = _load(path)
    return ckpt["model"], ckpt["optimizer"]["state"]


@pytest.mark.parametrize(
    "norm,conv,opts",
    [
        ("mabn", "centralized", {"warmup_iters": 3, "renorm_warmup_iters": 5}),
        ("brn", None, {"renorm_warmup_iters": 5}),
    ],
)
def test_resume_ends_with_the_same_weights(tmp_path, norm, conv, opts):
    # Short warm-ups, so that the SMA windows and renormalization are live across the interruptions.
    kwargs = dict(norm=norm, norm_batch_size=2, conv=conv, epochs=3, norm_kwargs=opts)
    full = trainer.train(_config(tmp_path / "full", **kwargs))
    stopped = trainer.train(_config(tmp_path / "split", **kwargs), stop_after=1)
    assert stopped["stopped"] and stopped["epochs_done"] == 1
    assert _load(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "split" / "result.json").exists()
    again = trainer.train(_config(tmp_path / "split", **kwargs), stop_after=2, resume=True)
    assert again["stopped"] and again["epochs_done"] == 2
    resumed = trainer.train(_config(tmp_path / "split", **kwargs), resume=True)
    assert resumed["param_digest"] == full["param_digest"]
    (model_a, opt_a), (model_b, opt_b) = (
        _state(tmp_path / "full" / "checkpoint.pt"),
        _state(tmp_path / "split" / "checkpoint.pt"),
    )
    assert model_a.keys() == model_b.keys()
    for key in model_a:  # parameters and every buffer (running stats, SMA windows, counters)
        assert torch.equal(model_a[key], model_b[key]), key
    for key in opt_a:
        assert torch.equal(opt_a[key]["momentum_buffer"], opt_b[key]["momentum_buffer"])
    assert resumed["error"] == full["error"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_refuses_another_configuration(tmp_path):
    trainer.train(_config(tmp_path, epochs=2), stop_after=1)
    with pytest.raises(ValueError, match="different configuration.*lr: 0.05 -> 0.1"):
        trainer.train(_config(tmp_path, epochs=2, lr=0.1), resume=True)


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    files.atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no stray temporary file


def test_learning_rate_schedules():
    c = trainer.check_config({"epochs": 4, "lr": 0.1, "warmup_epochs": 1})
    lrs = [trainer.learning_rate(c, s, 10) for s in range(40)]
    assert lrs[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(0.1) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically
    s = trainer.check_config({"epochs": 4, "lr": 0.1, "warmup_epochs": 0, "schedule": "step", "milestones": [2, 3]})
    assert [trainer.learning_rate(s, k, 10) for k in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_constant_schedule_keeps_the_rate_after_warm_up():
    c = trainer.check_config({"epochs": 2, "lr": 0.1, "warmup_epochs": 0.5, "schedule": "constant"})
    assert [trainer.learning_rate(c, s, 10) for s in (0, 4, 5, 19)] == pytest.approx([0.02, 0.1, 0.1, 0.1])


def test_max_steps_ends_the_run_inside_an_epoch(tmp_path):
    # 128 samples / 32 = 4 steps per epoch: 6 steps end in the middle of the second epoch.
    result = trainer.train(_config(tmp_path, epochs=3, max_steps=6))
    assert result["steps"] == 6 and result["epochs_done"] == 2 and result["error"] is not None
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["steps"] for m in lines] == [4, 2] and "test_error_folded" in lines[-1]
    # The schedule still spans the 3 epochs: the last step's rate is that of step 6 of 12.
    c = trainer.check_config(_config(tmp_path, epochs=3, max_steps=6))
    assert lines[-1]["lr"] == pytest.approx(trainer.learning_rate(c, 5, 4))


MONITORED = dict(norm="mabn", norm_batch_size=2, conv="centralized", epochs=3, norm_kwargs={"warmup_iters": 3})


def test_monitor_option_writes_the_log_and_does_not_change_training(tmp_path):
    from mabn.monitor import read_stats_log

    plain = trainer.train(_config(tmp_path / "plain", **MONITORED))
    watched = trainer.train(_config(tmp_path / "watched", monitor_every=5, **MONITORED))
    assert watched["param_digest"] == plain["param_digest"] and watched["error"] == plain["error"]
    assert not (tmp_path / "plain" / trainer.STATS_LOG).exists()
    records = read_stats_log(tmp_path / "watched" / trainer.STATS_LOG)
    from mabn.models import build_model

    # The log covers every normalization layer of the model.
    model = build_model(json.loads((tmp_path / "watched" / "config.json").read_text())["model_config"])
    norms = [n for n, m in model.named_modules() if type(m).__name__.startswith("MABN")]
    assert sorted({r["layer"] for r in records}) == sorted(norms)
    assert sorted({r["step"] for r in records}) == [5, 10]  # 12 steps, every 5th
    assert {r["stat"] for r in records} == {"mu", "sigma2", "chi2", "g", "psi"}
    # The records are the monitor's: the SMA estimates are in use after the warm-up of 3 steps.
    assert all(r["sma_used"] for r in records if r["stat"] == "psi")


def test_monitor_log_survives_resume(tmp_path):
    from mabn.monitor import read_stats_log

    kwargs = dict(monitor_every=3, monitor_layers=["layer1.0.bn1"], **MONITORED)
    full = trainer.train(_config(tmp_path / "full", **kwargs))
    trainer.train(_config(tmp_path / "split", **kwargs), stop_after=1)
    assert sorted({r["step"] for r in read_stats_log(tmp_path / "split" / trainer.STATS_LOG)}) == [3]
    resumed = trainer.train(_config(tmp_path / "split", **kwargs), resume=True)
    assert resumed["param_digest"] == full["param_digest"]
    a = read_stats_log(tmp_path / "full" / trainer.STATS_LOG)
    b = read_stats_log(tmp_path / "split" / trainer.STATS_LOG)
    assert [r["step"] for r in a] == [r["step"] for r in b] and {r["step"] for r in a} == {3, 6, 9, 12}
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            va, vb = ra[key], rb[key]
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), key


def test_divergence_is_recorded(tmp_path):
    result = trainer.train(_config(tmp_path, lr=1e12, epochs=3))
    assert result["diverged"] and result["epochs_done"] < 3
    assert json.loads((tmp_path / "result.json").read_text())["diverged"]


def _cli(argv, capsys):
    code = cli.main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.err


BASE = ["--data", "synthetic", "--limit-train", "64", "--limit-test", "32", "--width", "4", "--epochs", "1"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--norm", "nope"], "unknown norm layer 'nope'"),
        (["--data", "mnist"], "unknown data source 'mnist'"),
        (["--norm-batch-size", "3"], "--norm-batch-size 3 does not divide --batch-size 32"),
        (["--data", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "dataset-fashion-mnist"),
        (["--data", "imagefolder", "--data-dir", "/nonexistent/in"], "does not exist"),
        (["--arch", "vgg"], "unknown --arch 'vgg'"),
        (["--norm", "gn", "--norm-batch-size", "2"], "does not apply to the per-sample"),
        (["--norm-opt", "window"], "--norm-opt expects KEY=VALUE"),
        (["--resume"], "no checkpoint"),
        (["--max-steps", "0"], "max_steps must be a positive integer, got 0"),
        (["--monitor-layers", "layer1.0.bn1"], "--monitor-layers needs --monitor-every"),
        (["--monitor-every", "0"], "monitor_every must be a positive integer, got 0"),
        (["--monitor-every", "2", "--monitor-layers", "fc"], "--monitor-every/--monitor-layers: layer 'fc'"),
        (["--monitor-every", "2", "--monitor-layers", ","], "--monitor-layers must name at least one layer"),
        (["--monitor-every", "2", "--norm", "gn"], "no normalization layer found"),
        (["--schedule", "linear"], "unknown --schedule 'linear'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, err = _cli([*BASE, "--out", str(out), *argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not out.exists()


def test_corrupt_checkpoint_and_existing_run_leave_files_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli([*BASE, "--out", str(out)], capsys)[0] == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _cli([*BASE, "--out", str(out)], capsys)  # a second run without --resume
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(files["checkpoint.pt"][: len(files["checkpoint.pt"]) // 2])  # truncated file
    files["checkpoint.pt"] = ckpt.read_bytes()
    code, err = _cli([*BASE, "--out", str(out), "--resume"], capsys)
    assert code == 2 and "cannot read checkpoint" in err and err.count("\n") == 1 and "Traceback" not in err
    ckpt.write_bytes(b"\x00" * 100)
    files["checkpoint.pt"] = ckpt.read_bytes()
    code, err = _cli([*BASE, "--out", str(out), "--resume"], capsys)
    assert code == 2 and "cannot read checkpoint" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_python_m_mabn_train_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mabn", "train", *BASE, "--norm-batch-size", "5", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mabn train: error: --norm-batch-size 5 does not divide --batch-size 32"


def test_accumulation_reproduces_the_large_batch_run(tmp_path):
    # 4 micro-batches of 8 with accumulation = one gradient batch of 32 with norm_batch_size 8: the same
    # statistics stream and the same gradients, up to the order of float sums.
    common = dict(
        norm="mabn", conv="centralized", norm_batch_size=8, norm_kwargs={"warmup_iters": 2, "renorm_warmup_iters": 3}
    )
    big = trainer.train(_config(tmp_path / "big", **common))
    acc = trainer.train(_config(tmp_path / "acc", accumulate=4, **common))
    a = torch.load(tmp_path / "big" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "acc" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert abs(big["final_train_loss"] - acc["final_train_loss"]) < 1e-4
    saved = json.loads((tmp_path / "acc" / "config.json").read_text())
    assert saved["model_config"]["norm_kwargs"]["accumulate"] == 4


def test_checkpointed_activations_train_the_same_weights(tmp_path):
    common = dict(norm="mabn", conv="centralized", norm_batch_size=2, epochs=1)
    plain = trainer.train(_config(tmp_path / "plain", **common))
    ckpt = trainer.train(_config(tmp_path / "ckpt", checkpoint_activations=True, **common))
    assert plain["param_digest"] == ckpt["param_digest"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--accumulate", "3"], "--accumulate 3 does not divide --batch-size 32"),
        (["--accumulate", "4", "--norm-batch-size", "16"], "--norm-batch-size 16 does not divide the micro-batch of 8"),
        (["--accumulate", "0"], "accumulate must be a positive integer, got 0"),
        (["--task", "segmentation"], "--task segmentation with --data synthetic"),
        (["--sync-norm", "--norm", "gn"], "--sync-norm does not apply to the per-sample"),
        (["--accumulate", "2", "--monitor-every", "2"], "cannot be used with --accumulate"),
    ],
)
def test_bad_step_options_are_one_line_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, err = _cli([*BASE, "--out", str(out), *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BN classifier checkpoint to fine-tune from."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    trainer.train(_config(out, epochs=1, width=8))
    return out / "checkpoint.pt"


@pytest.mark.parametrize(
    "opts",
    [
        {"norm": "mabn", "norm_batch_size": 2, "init_preserve": "function"},
        {"norm": "mabn", "norm_batch_size": 2, "init_preserve": "statistics", "conv": "centralized"},
        {"norm": "bn", "norm_batch_size": 2, "freeze_norm": True},
        {"norm": "bn", "norm_batch_size": 2, "recalibrate": 3},
    ],
)
def test_init_from_a_pretrained_classifier(tmp_path, pretrained, opts):
    from mabn.serialization import load_checkpoint, model_from_checkpoint

    config = _config(tmp_path / "ft", epochs=1, width=8, max_steps=1, lr=0.0, weight_decay=0.0, init=str(pretrained))
    config.update(opts)
    result = trainer.train(config)
    assert math.isfinite(result["error"])
    tuned = model_from_checkpoint(load_checkpoint(tmp_path / "ft" / "checkpoint.pt"))
    source = model_from_checkpoint(load_checkpoint(pretrained))
    # lr 0: the convolutions are the pretrained ones, whatever happened to the norms.
    torch.testing.assert_close(tuned.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    if opts.get("freeze_norm"):
        import mabn

        assert isinstance(tuned.bn1, mabn.FrozenBatchNorm2d)
        torch.testing.assert_close(tuned.bn1.running_var, source.bn1.running_var)
    if opts.get("recalibrate"):
        record = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["recalibrated_batches"] == 3


def test_init_function_preserving_starts_from_the_pretrained_error(tmp_path, pretrained):
    # One step at lr 0 changes only the running statistics: the function-preserving conversion's
    # first evaluation is close to the pretrained model's error, far from chance.
    source = json.loads((pretrained.parent / "result.json").read_text())
    config = _config(tmp_path / "ft", epochs=1, width=8, max_steps=1, lr=0.0, weight_decay=0.0)
    result = trainer.train({**config, "init": str(pretrained), "norm": "mabn", "norm_batch_size": 2})
    assert abs(result["error"] - source["error"]) < 15.0, (result["error"], source["error"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--freeze-norm"], "--freeze-norm freezes pretrained BatchNorms: it needs --init CKPT"),
        (["--init", "/nonexistent/ckpt.pt"], "checkpoint not found: /nonexistent/ckpt.pt"),
        (["--recalibrate", "0"], "recalibrate must be a positive integer, got 0"),
    ],
)
def test_bad_fine_tuning_options(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, err = _cli([*BASE, "--out", str(out), *argv], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_unknown_init_preserve_in_a_config():
    with pytest.raises(ValueError, match="unknown --init-preserve 'weights'; choose one of statistics, function"):
        trainer.check_config({"init_preserve": "weights"})


def test_init_that_does_not_fit_names_the_weight(tmp_path, capsys, pretrained):
    out = tmp_path / "out"
    code, err = _cli([*BASE, "--width", "4", "--out", str(out), "--init", str(pretrained)], capsys)
    assert code == 2 and "does not fit the model: conv1.weight is (8, 1, 3, 3) there, (4, 1, 3, 3) here" in err, err


@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_init_into_a_per_sample_norm_is_refused_under_function_preserving(tmp_path, capsys, pretrained, norm):
    # A per-sample norm cannot compute what the pretrained BatchNorms did: refused, naming the layer,
    # before anything is written (--init-preserve statistics is the explicit way to take the weights).
    out = tmp_path / "out"
    code, err = _cli([*BASE, "--width", "8", "--out", str(out), "--init", str(pretrained), "--norm", norm], capsys)
    assert code == 2 and "cannot keep the function of" in err and "BatchNorm2d" in err, err
    assert not out.exists()


def test_config_file_reruns_a_run(tmp_path, capsys):
    first = tmp_path / "a"
    assert _cli([*BASE, "--norm", "mabn", "--norm-batch-size", "2", "--out", str(first)], capsys)[0] == 0
    saved = json.loads((first / "config.json").read_text())["train"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(saved))
    assert _cli(["--config", str(path), "--out", str(tmp_path / "b"), "--threads", "1"], capsys)[0] == 0
    a = json.loads((first / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert a["param_digest"] == b["param_digest"] and b["config"]["norm"] == "mabn"
    code, err = _cli(["--config", str(path), "--norm", "gn", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--norm cannot be given with it" in err


def test_runs_written_before_a_key_existed_still_match():
    from mabn.apps.train.config import config_differences

    current = trainer.check_config({"data": "synthetic"})
    older = {k: v for k, v in current.items() if k not in ("init", "init_preserve", "freeze_norm", "recalibrate")}
    assert config_differences(older, current) == []
    assert config_differences(older, {**current, "freeze_norm": True}) == ["freeze_norm: False -> True"]


def _written_by_an_earlier_version(config):
    """``config`` in the keys and values of earlier versions: ``norm_opts``, ``conv: "none"``."""
    old = {("norm_opts" if key == "norm_kwargs" else key): value for key, value in config.items()}
    return {**old, "conv": "none"} if old["conv"] is None else old


def test_configurations_of_earlier_versions_still_load(tmp_path, capsys):
    kwargs = dict(norm="mabn", norm_batch_size=2, norm_kwargs={"warmup_iters": 2, "renorm_warmup_iters": 3})
    full = trainer.train(_config(tmp_path / "full", **kwargs))
    saved = json.loads((tmp_path / "full" / "config.json").read_text())["train"]
    assert saved["norm_kwargs"] == kwargs["norm_kwargs"] and saved["conv"] is None
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_written_by_an_earlier_version(saved)))
    # mabn train --config old.json, interrupted; its checkpoint rewritten as an earlier version wrote it.
    out = tmp_path / "split"
    assert _cli(["--config", str(old), "--out", str(out), "--stop-after", "1"], capsys)[0] == 0
    ckpt = _load(out / "checkpoint.pt")
    ckpt["config"] = _written_by_an_earlier_version(ckpt["config"])
    torch.save(ckpt, out / "checkpoint.pt")
    # ... then --resume: the same run, to the same weights.
    code, err = _cli(["--config", str(old), "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["param_digest"] == full["param_digest"]
    assert resumed["config"]["norm_kwargs"] == kwargs["norm_kwargs"] and "norm_opts" not in resumed["config"]
    with pytest.raises(ValueError, match="both 'norm_opts' .* and 'norm_kwargs'"):
        trainer.check_config({"norm_opts": {"window": 4}, "norm_kwargs": {"window": 8}})


def test_the_options_table_builds_the_parser_and_the_defaults():
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    assert trainer.config_from_args(parser.parse_args([])) == trainer.DEFAULTS
    options = {action.dest: action for action in parser._actions}
    assert set(trainer.DEFAULTS) - set(options) == {"momentum"}  # SGD's, fixed at 0.9: no option
    argv = ["--conv", "none", "--norm-opt", "r_max=3", "--window", "8", "--milestones", "2,3", "--monitor-layers",
            "a, b", "--sync-norm"]  # fmt: skip
    config = trainer.config_from_args(parser.parse_args(argv))
    assert config["conv"] is None and config["norm_kwargs"] == {"r_max": 3, "window": 8}
    assert config["milestones"] == [2.0, 3.0] and config["monitor_layers"] == ["a", "b"] and config["sync_norm"]
    assert trainer.config_from_args(parser.parse_args(["--conv", "centralized"]))["conv"] == "centralized"
    assert trainer.DEFAULTS["norm_kwargs"] == {}  # not shared with (and changed through) a configuration


@pytest.mark.slow  # two short training runs of a library's classifier and an ONNX export: 6-10 s
@pytest.mark.parametrize(
    "arch,conv", [("timm:test_efficientnet", "centralized"), ("torchvision:mobilenet_v3_small", None)]
)
def test_library_classifier_trains_from_a_batchnorm_checkpoint_folds_and_exports(tmp_path, capsys, arch, conv):
    from conftest import rel_error, run_onnx

    import mabn
    from mabn.serialization import load_checkpoint, model_from_checkpoint

    # The synthetic data: 1 channel, 4 classes, 12 x 12 images; 64 of them make 4 steps of 16.
    common = dict(arch=arch, conv=conv, width=None, epochs=1, batch_size=16, limit_train=64, limit_test=32)
    trainer.train(_config(tmp_path / "bn", norm="bn", **common))
    pretrained = model_from_checkpoint(load_checkpoint(tmp_path / "bn" / "checkpoint.pt"))
    init = str(tmp_path / "bn" / "checkpoint.pt")
    capsys.readouterr()
    result = trainer.train(_config(tmp_path / "mabn", norm="mabn", norm_batch_size=2, init=init, max_steps=2, **common))
    assert f"initialized the model from {init} (norms as mabn (function))" in capsys.readouterr().out
    assert math.isfinite(result["final_train_loss"]) and result["steps"] == 2
    assert abs(result["error_folded"] - result["error"]) <= 100.0 / 32 + 1e-9  # one prediction may flip
    model = model_from_checkpoint(load_checkpoint(tmp_path / "mabn" / "checkpoint.pt"))
    # Every BatchNorm of the library's model is MABN now, and trained 2 steps; its convolutions as --conv.
    norms = [m for m in model.modules() if mabn.is_norm_layer(m)]
    assert norms and all(type(m) is mabn.MABN2d and m.config.norm_batch_size == 2 for m in norms)
    assert all(int(m.num_batches_tracked) == 2 for m in norms)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, mabn.CenConv2d) == (conv == "centralized") for m in convs)
    assert convs[0].in_channels == 1 and model(torch.randn(2, 1, 12, 12)).shape == (2, 4)
    first = next(m for m in pretrained.modules() if isinstance(m, torch.nn.Conv2d))
    assert not torch.equal(convs[0].weight, first.weight)  # the BatchNorm run's weights, trained 2 steps
    # Folding merges every norm into its convolution; the export writes and checks plain layers.
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
        folded, report = mabn.fold(model, return_report=True)
        assert len(report.folded) == len(norms) and not report.unfolded, str(report)
        assert rel_error(folded(x), expected) < 1e-4
    onnx = tmp_path / "model.onnx"
    assert cli.main(["export", str(tmp_path / "mabn" / "checkpoint.pt"), "-o", str(onnx), "--image-size", "16"]) == 0
    assert arch in capsys.readouterr().out
    assert rel_error(run_onnx(onnx, x), expected) < 1e-4


@pytest.mark.parametrize(
    "arch,message",
    [
        ("keras:resnet50", "unknown --arch 'keras:resnet50': the library must be one of timm, torchvision"),
        ("timm:resnet50dd", "timm has no classifier 'resnet50dd'; did you mean timm:resnet50d"),
        ("torchvision:mobilnet_v3_large", "did you mean torchvision:mobilenet_v3_large"),
        ("torchvision:fcos_resnet50_fpn", "'torchvision:fcos_resnet50_fpn' is not a classifier"),
        ("torchvision:squeezenet1_0", "has no BatchNorm for norm 'mabn' to replace (its normalization: none)"),
    ],
)
def test_bad_library_arch_is_a_one_line_error(tmp_path, capsys, arch, message):
    out = tmp_path / "out"
    data = ["--data", "synthetic", "--limit-train", "64", "--limit-test", "32", "--epochs", "1"]
    code, err = _cli([*data, "--out", str(out), "--arch", arch, "--norm", "mabn"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
