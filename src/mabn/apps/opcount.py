"""Count the aten operations of one forward+backward of a layer (``benchmarks/operation_counts.py``, the tests).

At one or two samples per device a normalization layer's cost is mostly its number of operations:
on a CPU each costs microseconds of dispatch, on a GPU most are a kernel launch. Counting them is
deterministic, unlike timing, so it can be tested.

What counts: every operator call that reaches the dispatcher below autograd, seen by a
``TorchDispatchMode`` active around the layer's forward and its backward. An operation is a *view*
when the first return of its schema aliases an input without writing it (``view``, ``select``,
``slice``, ``expand``, ``detach``, ``split``, ...): metadata, no kernel. Operations that take no tensor
and return none (``promote_types``) are not counted at all: they compute a dtype on the host. Every
other operation is *non-view*: it reads or writes tensor data (an in-place ``_foreach_add_``, which
returns nothing, included; so is ``equal``, which compares two tensors and returns a bool).

The harness adds no operation of its own: the input and the incoming gradient are made before the
counted region, and the gradients come from ``torch.autograd.grad`` with respect to the input and the
parameters, which runs the same backward graph as ``.backward()`` without the ``AccumulateGrad``
nodes that would add into (or detach into) ``.grad``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import PRESETS
from ..frozen import FrozenBatchNorm2d
from ..kernels import use_paths
from ..modules import BatchRenorm2d, GeneralBatchNorm2d, GhostBatchNorm2d, MABN2d

__all__ = [
    "OperationCount",
    "OperationCounter",
    "is_view",
    "touches_tensors",
    "count_forward_backward",
    "COUNT_SHAPE",
    "DISPATCHES",
    "LARGE_MAP_SHAPE",
    "LAYERS",
    "build_layer",
    "count_layer",
]


def _is_tensor_type(t: torch._C.JitType) -> bool:
    if isinstance(t, torch._C.TensorType):
        return True
    if isinstance(t, (torch._C.ListType, torch._C.OptionalType)):
        return _is_tensor_type(t.getElementType())
    return False


def is_view(op: torch._ops.OpOverload) -> bool:
    """Whether the first return of ``op``'s schema aliases an input without writing it."""
    returns = op._schema.returns
    if not returns:
        return False
    alias = returns[0].alias_info
    return alias is not None and not alias.is_write


