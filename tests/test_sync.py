"""Synced statistics over 2 and 3 processes on gloo (CPU): the scenarios are in sync_worker.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mabn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_synced_layers_equal_one_process_on_the_whole_batch(tmp_path, world):
    import sync_worker

    # Every scenario in one launch per world size: BN == nn.BatchNorm2d on the concatenated batch
    # (outputs, gradients, buffers), MABN/BRN/centered-SMA == one process at norm_batch_size R * B
    # step for step, a zero-sample rank, disagreeing ranks raising, convert_model(process_group=...).
    mp.spawn(sync_worker.run, args=(world, str(tmp_path / "init"), "all"), nprocs=world, join=True)


def test_one_rank_is_exactly_the_unsynced_layer(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        synced = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=1, process_group=dist.group.WORLD)
        plain = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=1)
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5)
            assert torch.equal(synced(x), plain(x))
        for key, value in plain.state_dict().items():
            assert torch.equal(synced.state_dict()[key], value), key
    finally:
        dist.destroy_process_group()


def test_process_group_without_init_is_a_clear_error():
    layer = mabn.MABN2d(3, process_group=object())
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        layer(torch.randn(2, 3, 4, 4))
