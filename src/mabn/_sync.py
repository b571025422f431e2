"""Statistics of a normalization group spread over the ranks of a process group (synced layers).

Each rank contributes its per-group, per-channel sums and sample counts; one ``all_reduce`` (SUM) of
one packed float64 vector per layer call and direction turns them into the statistics of the union.

Checks. The vector also carries a fingerprint ``[f, f^2]`` of the call (channels, groups,
configuration and call count): when every rank sent the same ``f`` the sums are ``R f`` and
``R f^2``, otherwise the ranks disagree and the layer raises instead of mixing statistics. Reading
the result is free for CPU tensors (gloo has already waited), so it happens on every CPU call; on
other devices only on the layer's first training call. The first call also runs a separate
two-number collective before the statistics, because a collective whose vectors differ in size
(ranks with different channel or group counts) is not an error gloo reports but an abort (and a
hang on NCCL). Not detected: two layers of identical configuration swapped at the same call count,
and vectors of different sizes after the first call (a rank whose batch makes a different number of
groups: keep the per-rank batch size equal, as ``DistributedSampler(drop_last=True)`` does).
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from ._stream import cached
from .config import NormConfig

__all__ = ["world_size", "fingerprint", "reduce_forward", "reduce_backward"]


def world_size(process_group: object) -> int:
    """Ranks in ``process_group``; a clear error when the default process group does not exist."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "a layer with process_group set needs an initialized process group "
            "(torch.distributed.init_process_group, or run under torchrun)"
        )
    return dist.get_world_size(process_group)


def fingerprint(num_features: int, groups: int, config: NormConfig) -> int:
    """A small integer identifying the layer call's shape and configuration (equal on matching ranks)."""
    text = f"{num_features}|{groups}|{config.structure}|{config.norm_batch_size}|{config.window}"
    return zlib.crc32(text.encode()) % 2039 + 1


def _pack_check(fingerprint: int, num_batches_tracked: Tensor | None, device: torch.device) -> Tensor:
    """``[f, f^2]`` of the call: the layer's fingerprint, plus its step count in the forward pass.

    The backward's pair is a constant, shared and read-only; the forward's takes three operations.
    """
    if num_batches_tracked is None:
        return constant_pair(fingerprint, device)
    f = (num_batches_tracked % 1024).to(torch.float64).mul_(2048.0).add_(fingerprint)
    return torch.stack([f, f * f])


def constant_pair(fingerprint: int, device: torch.device) -> Tensor:
    """``[f, f^2]`` of a fingerprint as a shared float64 tensor on ``device``."""
    return cached(
        ("fingerprint", fingerprint, device),
        lambda: torch.tensor([float(fingerprint), float(fingerprint) ** 2], dtype=torch.float64, device=device),
    )


def _verify(packed: Tensor, local: Tensor, ranks: int, direction: str) -> None:
    """Raise when the fingerprints of the ranks differed (reads two numbers on the host)."""
    total = packed[-2:]
    if not bool(torch.equal(total, local * ranks)):
        raise RuntimeError(
            f"synced normalization ({direction}): the ranks of the process group disagree on this layer "
            "call (number of channels, normalization groups, configuration or call count differ); every "
            "rank must call the same synced layers in the same order, with the same settings and the "
            "same number of groups per call"
        )


def reduce_forward(
    batch: Tensor,
    n_local: int,
    shift: Tensor | None,
    config: NormConfig,
    process_group: object,
    num_batches_tracked: Tensor,
    fingerprint: int,
    *,
    verify: bool,
    probe: bool,
) -> tuple[Tensor, Tensor]:
    """The statistics (G, k, C) of the groups' union over the ranks, and the union's element counts (G,).

    ``batch`` holds each local group's (mean, variance) or (E[x^2],) over ``n_local`` elements per
    channel. Centered statistics are combined about ``shift`` (the running mean, equal on every
    rank), which keeps ``E[(x - shift)^2] - E[x - shift]^2`` free of cancellation. ``verify`` reads
    the fingerprints after the collective; ``probe`` also compares them in a collective of their own
    first.
    """
    g, _, c = batch.shape
    stats = batch.to(torch.float64)
    if config.centered:
        d = stats[:, 0] - shift.to(torch.float64) if shift is not None else stats[:, 0]
        sums = torch.stack([d, stats[:, 1] + d * d], dim=1) * n_local
    else:
        sums = stats * n_local
    if n_local == 0:
        sums = torch.zeros_like(sums)  # the local moments of an empty batch are NaN
    counts = torch.full((g,), float(n_local), dtype=torch.float64, device=batch.device)
    check_values = _pack_check(fingerprint, num_batches_tracked, batch.device)
    ranks = dist.get_world_size(process_group)
    if probe:  # sizes first: vectors of different sizes would abort the collective below
        probed = check_values.clone()
        dist.all_reduce(probed, group=process_group)
        _verify(probed, check_values, ranks, "forward")
    packed = torch.cat([sums.flatten(), counts, check_values])
    dist.all_reduce(packed, group=process_group)
    if verify or probe:
        _verify(packed, check_values, ranks, "forward")
    n = packed[g * sums.shape[1] * c : g * sums.shape[1] * c + g]
    total = packed[: g * sums.shape[1] * c].view_as(sums) / n.view(g, 1, 1)
    if config.centered:
        mean = total[:, 0]
        var = (total[:, 1] - mean * mean).clamp_(min=0.0)
        if shift is not None:
            mean = mean + shift.to(torch.float64)
        total = torch.stack([mean, var], dim=1)
    return total.to(batch.dtype), n


def reduce_backward(
    sum_dy: Tensor, sum_dy_xhat: Tensor, process_group: object, fingerprint: int, verify: bool
) -> tuple[Tensor, Tensor]:
    """The sums of ``dL/dy`` and ``dL/dy * x_hat`` (each (G, C)) over the ranks' matching groups."""
    check_values = _pack_check(fingerprint, None, sum_dy.device)
    packed = torch.cat([sum_dy.to(torch.float64).flatten(), sum_dy_xhat.to(torch.float64).flatten(), check_values])
    dist.all_reduce(packed, group=process_group)
    if verify:
        _verify(packed, check_values, dist.get_world_size(process_group), "backward")
    k = sum_dy.numel()
    return packed[:k].view_as(sum_dy).to(sum_dy.dtype), packed[k : 2 * k].view_as(sum_dy).to(sum_dy.dtype)
