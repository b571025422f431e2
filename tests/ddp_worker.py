"""Code run by each process of tests/test_distributed.py's DDP-buffer test (a module of its own so that
spawned processes can import it).

Each rank trains (forward and backward, weights fixed so that every statistic can be recomputed in
one process) a model with two independent branches: a conv and an unsynced MABN, a conv and a synced
MABN, under DistributedDataParallel with each way of setting its buffer broadcast. Every rank
generates every rank's batches from a shared seed, so it can replay any rank's stream alone.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import mabn

STEPS = 4
#: DistributedDataParallel's keywords, and whether they broadcast rank 0's buffers before each forward.
MODES = {
    "default": ({}, True),
    "broadcast_buffers=True": ({"broadcast_buffers": True}, True),
    "broadcast_buffers=False": ({"broadcast_buffers": False}, False),
    "forward_sync_buffers=False": ({"forward_sync_buffers": False}, False),
}


class TwoBranches(nn.Module):
    """conv -> unsynced MABN and conv -> synced MABN on the same input, pooled and summed: the gradient
    reaching each branch is the loss's own, so each branch's statistics depend on its input only."""

    def __init__(self, group: object | None) -> None:
        super().__init__()
        kw = dict(norm_batch_size=2, window=3, warmup_iters=1, renorm_warmup_iters=2)  # SMA live from step 2
        self.local = nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4, **kw))
        self.synced = nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4, process_group=group, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x).mean((2, 3)) + self.synced(x).mean((2, 3))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s input and loss weights at ``step``: different on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 6, 6, generator=g) * (1 + rank) + rank, torch.randn(4, 4, generator=g)


def _replay(branch: nn.Module, stream: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The buffers of a copy of ``branch`` after training on the batches ``(step, rank)`` of ``stream``."""
    branch = copy.deepcopy(branch)
    for step, rank in stream:
        x, w = _batch(step, rank)
        (branch(x).mean((2, 3)) * w).sum().backward()
    return {k: v.clone() for k, v in branch.named_buffers()}


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


def _same_on_every_rank(buffers: dict[str, torch.Tensor], world: int) -> bool:
    flat = torch.cat([v.double().flatten() for v in buffers.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _train(kwargs: dict, rank: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)  # the same initial weights and buffers on every rank
    model = TwoBranches(dist.group.WORLD)
    initial = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.13 deprecates broadcast_buffers
        net = nn.parallel.DistributedDataParallel(model, **kwargs)
    for step in range(STEPS):
        x, w = _batch(step, rank)
        (net(x) * w).sum().backward()  # gradients all-reduced; no optimizer step: the weights stay fixed
    return net, initial


def _check(name: str, kwargs: dict, broadcasts: bool, rank: int, world: int) -> dict[str, torch.Tensor]:
    net, initial = _train(kwargs, rank)
    local = _buffers(net.module.local)
    alone = _replay(initial.local, [(s, rank) for s in range(STEPS)])
    if not broadcasts or rank == 0:
        for key, value in alone.items():  # each rank keeps the statistics of its own batches
            assert_close(local[key], value, rtol=0, atol=0, msg=f"{name}: local {key}")
    else:
        # Before each forward rank 0's buffers replace this rank's: its windows hold rank 0's history
        # and its own last groups, never what it would hold alone.
        expected = _replay(initial.local, [(s, 0) for s in range(STEPS - 1)] + [(STEPS - 1, rank)])
        for key, value in expected.items():
            assert_close(local[key], value, rtol=0, atol=0, msg=f"{name}: local {key}")
        assert not torch.equal(local["1.forward_window"], alone["1.forward_window"]), name
        assert not torch.equal(local["1.running_var"], alone["1.running_var"]), name
    # One more forward (evaluation, as at the end of an epoch): a broadcast makes every rank rank 0.
    net.eval()
    with torch.no_grad():
        net(_batch(STEPS, rank)[0])
    assert _same_on_every_rank(_buffers(net.module.local), world) == broadcasts, name
    # Synced windows are identical on every rank either way: the broadcast copies equal values.
    synced = _buffers(net.module.synced)
    assert _same_on_every_rank(synced, world), f"{name}: synced"
    return synced


def run(rank: int, world: int, init_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        synced = {}
        for name, (kwargs, broadcasts) in MODES.items():
            try:
                synced[name] = _check(name, kwargs, broadcasts, rank, world)
            except Exception as exc:
                raise AssertionError(f"DDP {name} on rank {rank} of {world}: {exc}") from exc
            dist.barrier()
        # ... and bit-identical whether broadcast or not.
        for name, buffers in synced.items():
            for key, value in buffers.items():
                assert torch.equal(value, synced["broadcast_buffers=False"][key]), f"{name}: synced {key}"
    finally:
        dist.destroy_process_group()
