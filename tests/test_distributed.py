"""torchrun with two CPU processes: DistributedDataParallel over gloo keeps the replicas identical;
what DistributedDataParallel's buffer broadcast does to the layers' statistics."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mabn.apps.train import STATS_LOG
from mabn.monitor import read_stats_log

pytestmark = pytest.mark.slow  # torchrun: two processes, each importing torch and training


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_torchrun_two_processes_end_with_identical_parameters(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mabn", "train", "--data", "synthetic", "--limit-train", "192", "--limit-test", "64",
        "--width", "4", "--epochs", "1", "--norm", "mabn", "--norm-batch-size", "2", "--conv", "centralized",
        "--threads", "1", "--device", "cpu", "--out", str(out), "--monitor-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 192 samples over 2 processes of 32: 3 steps each, logged once (by rank 0).
    assert proc.stdout.count("epoch 1/1") == 1 and "2 process(es)" in proc.stdout
    params0, buffers0 = (out / "params-rank0.sha256").read_text().split()
    params1, buffers1 = (out / "params-rank1.sha256").read_text().split()
    assert params0 == params1  # gradients are all-reduced: the replicas stay identical
    assert buffers0 != buffers1  # each process keeps the normalization statistics of its own batches
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["param_digest"] == params0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["steps"] == 3
    # Rank 0 monitors its own replica and writes the log: one record per layer, statistic and step.
    records = read_stats_log(out / STATS_LOG)
    assert sorted({r["step"] for r in records}) == [1, 2, 3] and {r["groups"] for r in records} == {16}


def _torchrun(out, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mabn", "train", "--data", "synthetic", "--limit-train", "128", "--limit-test", "32",
        "--width", "4", "--epochs", "2", "--batch-size", "16", "--norm", "mabn", "--norm-batch-size", "4",
        "--conv", "centralized", "--sync-norm", "--norm-opt", "warmup_iters=2", "--norm-opt", "renorm_warmup_iters=3",
        "--threads", "1", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_sync_norm_keeps_every_buffer_identical_and_resumes_bit_identically(tmp_path):
    full = _torchrun(tmp_path / "full")
    assert "synced" in full.stdout
    params0, buffers0 = (tmp_path / "full" / "params-rank0.sha256").read_text().split()
    params1, buffers1 = (tmp_path / "full" / "params-rank1.sha256").read_text().split()
    assert params0 == params1 and buffers0 == buffers1  # synced statistics: the windows agree on every rank
    _torchrun(tmp_path / "split", "--stop-after", "1")
    _torchrun(tmp_path / "split", "--resume")
    assert (tmp_path / "split" / "params-rank0.sha256").read_text() == (
        tmp_path / "full" / "params-rank0.sha256"
    ).read_text()
    a = json.loads((tmp_path / "full" / "result.json").read_text())
    b = json.loads((tmp_path / "split" / "result.json").read_text())
    assert a["param_digest"] == b["param_digest"] and a["error"] == b["error"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_buffer_broadcast_replaces_unsynced_statistics_and_leaves_synced_ones(tmp_path):
    import ddp_worker

    # Two processes, each checking, for DDP's default, broadcast_buffers=True/False and
    # forward_sync_buffers=False: an unsynced MABN on rank 1 holds rank 0's windows plus its own last
    # groups (with a broadcast) or exactly its own stream (without); a synced MABN is identical on
    # both ranks and bit-identical across the modes (ddp_worker.py).
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
