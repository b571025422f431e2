"""The application around the library: the ``mabn`` command, training, data, grids, statistics, benchmarks.

Nothing in :mod:`mabn` imports this package; it may use tqdm, matplotlib and pillow, imported where
they are needed.
"""

from __future__ import annotations

import os

__all__ = ["enable_huge_pages"]


def enable_huge_pages() -> None:
    """Let torch's CPU allocator use transparent huge pages, unless the user chose otherwise.

    ``THP_MEM_ALLOC_ENABLE`` is read at torch's first large CPU allocation, so this runs at the start
    of every command, before any tensor exists; results/performance.md shows BatchNorm and MABN
    alike running at one of two speeds without it.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
