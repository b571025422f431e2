"""The demo and the command-line entry point."""

import pytest

from mabn.apps.cli import main


@pytest.mark.slow
def test_demo_trains_and_reports_test_error(capsys, fashion_mnist_dir):
    assert main(["demo", "--steps", "150"]) == 0
    out = capsys.readouterr().out
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]
    error = float(out.split("test error:")[1].split("%")[0])
    assert 0.0 <= error < 60.0  # far below chance (90 %) after 150 steps


def test_demo_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["demo", "--norm-batch-size", "5"]) == 2
    assert "does not divide --batch-size 32" in capsys.readouterr().err
    assert main(["demo", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1
