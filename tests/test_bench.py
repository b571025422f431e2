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
