"""Every data source of ``mabn train`` by name, and the tasks each serves.

This module sits above the modules that define the sources (:mod:`mabn.apps.data` for
Fashion-MNIST, ImageFolder trees and synthetic data; :mod:`mabn.apps.scenes` and
:mod:`mabn.apps.detection` for the scenes), so that none of those imports another's users.
"""

from __future__ import annotations

import os

from .data import DataSource, ImageFolderSource, fashion_mnist_source, synthetic_source
from .detection import DetectionSceneSource
from .scenes import fashion_scenes_source

__all__ = ["DATA_TASKS", "DATA_SOURCES", "make_source"]

#: Data sources known to ``mabn train`` and the tasks each serves, the default first.
DATA_TASKS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("classification",),
    "imagefolder": ("classification",),
    "synthetic": ("classification",),
    "fashion-scenes": ("segmentation", "detection"),
}
DATA_SOURCES = tuple(DATA_TASKS)


def make_source(
    source: str,
    data_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    task: str | None = None,
    masks: bool = False,
) -> DataSource:
    """Open a data source of :data:`DATA_SOURCES` by name, for one of its tasks.

    Args:
        source: ``"fashion-mnist"``, ``"imagefolder"`` (needs ``data_dir``), ``"synthetic"`` or ``"fashion-scenes"``.
        data_dir: directory of the data (Fashion-MNIST default: the Debian package's directory).
        limit_train, limit_test: keep only that many samples of each split.
        image_size: model input side for ``"imagefolder"``, the canvas side for ``"fashion-scenes"``.
        seed: seed of the ``"synthetic"`` data.
        task: one of the source's :data:`DATA_TASKS` (default: its first); ``"fashion-scenes"``
            serves label maps for ``"segmentation"`` and boxes for ``"detection"``.
        masks: detection: serve instance masks too (for Mask R-CNN).

    Raises:
        ValueError: unknown source or task, bad limits.
        FileNotFoundError: missing data.

    Example::

        >>> make_source("synthetic", limit_train=64).num_train
        64
    """
    if source not in DATA_TASKS:
        raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(DATA_SOURCES)}")
    tasks = DATA_TASKS[source]
    task = tasks[0] if task is None else task
    if task not in tasks:
        raise ValueError(f"data source {source!r} serves {' and '.join(tasks)}, not {task!r}")
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if source == "fashion-mnist":
        return fashion_mnist_source(data_dir, limit_train, limit_test)
    if source == "imagefolder":
        if data_dir is None:
            raise ValueError("--data imagefolder needs --data-dir DIR (a directory with train/ and val/)")
        return ImageFolderSource(data_dir, image_size, limit_train, limit_test)
    if source == "synthetic":
        return synthetic_source(
            num_train=limit_train if limit_train is not None else 512,
            num_test=limit_test if limit_test is not None else 256,
            seed=seed,
        )
    if task == "detection":
        return DetectionSceneSource(
            data_dir,
            image_size,
            num_train=limit_train if limit_train is not None else 12000,
            num_test=limit_test if limit_test is not None else 1000,
            masks=masks,
        )
    return fashion_scenes_source(data_dir, limit_train, limit_test, canvas=image_size)
