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
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["checkpoint", "checkpoint_context"]


# The open recording and replaying contexts, innermost last. Per thread: a checkpointed segment is
# recomputed in the thread that runs its backward, and its layers run in that same thread.
class _ThreadFrames(threading.local):
    def __init__(self) -> None:
        self.frames: list[_Frame] = []


# Every thread starts with an empty list: the attribute always exists, so a compiled caller reads the
# same thing on every call (see mabn.kernels).
_local = _ThreadFrames()


def _frames() -> list[_Frame]:
    return _local.frames


class _Store:
    """What one checkpointed segment's layers used, in call order per layer; kept for every replay."""

    def __init__(self) -> None:
        self.records: dict[int, list[Any]] = {}


class _Frame:
    """One entered context: recording into ``store``, or replaying it from the start (``cursor``)."""

    def __init__(self, store: _Store, replay: bool) -> None:
        self.store, self.replay = store, replay
        self.cursor: dict[int, int] = {}


class _Context(contextlib.AbstractContextManager[None]):
    """A context manager that may be entered any number of times (each recomputation of a segment
    enters its replaying context once: a second backward pass through the same graph enters it again)."""

    def __init__(self, store: _Store, replay: bool) -> None:
        self._store, self._replay = store, replay
        self._entered: list[_Frame] = []

    def __enter__(self) -> None:
        frame = _Frame(self._store, self._replay)
        self._entered.append(frame)
        _frames().append(frame)

    def __exit__(self, *exc: object) -> None:
        frame = self._entered.pop()
        frames = _frames()
        frames.remove(frame)


def checkpoint_context() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
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
    return _Context(store, replay=False), _Context(store, replay=True)


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
    """Keep what a layer used (computed, or replayed) in every segment being recorded around this call.

    Segments nest: a block checkpointed inside a checkpointed stage is called again while the stage
    is recomputed, and its own recomputation later replays what that call used. So a value goes
    to every recording context opened since the innermost replaying one, the outer ones included.
    """
    for frame in reversed(_frames()):
        if frame.replay:
            break
        frame.store.records.setdefault(key, []).append(value)


def replayed(key: int) -> Any:
    """What the original forward used at this call of the layer, during a recomputation; else None.

    The innermost replaying context answers; each of its entries (one per recomputation, so one
    per backward pass) replays the records from the start.
    """
    frame = next((f for f in reversed(_frames()) if f.replay), None)
    if frame is None:
        return None
    values = frame.store.records.get(key, [])
    index = frame.cursor.get(key, 0)
    if index >= len(values):
        raise RuntimeError(
            "a checkpointed segment's recomputation called a normalization layer more often than its "
            "original forward did (the segment's control flow must not change between the two runs)"
        )
    frame.cursor[key] = index + 1
    return values[index]
