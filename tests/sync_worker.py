"""Code run by each process of tests/test_sync.py (a module of its own so that spawned processes can import it).

Every rank builds the same inputs from a shared seed, runs its share through a synced layer and
compares with what one process computes on the whole batch.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import mabn

F64 = torch.float64


def run(rank: int, world: int, init_file: str, scenario: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in SCENARIOS if scenario == "all" else [scenario]:
            try:
                SCENARIOS[name](rank, world)
            except Exception as exc:
                raise AssertionError(f"scenario {name} on rank {rank} of {world}: {exc}") from exc
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _bn_equals_torch_batchnorm(rank: int, world: int) -> None:
    """Synced ghost BN (B = N) over the ranks is nn.BatchNorm2d on the concatenated batch."""
    sizes = [2, 3, 1, 4][:world]
    for momentum in (0.1, None):
        torch.manual_seed(0)
        ref = nn.BatchNorm2d(4, momentum=momentum, dtype=F64)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        ours = mabn.GhostBatchNorm2d(4, momentum=momentum, process_group=dist.group.WORLD, dtype=F64)
        ours.load_state_dict(ref.state_dict())
        for step in range(4):
            x = torch.randn(sum(sizes), 4, 5, 3, dtype=F64) * (1 + step) + step
            w = torch.randn_like(x)
            start = sum(sizes[:rank])
            part = slice(start, start + sizes[rank])
            xr = x.clone().requires_grad_()
            yr = ref(xr)
            (yr * w).sum().backward()
            xl = x[part].clone().requires_grad_()
            y = ours(xl)
            (y * w[part]).sum().backward()
            assert_close(y, yr.detach()[part])
            assert_close(xl.grad, xr.grad[part])
            grads = torch.stack([ours.weight.grad, ours.bias.grad])
            dist.all_reduce(grads)  # the affine gradients are each rank's own: their sum is the whole batch's
            assert_close(grads[0], ref.weight.grad)
            assert_close(grads[1], ref.bias.grad)
            ours.zero_grad()
            ref.zero_grad()
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(getattr(ours, key), getattr(ref, key), msg=key)
        ref.eval()
        ours.eval()
        x = torch.randn(3, 4, 5, 3, dtype=F64)
        assert_close(ours(x), ref(x))


def _interleave(x: torch.Tensor, world: int, b: int) -> torch.Tensor:
    """The batch one process sees: the g-th group of every rank, rank after rank, for each g."""
    groups = x.shape[0] // (world * b)
    per_rank = x.view(world, groups, b, *x.shape[1:])
    return per_rank.transpose(0, 1).reshape(x.shape)


def _mabn_equals_one_process(rank: int, world: int) -> None:
    """Synced MABN over R ranks of B samples is one process at norm_batch_size R * B, step for step."""
    b, groups = 2, 2
    for preset in ("mabn", "bn_ema_sma", "brn"):
        torch.manual_seed(2)
        kw = dict(window=4, warmup_iters=3, renorm_warmup_iters=5, r_max=1.5, d_max=0.5)
        single = mabn.GeneralBatchNorm2d.from_preset(preset, 3, norm_batch_size=world * b, **kw, dtype=F64)
        with torch.no_grad():
            single.weight.uniform_(0.5, 1.5)
        synced = mabn.GeneralBatchNorm2d.from_preset(
            preset, 3, norm_batch_size=b, process_group=dist.group.WORLD, **kw, dtype=F64
        )
        synced.load_state_dict(single.state_dict())
        for step in range(10):  # across the warm-up (3) and the renorm warm-up (5)
            x = torch.randn(world * groups * b, 3, 4, 4, dtype=F64) * (1 + step % 3) + 0.1 * step
            w = torch.randn_like(x)
            mine = x.view(world, groups * b, *x.shape[1:])[rank]
            w_mine = w.view(world, groups * b, *x.shape[1:])[rank]
            xs = _interleave(x, world, b).clone().requires_grad_()
            ys = single(xs)
            (ys * _interleave(w, world, b)).sum().backward()
            xl = mine.clone().requires_grad_()
            y = synced(xl)
            (y * w_mine).sum().backward()
            # Rank r's g-th group sits at position (g, r) of the interleaved batch.
            ys_by_rank = ys.detach().view(groups, world, b, *x.shape[1:])[:, rank].reshape(mine.shape)
            dx_by_rank = xs.grad.view(groups, world, b, *x.shape[1:])[:, rank].reshape(mine.shape)
            assert_close(y, ys_by_rank, msg=f"{preset} step {step}")
            assert_close(xl.grad, dx_by_rank, msg=f"{preset} step {step}")
            for key, value in single.state_dict().items():
                assert_close(synced.state_dict()[key], value, msg=f"{preset} step {step}: {key}")
        # The windows are identical on every rank.
        windows = torch.cat([v.flatten() for k, v in synced.state_dict().items() if v.is_floating_point()])
        gathered = [torch.empty_like(windows) for _ in range(world)]
        dist.all_gather(gathered, windows)
        assert all(torch.equal(g, gathered[0]) for g in gathered)


def _zero_sample_rank(rank: int, world: int) -> None:
    """A rank with no samples contributes nothing, still joins the collectives and keeps the same buffers."""
    sizes = [3, 0, 2][:world]
    torch.manual_seed(3)
    single = mabn.MABN2d(3, window=4, warmup_iters=2, renorm_warmup_iters=2, dtype=F64)
    synced = copy.deepcopy(single)
    synced.process_group = dist.group.WORLD
    for _ in range(5):
        x = torch.randn(sum(sizes), 3, 4, 4, dtype=F64)
        w = torch.randn_like(x)
        xs = x.clone().requires_grad_()
        (single(xs) * w).sum().backward()
        start = sum(sizes[:rank])
        part = slice(start, start + sizes[rank])
        xl = x[part].clone().requires_grad_()
        y = synced(xl)
        (y * w[part]).sum().backward()
        assert y.shape[0] == sizes[rank]
        if sizes[rank]:
            assert_close(xl.grad, xs.grad[part])
        for key, value in single.state_dict().items():
            assert_close(synced.state_dict()[key], value, msg=key)


def _mismatch_is_an_error(rank: int, world: int) -> None:
    """Ranks that disagree on the layer (channels here) raise instead of mixing statistics."""
    layer = mabn.MABN2d(3 + rank, process_group=dist.group.WORLD)
    try:
        layer(torch.randn(2, 3 + rank, 4, 4))
    except RuntimeError as exc:
        assert "disagree" in str(exc), exc
    else:
        raise AssertionError("no error for ranks with different channel counts")
    # A different number of groups per call is caught the same way.
    layer = mabn.MABN2d(3, norm_batch_size=2, process_group=dist.group.WORLD)
    try:
        layer(torch.randn(2 * (rank + 1), 3, 4, 4))
    except RuntimeError as exc:
        assert "disagree" in str(exc), exc
    else:
        raise AssertionError("no error for ranks with different numbers of groups")


def _convert_model_syncs(rank: int, world: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = mabn.convert_model(model, "mabn", norm_batch_size=2, process_group=dist.group.WORLD)
    assert model[1].process_group is dist.group.WORLD and "synced" in repr(model[1])
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    bn = mabn.convert_model(nn.Sequential(nn.BatchNorm2d(4)), "bn", process_group=dist.group.WORLD)
    assert isinstance(bn[0], mabn.GhostBatchNorm2d) and bn[0].process_group is not None


def _one_value_per_channel_is_an_error(rank: int, world: int) -> None:
    """A centered group whose union over the ranks holds one value per channel raises on every rank,
    as the same group in one process does, and leaves every buffer as it was."""
    layer = mabn.GhostBatchNorm2d(3, process_group=dist.group.WORLD)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1 if rank == 0 else 0, 3, 1, 1)  # one value per channel in the whole union
    try:
        layer(x)
    except ValueError as exc:
        assert "more than 1 value per channel" in str(exc) and "process group" in str(exc), exc
    else:
        raise AssertionError("no error for a union of one value per channel")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Two values over the ranks are enough, even though every rank alone has at most one.
    layer(torch.randn(1 if rank < 2 else 0, 3, 1, 1))


SCENARIOS = {
    "bn_equals_torch_batchnorm": _bn_equals_torch_batchnorm,
    "mabn_equals_one_process": _mabn_equals_one_process,
    "zero_sample_rank": _zero_sample_rank,
    "mismatch_is_an_error": _mismatch_is_an_error,
    "convert_model_syncs": _convert_model_syncs,
    "one_value_per_channel_is_an_error": _one_value_per_channel_is_an_error,
}
