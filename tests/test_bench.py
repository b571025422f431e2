"""``mabn bench``: the benchmark CLI runs and the memory claim (saved tensors) holds."""

import re

import pytest
import torch
from torch import nn

import mabn
from mabn.apps.bench import saved_bytes
from mabn.apps.cli import main


@pytest.mark.parametrize(
    "make",
    [
        lambda c: mabn.MABN2d(c, warmup_iters=1, renorm_warmup_iters=1),
        lambda c: mabn.MABN2d(c, norm_batch_size=2, warmup_iters=1, renorm_warmup_iters=1),
        lambda c: mabn.GhostBatchNorm2d(c, norm_batch_size=2),
        lambda c: mabn.BatchRenorm2d(c, renorm_warmup_iters=1),
    ],
)
def test_saved_for_backward_is_the_input_plus_per_channel_vectors(make):
    x = torch.randn(8, 4, 16, 16)
    layer = make(4)
    for _ in range(2):  # past the warm-ups
        layer(x.requires_grad_()).sum().backward()
    reference = saved_bytes(nn.BatchNorm2d(4), x)
    ours = saved_bytes(layer, x)
    assert reference >= x.numel() * 4
    # The input (one full-size tensor) plus vectors of at most (rows, groups, channels) floats.
    assert ours <= x.numel() * 4 + 4 * 4 * 4 * 4 + 1024, (ours, reference)


def test_bench_layers_prints_ratios(capsys):
    assert main(["bench", "layers", "--shapes", "4x8x6x6", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("4x8x6x6")]
    assert len(rows) == 2  # contiguous and channels_last
    for row in rows:
        ratios = re.findall(r"(\d+\.\d+)x", row)
        assert len(ratios) == 4 and all(float(r) > 0 for r in ratios)


def test_bench_bad_shapes_is_a_one_line_error(capsys):
    assert main(["bench", "layers", "--shapes", "4x8x6"]) == 2
    err = capsys.readouterr().err
    assert "--shapes expects comma-separated NxCxHxW" in err and err.count("\n") == 1


def test_bench_small_writes_the_table_and_summary(tmp_path, capsys):
    out = tmp_path / "small.md"
    argv = ["bench", "small", "--shapes", "1x32x4x4,2x32x4x4", "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert "mabn bench small --repeats 1 --threads 1 --shapes 1x32x4x4,2x32x4x4" in text
    rows = [line for line in text.splitlines() if re.match(r"\| [12]x32x4x4 \|", line)]
    assert [row.split(" | ")[1] for row in rows] == ["contiguous", "channels_last"] * 2
    for row in rows:  # BN ms, then one positive ratio per layer
        cells = row.strip("| ").split(" | ")[2:]
        assert len(cells) == 7 and all(float(c) > 0 for c in cells)
    for layer in ("MABN2d", "MABN2d composed", "GhostBN2d", "BatchRenorm2d", "FrozenBN2d", "GroupNorm(32)"):
        (line,) = [s for s in text.splitlines() if s.startswith(f"- {layer} / BatchNorm2d, N = 1, 2, 1 shapes:")]
        found = re.search(r"contiguous ([\d.]+)-([\d.]+)x \(median ([\d.]+)x, max at ([\dx]+)\)", line)
        low, high, median = map(float, found.groups()[:3])
        assert low <= median <= high and found.group(4) in ("1x32x4x4", "2x32x4x4") and "channels_last" in line
    assert text.splitlines()[-1].removeprefix("- ") in capsys.readouterr().out  # also printed


def test_norm_input_shapes_of_the_workloads():
    from mabn.apps.bench import norm_input_shapes, workload_shapes

    shapes = workload_shapes()
    assert len(shapes) == len(set(shapes))
    assert all(len(s) == 3 and s[0] % 32 == 0 for s in shapes)  # GroupNorm(32, C) is valid for each
    # ResNet-50 at 224 px: the stem at stride 2, the last stage at stride 32; the FPN at 512 px likewise.
    assert (64, 112, 112) in shapes and (2048, 7, 7) in shapes
    assert (64, 256, 256) in shapes and (2048, 16, 16) in shapes
    # The hooks see what a real forward sees, on the meta device as on the CPU.
    model = mabn.models.resnet_small(width=8)
    real = norm_input_shapes(model, torch.randn(2, 1, 20, 20))
    assert real[0] == (8, 20, 20) and len(real) == len(set(real))
    with torch.device("meta"):
        meta_model = mabn.models.resnet_small(width=8)
        meta = norm_input_shapes(meta_model, torch.empty(2, 1, 20, 20))
    assert meta == real


def test_step_workloads_build_the_grid_rows():
    from mabn.apps.bench import STEP_ROWS, STEP_WORKLOADS, set_past_warmup

    def layers(model):
        norms = {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, mabn.StreamNorm))}
        convs = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, nn.ConvTranspose2d)}
        return norms, convs

    for key, groups in (("segmentation", 8), ("detection", 8), ("resnet50-160", 32)):
        workload = STEP_WORKLOADS[key]()
        assert tuple(workload.models) == STEP_ROWS
        models = {label: set_past_warmup(build()) for label, build in workload.models.items()}
        assert layers(models["BN(2)"]) == ({nn.BatchNorm2d}, {nn.Conv2d})
        norms, convs = layers(models["MABN(2)+WC"])
        # (the detector's prediction convolutions, with no norm after them, stay plain)
        assert norms == {mabn.MABN2d} and mabn.CenConv2d in convs and convs <= {mabn.CenConv2d, nn.Conv2d}
        assert layers(models["MABN(2), no WC"]) == ({mabn.MABN2d}, {nn.Conv2d})
        assert layers(models["GN"]) == ({nn.GroupNorm}, {nn.Conv2d})
        assert {m.num_groups for m in models["GN"].modules() if isinstance(m, nn.GroupNorm)} == {groups}
        mabn_layers = [m for m in models["MABN(2)+WC"].modules() if isinstance(m, mabn.MABN2d)]
        assert all(m.norm_batch_size == 2 and m.warmup_iters == 2 for m in mabn_layers)
        x, target = workload.make_batch()
        assert x.shape[0] == len(target) == 2
        loss = workload.loss(models["MABN(2)+WC"], (x, target))
        assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.slow
def test_bench_step_segmentation_eager(tmp_path):
    out = tmp_path / "step.md"
    argv = ["bench", "step", "--workloads", "segmentation", "--no-compile", "--repeats", "1", "--threads", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    row, first = [line for line in out.read_text().splitlines() if line.startswith("| segmentation")]
    cells = row.strip("| ").split(" | ")
    assert cells[1] == "eager" and len(cells) == 6 and all(float(c) > 0 for c in cells[2:])
    assert all(float(c) > 0 for c in first.strip("| ").split(" | ")[2:])  # the first steps' seconds


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "small", "--batches", "1,x"], "--batches expects comma-separated positive integers"),
        (["bench", "step", "--workloads", "retinanet"], "--workloads takes segmentation, detection, resnet50-160"),
        (["bench", "small", "--out", "/nonexistent-dir/small.md"], "its directory does not exist"),
    ],
)
def test_bench_bad_options_fail_before_running(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