def touches_tensors(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` takes or returns a tensor (else it is host arithmetic on dtypes or sizes)."""
    schema = op._schema
    return any(_is_tensor_type(a.type) for a in schema.arguments) or any(
        _is_tensor_type(r.type) for r in schema.returns
    )


@dataclasses.dataclass
class OperationCount:
    """The operations seen, in order (``"aten.mm.default"``), and those left out as not touching tensors."""

    ops: list[str] = dataclasses.field(default_factory=list)
    views: list[bool] = dataclasses.field(default_factory=list)
    left_out: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        """Every counted operation, views included."""
        return len(self.ops)

    @property
    def non_view(self) -> int:
        """The operations that read or write tensor data."""
        return self.views.count(False)

    def by_name(self, views: bool | None = None) -> collections.Counter:
        """How many times each operation ran (``views``: only views, only non-views, or all)."""
        return collections.Counter(op for op, v in zip(self.ops, self.views) if views is None or v == views)


class OperationCounter(TorchDispatchMode):
    """Record every aten (and c10d) operation dispatched inside the ``with`` block.

    Example::

        >>> import torch
        >>> from mabn.apps.opcount import OperationCounter
        >>> with OperationCounter() as counter:
        ...     _ = torch.ones(3).view(3, 1) * 2
        >>> counter.count.total, counter.count.non_view
        (3, 2)
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = OperationCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if touches_tensors(func):
            self.count.ops.append(str(func))
            self.count.views.append(is_view(func))
        else:
            self.count.left_out[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_forward_backward(layer: nn.Module, x: Tensor, dy: Tensor) -> OperationCount:
    """The operations of ``layer(x)`` and of its backward for ``dy`` (input and parameter gradients).

    ``x`` is used as a fresh leaf that requires grad; nothing is written to ``.grad``.
    """
    leaf = x.detach().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    with OperationCounter() as counter:
        y = layer(leaf)
        torch.autograd.grad(y, [leaf, *params], dy)
    return counter.count


#: How a call is dispatched, as :func:`mabn.kernels.use_paths` settings: the fused CPU step (the
#: default on a CPU), the composed CPU paths (a CPU without a C compiler) and the generic paths (what
#: every other device runs).
DISPATCHES: dict[str, dict[str, Any]] = {
    "fused": {"step": "fused"},
    "composed": {"step": "composed"},
    "generic": {"cpu_specific": False},
}

#: The input of the counts: 4 samples (G = 1 or 4 groups of B = 4 or 1), 32 channels (GroupNorm(32, C)),
#: 32 x 32 maps. Each sample has 32 768 values, above ``mabn.kernels.PER_SAMPLE_MIN_NUMEL``, and each
#: map 1024, at most ``mabn.kernels.FUSED_MAX_SPATIAL``: on contiguous CPU input the composed dispatch
#: takes the paths of ResNet-50's 28 x 28, 14 x 14 and 7 x 7 maps at one or two images.
COUNT_SHAPE = (4, 32, 32, 32)
#: The same with 64 x 64 maps, above ``FUSED_MAX_SPATIAL``: the CPU paths of the 56 x 56 and 112 x 112 maps.
LARGE_MAP_SHAPE = (4, 32, 64, 64)

#: The layers counted, in table order.
LAYERS = (
    "MABN2d",
    "GhostBatchNorm2d",
    "BatchRenorm2d",
    "FrozenBatchNorm2d",
    *(f"GeneralBatchNorm2d({preset})" for preset in PRESETS),
    "nn.BatchNorm2d",
    "nn.GroupNorm(32)",
)

#: Calls made before the counted one: past the warm-ups (built with warm-ups of 2 steps, so that the
#: tables have the phase boundaries the default hyper-parameters have), tables and probes cached.
WARMUP_CALLS = 3


def build_layer(name: str, channels: int, batch: int, groups: int, process_group: Any = None) -> nn.Module | None:
    """The layer ``name`` normalizing ``groups`` groups of a batch of ``batch`` (None: no such layer).

    Layers without normalization groups (torch's, frozen BN) exist at ``groups == 1`` without sync only.
    """
    grouped = name not in ("FrozenBatchNorm2d", "nn.BatchNorm2d", "nn.GroupNorm(32)")
    if not grouped:
        if groups != 1 or process_group is not None:
            return None
        if name == "FrozenBatchNorm2d":
            return FrozenBatchNorm2d(channels)
        return nn.BatchNorm2d(channels) if name == "nn.BatchNorm2d" else nn.GroupNorm(32, channels)
    common: dict[str, Any] = {
        "norm_batch_size": None if groups == 1 else batch // groups,
        "process_group": process_group,
    }
    warm = {"warmup_iters": 2, "renorm_warmup_iters": 2}
    if name == "MABN2d":
        return MABN2d(channels, **common, **warm)
    if name == "GhostBatchNorm2d":
        return GhostBatchNorm2d(channels, **common)
    if name == "BatchRenorm2d":
        return BatchRenorm2d(channels, renorm_warmup_iters=2, **common)
    preset = name[len("GeneralBatchNorm2d(") : -1]
    return GeneralBatchNorm2d.from_preset(preset, channels, **common, **warm)


def count_layer(
    name: str,
    groups: int,
    *,
    shape: tuple[int, int, int, int] = COUNT_SHAPE,
    channels_last: bool = False,
    dispatch: str = "fused",
    process_group: Any = None,
) -> OperationCount | None:
    """The operations of one training forward+backward of layer ``name`` past its warm-ups.

    ``dispatch`` is a key of :data:`DISPATCHES`: ``"generic"`` counts what a GPU runs. Returns None
    where the layer has no such configuration (see :func:`build_layer`).

    Example::

        >>> from mabn.apps.opcount import count_layer
        >>> count_layer("nn.BatchNorm2d", 1).non_view
        4
    """
    layer = build_layer(name, shape[1], shape[0], groups, process_group)
    if layer is None:
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=generator).contiguous(memory_format=fmt)
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {tuple(DISPATCHES)}, got {dispatch!r}")
    with use_paths(**DISPATCHES[dispatch]):
        for _ in range(WARMUP_CALLS):
            leaf = x.detach().requires_grad_()
            params = [p for p in layer.parameters() if p.requires_grad]
            torch.autograd.grad(layer(leaf), [leaf, *params], dy)
        return count_forward_backward(layer, x, dy)


def synced_counts(rank: int, world: int, init_file: str, out_file: str, shape: tuple[int, int, int, int]) -> None:
    """Run in each of ``world`` gloo processes (``torch.multiprocessing.spawn``): rank 0 writes the counts.

    Every synced layer at G = 1 and 4, with the fused CPU step and with the generic paths; every rank
    makes the same calls, so that the collectives pair up. ``out_file`` receives a JSON dict
    ``"name|groups|dispatch" -> {"ops", "views", "left_out"}`` (the fields of :class:`OperationCount`).
    """
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for dispatch in ("fused", "generic"):
            for name in LAYERS:
                for groups in (1, 4):
                    count = count_layer(name, groups, shape=shape, dispatch=dispatch, process_group=dist.group.WORLD)
                    if count is not None:
                        results[f"{name}|{groups}|{dispatch}"] = {
                            "ops": count.ops,
                            "views": count.views,
                            "left_out": dict(count.left_out),
                        }
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
