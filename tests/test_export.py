"""export_model and the `mabn export` command: ONNX in onnxruntime, TorchScript, errors, no side effects."""

import argparse
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_unchanged, calibrate, run_onnx, snapshot
from torch.testing import assert_close

import mabn
from mabn import models
from mabn.apps import cli

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

CONFIG = {
    "arch": "resnet_small",
    "num_classes": 10,
    "in_channels": 1,
    "norm": "mabn",
    "norm_kwargs": {"norm_batch_size": 2},
    "conv": "centralized",
    "depth": 1,
    "width": 8,
}


@pytest.fixture
def trained():
    model = models.build_model(CONFIG)
    return calibrate(model, torch.randn(4, 1, 28, 28))


def test_onnx_runs_in_onnxruntime_and_matches(trained, tmp_path):
    snap = snapshot(trained)
    path = mabn.export_model(trained, tmp_path / "model.onnx", "onnx", torch.randn(1, 1, 28, 28))
    assert_unchanged(trained, snap)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded: no normalization left
    for batch in (1, 3):  # the batch dimension is symbolic
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = trained(x)
        assert_close(run_onnx(path, x), expected, rtol=1e-4, atol=1e-4)


def test_torchscript_matches(trained, tmp_path):
    snap = snapshot(trained)
    path = mabn.export_model(trained, tmp_path / "model.pt", "torchscript", input_shape=(2, 1, 28, 28))
    assert_unchanged(trained, snap)
    loaded = torch.jit.load(str(path))
    names = {m.original_name for m in loaded.modules()}
    assert "Conv2d" in names and not names & {"MABN2d", "CenConv2d", "CenLinear", "BatchNorm2d"}
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert_close(loaded(x), trained(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_training_model(tmp_path):
    model = models.build_model(CONFIG)
    snap = snapshot(model)
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ValueError, match="export needs a model in evaluation mode"):
            mabn.export_model(model, tmp_path / "m", fmt, input_shape=(1, 1, 28, 28))
    assert_unchanged(model, snap)
    assert not (tmp_path / "m").exists()


def test_export_bad_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        mabn.export_model(trained, tmp_path / "m", "tflite", input_shape=(1, 1, 28, 28))
    with pytest.raises(ValueError, match="example_input .* or input_shape"):
        mabn.export_model(trained, tmp_path / "m", "torchscript")
    with pytest.raises(ValueError, match="input_shape must be positive ints"):
        mabn.export_model(trained, tmp_path / "m", "torchscript", input_shape=(1, 0, 28, 28))


def _checkpoint(path, model, config=CONFIG, **extra):
    ckpt = {"format": "mabn-checkpoint", "version": 1, "model_config": config, "model": model.state_dict(),
            "epoch": 3, "optimizer": {"state": {}, "param_groups": []}, **extra}  # fmt: skip
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_cli_exports_a_checkpoint(trained, tmp_path, capsys, fmt):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", trained)
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", str(ckpt), "--format", fmt, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({fmt}, resnet_small, input 1x1x28x28" in printed
    assert "max abs difference to the PyTorch model" in printed
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = trained.eval()(x)
        got = run_onnx(out, x) if fmt == "onnx" else torch.jit.load(str(out))(x)
    assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cli_input_shape_defaults_and_options():
    from mabn.apps.export import default_input_shape

    assert default_input_shape(CONFIG) == (1, 1, 28, 28)
    assert default_input_shape({**CONFIG, "in_channels": 3}) == (1, 3, 32, 32)
    assert default_input_shape({"arch": "resnet50"}, 8) == (8, 3, 224, 224)
    assert default_input_shape({"arch": "resnet18", "in_channels": 1}, 2, 64) == (2, 1, 64, 64)
    parser = argparse.ArgumentParser()
    mabn.apps.export.add_arguments(parser)
    args = parser.parse_args(["c.pt", "-o", "m.onnx"])
    assert (args.format, args.batch_size, args.image_size, args.static_batch) == ("onnx", 1, None, False)


def _cli_error(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_missing_and_unreadable_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    err = _cli_error(["export", str(tmp_path / "nope.pt"), "-o", out], capsys)
    assert "checkpoint not found" in err and "nope.pt" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert "cannot read checkpoint" in _cli_error(["export", str(garbage), "-o", out], capsys)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "cannot read checkpoint" in _cli_error(["export", str(empty), "-o", out], capsys)
    assert "is a directory" in _cli_error(["export", str(tmp_path), "-o", out], capsys)
    plain = tmp_path / "state_dict.pt"
    torch.save(models.build_model(CONFIG).state_dict(), plain)
    assert "is not a mabn checkpoint" in _cli_error(["export", str(plain), "-o", out], capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_checkpoint_that_does_not_fit_its_config(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "c.pt", models.build_model(CONFIG), {**CONFIG, "width": 16})
    err = _cli_error(["export", str(ckpt), "-o", str(tmp_path / "m.pt"), "--format", "torchscript"], capsys)
    assert "do not fit its model_config" in err
    ckpt = _checkpoint(tmp_path / "d.pt", models.build_model(CONFIG), {**CONFIG, "arch": "vgg"})
    assert "unknown arch 'vgg'" in _cli_error(["export", str(ckpt), "-o", str(tmp_path / "m.pt")], capsys)


def test_cli_untrusted_objects_need_trust(trained, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "c.pt", trained, args=argparse.Namespace(lr=0.1), rng=np.random.get_state())
    out = tmp_path / "m.pt"
    err = _cli_error(["export", str(ckpt), "-o", str(out), "--format", "torchscript"], capsys)
    assert "--trust-checkpoint" in err
    assert cli.main(["export", str(ckpt), "-o", str(out), "--format", "torchscript", "--trust-checkpoint"]) == 0
    assert out.exists()


def test_cli_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mabn", "export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"mabn export: error: checkpoint not found: {tmp_path / 'missing.pt'}"


@pytest.mark.slow
def test_cli_exports_a_segmentation_checkpoint_with_dynamic_sizes(tmp_path, capsys, fashion_mnist_dir):
    from mabn.apps import train as trainer

    out = tmp_path / "run"
    trainer.train({"data": "fashion-scenes", "limit_train": 32, "limit_test": 16, "width": 8, "norm": "mabn",
                   "norm_batch_size": 2, "conv": "centralized", "batch_size": 16, "epochs": 1, "threads": 1,
                   "out": str(out)})  # fmt: skip
    capsys.readouterr()
    assert cli.main(["export", str(out / "checkpoint.pt"), "-o", str(tmp_path / "seg.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "height and width dynamic" in printed
    errors = [float(line.rsplit(": ", 1)[1]) for line in printed.splitlines() if "max abs difference" in line]
    assert len(errors) == 3 and max(errors) < 1e-4, printed
    assert cli.main(["export", str(out / "checkpoint.pt"), "-o", str(tmp_path / "s.pt"), "--format", "torchscript",
                     "--dynamic-spatial"]) == 2  # fmt: skip
    assert "--dynamic-spatial applies to --format onnx only" in capsys.readouterr().err
