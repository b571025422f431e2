"""Activation checkpointing that recomputes the normalization with the statistics of the original forward.

``torch.utils.checkpoint.checkpoint`` runs a segment's forward twice: once without keeping its
activations and once more in the backward pass. A normalization layer with a statistics stream would
advance its windows and counters twice and, worse, normalize the recomputed activations with other
statistics than the forward that produced the loss. Under :func:`checkpoint` (or with
:func:`checkpoint_context` as ``context_fn``) the original forward records, layer by layer, the
statistics it used, and the recomputation replays them: its outputs are bit-identical to the
original ones and it advances nothing. The backward pass then advances the backward window once.

Without these contexts a checkpointed layer of this package advances its stream in both runs and
the recomputed output differs from the original; torch's own BatchNorm has the same defect (its
running statistics are updated twice).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["checkpoint", "checkpoint_context"]


class _Store:
    """What one checkpointed segment's layers used, in call order per layer."""

    def __init__(self) -> None:
        self.records: dict[int, deque[Any]] = {}


_stack: list[tuple[_Store, str]] = []


@contextlib.contextmanager
def _use(store: _Store, mode: str) -> Iterator[None]:
    _stack.append((store, mode))
    try:
        yield
    finally:
        _stack.pop()


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    Returns the pair (context of the original forward, context of the recomputation): the first
    records the statistics every layer of this package uses, the second replays them.

    Example::

        >>> import torch, mabn
        >>> from torch.utils.checkpoint import checkpoint
        >>> block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), mabn.MABN2d(4, norm_batch_size=2))
        >>> x = torch.randn(4, 3, 8, 8, requires_grad=True)
        >>> y = checkpoint(block, x, use_reentrant=False, context_fn=mabn.checkpoint_context)
        >>> y.sum().backward()
        >>> int(block[1].num_batches_tracked)  # one training step, not two
        1
    """
    store = _Store()
    return _use(store, "record"), _use(store, "replay")


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) under which this package's layers replay their statistics.

    Args:
        function: the segment to run (a module or a function).
        *args: its inputs.
        **kwargs: passed to ``torch.utils.checkpoint.checkpoint`` (``preserve_rng_state``,
            ``determinism_check``, ...), except ``use_reentrant`` and ``context_fn``.

    Returns:
        What ``function(*args)`` returns.

    Example::

        >>> import torch, mabn
        >>> block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), mabn.MABN2d(4))
        >>> y = mabn.checkpoint(block, torch.randn(2, 3, 8, 8, requires_grad=True))
        >>> y.shape
        torch.Size([2, 4, 6, 6])
    """
    for key in ("use_reentrant", "context_fn"):
        if key in kwargs:
            raise TypeError(f"mabn.checkpoint sets {key} itself; call torch.utils.checkpoint.checkpoint directly")
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=checkpoint_context, **kwargs
    )


def record(key: int, value: Any) -> None:
    """Keep what a layer used, when the original forward of a checkpointed segment is running."""
    if _stack and _stack[-1][1] == "record":
        _stack[-1][0].records.setdefault(key, deque()).append(value)


def replayed(key: int) -> Any:
    """What the original forward used at this call of the layer, during a recomputation; else None."""
    if not _stack or _stack[-1][1] != "replay":
        return None
    queue = _stack[-1][0].records.get(key)
    if not queue:
        raise RuntimeError(
            "a checkpointed segment's recomputation called a normalization layer more often than its "
            "original forward did (the segment's control flow must not change between the two runs)"
        )
    return queue.popleft()
