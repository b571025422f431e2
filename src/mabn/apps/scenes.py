"""Semantic segmentation scenes composed of real Fashion-MNIST images (the dense-prediction stand-in).

No detection or segmentation data set can be installed here, so (docs/design.md, section 12) a scene is a
zero canvas with several Fashion-MNIST items pasted on it, each resized to a random square side at
a random position; later items occlude earlier ones. An item's pixels are those whose resized
intensity exceeds :data:`FOREGROUND_THRESHOLD`; only they are pasted, and the label map gives each
pixel 0 (background) or ``class + 1``, so there are 11 classes. Training scenes use training
images only and test scenes test images only.

* :func:`compose_scenes` pastes given items (vectorized over scenes);
* :func:`make_scenes` draws the items of ``num_scenes`` scenes from a seed and composes them;
* :class:`SegmentationTensorSource` serves (image, label map) tensors to ``mabn train``;
* :class:`SceneSource` (``mabn train --task segmentation --data fashion-scenes``) is the fixed
  Fashion-MNIST scene data set; :func:`fashion_scenes_source` opens it for :func:`~mabn.apps.sources.make_source`;
* :func:`plot_scenes` draws scenes, their label maps and optional predicted label maps.

``results/fashion_scenes.png`` (6 test scenes of the default data set) is made by::

    python -m mabn.apps.scenes --plot results/fashion_scenes.png
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InMemorySource, load_fashion_mnist, normalize
from .files import pyplot, save_figure

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SCENE_CLASSES",
    "PALETTE",
    "FOREGROUND_THRESHOLD",
    "Scenes",
    "resize_items",
    "compose_scenes",
    "make_scenes",
    "foreground_areas",
    "SegmentationTensorSource",
    "scene_splits",
    "SceneSource",
    "fashion_scenes_source",
    "plot_scenes",
    "scene_figure_parser",
]

#: The ten Fashion-MNIST classes, in label order.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: The classes of a scene's label map: 0 is the background, ``c + 1`` the Fashion-MNIST class ``c``.
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
#: One RGB colour (0-255) per entry of :data:`SCENE_CLASSES`: black background, then matplotlib's tab10.
PALETTE = (
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
#: A resized item's pixel belongs to the item when its intensity (0-255) exceeds this: 10 % of 255.
#: Fashion-MNIST backgrounds are exact zeros, and the faint anti-aliased rim below 10 % stays background.
FOREGROUND_THRESHOLD = 0.1 * 255

_BLOCK = 1024  # make_scenes draws the uniforms of this many scenes at a time (keeps prefixes stable)


class Scenes(NamedTuple):
    """Scenes made by :func:`make_scenes`; K is the largest item count, empty slots hold -1.

    Attributes:
        images: (S, 1, H, W) uint8 composed scenes.
        masks: (S, H, W) uint8 label maps, 0 = background, ``class + 1`` for an item's pixels.
        boxes: (S, K, 5) int64 rows (class, x0, y0, x1, y1), see :func:`compose_scenes`.
        sources: (S, K) int64 indices of the items' images in the split they were drawn from.
        positions: (S, K, 2) int64 top-left corners (x0, y0) of the items' squares.
        sides: (S, K) int64 sides of the items' squares.
        instances: (S, H, W) uint8 instance maps: 0 = background, ``k + 1`` where slot k is visible
            (each item's visible pixels: its foreground minus what later items cover).
        areas: (S, K) int64 foreground pixels of each item before occlusion (0 for empty slots).
    """

    images: Tensor
    masks: Tensor
    boxes: Tensor
    sources: Tensor
    positions: Tensor
    sides: Tensor
    instances: Tensor
    areas: Tensor


def resize_items(images: Tensor, side: int) -> Tensor:
    """Resize (N, h, w) uint8 images to (N, side, side) uint8: bilinear, anti-aliased when shrinking.

    Example::

        >>> resize_items(torch.full((2, 28, 28), 200, dtype=torch.uint8), 42).shape
        torch.Size([2, 42, 42])
    """
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, h, w), got {images.dtype} {tuple(images.shape)}")
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    if images.shape[1:] == (side, side):
        return images.clone()
    shrinks = side < max(images.shape[1:])
    out = torch.nn.functional.interpolate(
        images.unsqueeze(1).float(), size=(side, side), mode="bilinear", align_corners=False, antialias=shrinks
    )
    return out.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


def _check_items(labels: Tensor, positions: Tensor, sides: Tensor, canvas: int, threshold: float) -> None:
    if canvas < 1:
        raise ValueError(f"canvas must be >= 1, got {canvas}")
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must be in [0, 255), got {threshold}")
    present = labels >= 0
    if bool((labels > 254).any()):
        raise ValueError(f"item classes must be in [0, 254] (-1 = empty slot), got {int(labels.max())}")
    if not bool(present.any()):
        return
    side, x0, y0 = sides[present], positions[..., 0][present], positions[..., 1][present]
    if bool((side < 1).any()):
        raise ValueError(f"item sides must be >= 1, got {int(side.min())}")
    outside = (x0 < 0) | (y0 < 0) | (x0 + side > canvas) | (y0 + side > canvas)
    if bool(outside.any()):
        i = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"item at (x0, y0) = ({int(x0[i])}, {int(y0[i])}) with side {int(side[i])} "
            f"does not lie inside the {canvas} x {canvas} canvas"
        )


def compose_scenes(
    images: Tensor,
    labels: Tensor,
    positions: Tensor,
    sides: Tensor,
    canvas: int,
    threshold: float = FOREGROUND_THRESHOLD,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste K items on each of S zero canvases, slot by slot, later slots occluding earlier ones.

    Item ``(s, k)`` is ``images[s, k]`` resized by :func:`resize_items` to ``sides[s, k]`` and placed
    with its top-left corner at ``positions[s, k]``; only its foreground pixels (resized intensity
    above ``threshold``) are pasted, both their intensity and the label ``labels[s, k] + 1``. The work
    is vectorized over scenes (a loop over slots and distinct sides only).

    Args:
        images: (S, K, h, w) uint8 item images.
        labels: (S, K) int64 item classes in [0, 254]; -1 marks an empty slot (its other entries are ignored).
        positions: (S, K, 2) int64 top-left corners (x0, y0); each item must lie inside the canvas.
        sides: (S, K) int64 sides of the resized squares (>= 1).
        canvas: side of the square scenes.
        threshold: foreground intensity threshold in [0, 255); default :data:`FOREGROUND_THRESHOLD`.

    Returns:
        ``(scenes, masks, boxes)``: (S, canvas, canvas) uint8 scenes, (S, canvas, canvas) uint8 label
        maps (0 = background), and (S, K, 5) int64 boxes (class, x0, y0, x1, y1) of each item's full
        foreground extent before occlusion, in canvas pixels with exclusive ends (``x1 = last column + 1``,
        as in slicing). Empty slots are rows of -1; an item without any foreground pixel keeps its
        class and has coordinates -1.

    Example::

        >>> item = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
        >>> item[0, 0, 2:5, 3:9] = 255
        >>> scenes, masks, boxes = compose_scenes(item, torch.tensor([[4]]), torch.tensor([[[10, 20]]]),
        ...                                       torch.tensor([[28]]), canvas=64)
        >>> int(masks.max()), boxes[0, 0].tolist()
        (5, [4, 13, 22, 19, 25])
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 item images (S, K, h, w), got {images.dtype} {tuple(images.shape)}")
    s, k = images.shape[:2]
    expected = {"labels": (s, k), "positions": (s, k, 2), "sides": (s, k)}
    for name, value in (("labels", labels), ("positions", positions), ("sides", sides)):
        if tuple(value.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for images {tuple(images.shape)}, got {tuple(value.shape)}"
            )
    labels, positions, sides = labels.long(), positions.long(), sides.long()
    _check_items(labels, positions, sides, canvas, threshold)
    # Integer pixels: v > threshold <=> v > floor(threshold), a comparison that stays in uint8.
    cut = math.floor(threshold)
    scenes = torch.zeros(s, canvas, canvas, dtype=torch.uint8)
    masks = torch.zeros_like(scenes)
    flat_scenes, flat_masks = scenes.view(-1), masks.view(-1)
    boxes = torch.full((s, k, 5), -1, dtype=torch.long)
    for slot in range(k):
        present = labels[:, slot] >= 0
        for side in torch.unique(sides[present, slot]).tolist():
            sel = (present & (sides[:, slot] == side)).nonzero().squeeze(1)
            patch = resize_items(images[sel, slot], side)
            x0, y0 = positions[sel, slot, 0], positions[sel, slot, 1]
            offsets = torch.arange(side)
            # Flat indices of the items' squares: index_select/index_copy_ on one dimension is several
            # times faster than indexing with three broadcast index tensors.
            corner = (sel * canvas + y0) * canvas + x0
            flat = (corner[:, None, None] + (offsets * canvas)[:, None] + offsets).view(-1)
            # Gather the squares, keep what lies outside the item's foreground, scatter back: each scene
            # appears once per (slot, side) group, so the writes never collide.
            fg = patch > cut
            cls = labels[sel, slot]
            pasted = torch.where(fg, patch, flat_scenes.index_select(0, flat).view_as(patch))
            flat_scenes.index_copy_(0, flat, pasted.view(-1))
            code = (cls + 1).to(torch.uint8)[:, None, None]
            flat_masks.index_copy_(
                0, flat, torch.where(fg, code, flat_masks.index_select(0, flat).view_as(fg)).view(-1)
            )
            rows, cols = fg.any(2).to(torch.uint8), fg.any(1).to(torch.uint8)  # argmax needs numbers
            top, left = rows.argmax(1), cols.argmax(1)
            bottom, right = side - rows.flip(1).argmax(1), side - cols.flip(1).argmax(1)
            coords = torch.stack([x0 + left, y0 + top, x0 + right, y0 + bottom], 1)
            coords[~rows.bool().any(1)] = -1
            boxes[sel, slot] = torch.cat([cls[:, None], coords], 1)
    return scenes, masks, boxes


def _pair(value: Sequence, name: str) -> tuple:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    return lo, hi


def make_scenes(
    images: Tensor,
    labels: Tensor,
    num_scenes: int,
    canvas: int = 96,
    items: tuple[int, int] = (3, 5),
    scale: tuple[float, float] = (1.0, 2.0),
    seed: int = 0,
    threshold: float = FOREGROUND_THRESHOLD,
) -> Scenes:
    """Draw and compose ``num_scenes`` scenes from a pool of labelled square images, reproducibly.

    Every scene gets an item count uniform in ``items`` (inclusive); every item a source image
    uniform over the pool, a side ``round(u * h)`` with ``u`` uniform in ``scale`` and ``h`` the
    pool's image side, and a position uniform over those keeping the item inside the canvas. The
    draws come from a ``torch.Generator`` seeded with ``seed``, a whole block of 1024 scenes at a time,
    so the first n scenes are the same whatever ``num_scenes`` >= n.

    Args:
        images: (N, h, h) uint8 pool (e.g. one Fashion-MNIST split).
        labels: (N,) classes of the pool images, in [0, 254].
        num_scenes: number of scenes S (>= 1).
        canvas: side of the square scenes; at least the largest item side ``round(scale[1] * h)``.
        items: (min, max) item count per scene, 1 <= min <= max.
        scale: (lo, hi) item side relative to ``h``, 0 < lo <= hi.
        seed: seed of the draws.
        threshold: foreground threshold of :func:`compose_scenes`.

    Returns:
        :class:`Scenes` with K = ``items[1]`` slots.

    Raises:
        ValueError: a bad value, named in the message.

    Example::

        >>> pool = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
        >>> scenes = make_scenes(pool, torch.arange(10), num_scenes=4, canvas=64, items=(1, 3))
        >>> scenes.images.shape, scenes.masks.shape, scenes.boxes.shape
        (torch.Size([4, 1, 64, 64]), torch.Size([4, 64, 64]), torch.Size([4, 3, 5]))
    """
    if images.dim() != 3 or images.dtype != torch.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected a pool of square uint8 images (N, h, h), got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"images and labels must have the same length, got images {tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    if images.shape[0] < 1:
        raise ValueError("the pool of images is empty")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    lo_items, hi_items = _pair(items, "items")
    if not 1 <= lo_items <= hi_items:
        raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {tuple(items)}")
    lo, hi = _pair(scale, "scale")
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
    size = images.shape[1]
    largest = round(hi * size)
    if canvas < largest:
        raise ValueError(f"canvas {canvas} is smaller than the largest item side {largest} (scale {hi} x {size})")
    labels = labels.long()
    n, k = images.shape[0], hi_items
    g = torch.Generator().manual_seed(seed)
    draws = []
    for start in range(0, num_scenes, _BLOCK):
        # Always a whole block of uniforms, so that scene i depends on the seed and i only.
        u = torch.rand(_BLOCK, k, 5, generator=g, dtype=torch.float64)
        draws.append(u[: num_scenes - start])
    u = torch.cat(draws)
    count = lo_items + (u[:, 0, 0] * (hi_items - lo_items + 1)).long()
    present = torch.arange(k) < count[:, None]
    sources = torch.where(present, (u[..., 1] * n).long().clamp_(max=n - 1), -1)
    sides = ((lo + (hi - lo) * u[..., 2]) * size).round().long().clamp_(min=1)
    positions = (u[..., 3:5] * (canvas - sides + 1)[..., None]).long()
    sides, positions = sides.masked_fill(~present, -1), positions.masked_fill(~present[..., None], -1)
    item_labels = torch.where(present, labels[sources.clamp(min=0)], -1)
    items = images[sources.clamp(min=0)]
    scenes, masks, boxes = compose_scenes(items, item_labels, positions, sides, canvas, threshold)
    # The same composition with each item's slot as its label gives the instance map.
    slots = torch.where(present, torch.arange(k), -1)
    instances = compose_scenes(items, slots, positions, sides, canvas, threshold)[1]
    areas = foreground_areas(items, present, sides, threshold)
    return Scenes(scenes.unsqueeze(1), masks, boxes, sources, positions, sides, instances, areas)


def foreground_areas(items: Tensor, present: Tensor, sides: Tensor, threshold: float = FOREGROUND_THRESHOLD) -> Tensor:
    """(S, K) int64 foreground pixel counts of the items resized to their sides (0 where not present).

    The pixels :func:`compose_scenes` would paste for each item on an empty canvas.

    Example::

        >>> item = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
        >>> item[0, 0, :14] = 255
        >>> foreground_areas(item, torch.tensor([[True]]), torch.tensor([[28]])).tolist()
        [[392]]
    """
    cut = math.floor(threshold)
    areas = torch.zeros(present.shape, dtype=torch.long)
    for slot in range(present.shape[1]):
        for side in torch.unique(sides[present[:, slot], slot]).tolist():
            sel = (present[:, slot] & (sides[:, slot] == side)).nonzero().squeeze(1)
            areas[sel, slot] = (resize_items(items[sel, slot], side) > cut).flatten(1).sum(1)
    return areas


class SegmentationTensorSource(InMemorySource):
    """A semantic segmentation data set held in memory: uint8 images and integer label maps.

    Training batches are mirrored horizontally with probability 1/2 (image and label map together),
    the randomness a function of the seed and the batch indices only; both splits are normalized
    with ``mean`` and ``std`` and the label maps returned as int64.

    Args:
        name: the source's name (for messages).
        train: (images (N, C, H, W) uint8, label maps (N, H, W) integer) of the training split.
        test: the same for the test split.
        num_classes: number of classes; every label must lie in [0, num_classes).
        mean, std: per-channel normalization of the pixels scaled to [0, 1].
        flip: random horizontal flips of the training batches.

    Raises:
        ValueError: images and label maps of different counts or spatial sizes (the message names
            the shapes), labels outside [0, num_classes). TypeError: non-integer label maps.

    Example::

        >>> x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        >>> y = torch.zeros(4, 8, 8, dtype=torch.long)
        >>> source = SegmentationTensorSource("toy", (x, y), (x, y), num_classes=2, mean=(0.5,), std=(0.5,))
        >>> [tuple(t.shape) for t in next(source.train_batches(torch.tensor([[0, 1]]), seed=0))]
        [(2, 1, 8, 8), (2, 8, 8)]
    """

    task = "segmentation"

    def __init__(
        self,
        name: str,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for split, (images, masks) in (("train", train), ("test", test)):
            if images.dim() != 4 or masks.dim() != 3:
                raise ValueError(
                    f"{name} {split}: expected images (N, C, H, W) and label maps (N, H, W), got "
                    f"{tuple(images.shape)} and {tuple(masks.shape)}"
                )
            if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
                raise ValueError(
                    f"{name} {split}: images {tuple(images.shape)} and label maps {tuple(masks.shape)} differ in "
                    "count or spatial size; each image needs a label map of its own height and width"
                )
            if masks.dtype.is_floating_point or masks.dtype.is_complex or masks.dtype == torch.bool:
                raise TypeError(f"{name} {split}: label maps must be an integer tensor, got {masks.dtype}")
            if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= num_classes):
                raise ValueError(
                    f"{name} {split}: labels must lie in [0, {num_classes}), got [{int(masks.min())}, {int(masks.max())}]"
                )
        if train[0].shape[1] != test[0].shape[1]:
            raise ValueError(f"{name}: train and test images have {train[0].shape[1]} and {test[0].shape[1]} channels")
        super().__init__(name, train[0], test[0], num_classes, mean, std)
        self.train_masks, self.test_masks = train[1], test[1]
        self.flip = flip

    def train_batches(self, batches: Tensor, seed: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images float32 (B, C, H, W), label maps int64 (B, H, W)) for each row of ``batches`` (S, B).

        ``workers`` is accepted for the common interface; in-memory tensors need none.
        """
        generator = torch.Generator().manual_seed(seed)
        for rows in batches:
            images, masks = self.train_images[rows], self.train_masks[rows].long()
            if self.flip:
                mirrored = torch.rand(len(rows), generator=generator) < 0.5
                images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
                masks = torch.where(mirrored[:, None, None], masks.flip(-1), masks)
            yield normalize(images, self.mean, self.std), masks

    def test_targets(self, start: int, stop: int) -> Tensor:
        """The label maps of test scenes ``start:stop`` as int64."""
        return self.test_masks[start:stop].long()


def scene_splits(
    root: str | os.PathLike | None = None,
    canvas: int = 96,
    num_train: int = 12000,
    num_test: int = 1000,
    seed: int = 0,
    items: tuple[int, int] = (3, 5),
    scale: tuple[float, float] = (1.0, 2.0),
) -> tuple[Scenes, Scenes]:
    """The training and test :class:`Scenes` of the Fashion-MNIST scene data set with seed ``seed``.

    Training scenes are drawn by :func:`make_scenes` from the Fashion-MNIST training images with seed
    ``2 * seed``, test scenes from the test images with seed ``2 * seed + 1``; the segmentation
    (:class:`SceneSource`) and detection (:class:`mabn.apps.detection.DetectionSceneSource`) data
    sets are both made of them. Arguments as :class:`SceneSource`.

    Raises:
        ValueError: a count below 1 or a bad scene parameter. FileNotFoundError: no Fashion-MNIST.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    train = make_scenes(*load_fashion_mnist("train", root), num_train, canvas, items, scale, 2 * seed)
    test = make_scenes(*load_fashion_mnist("test", root), num_test, canvas, items, scale, 2 * seed + 1)
    return train, test


class SceneSource(SegmentationTensorSource):
    """The Fashion-MNIST scene data set (``--data fashion-scenes``): 1 x canvas x canvas, 11 classes.

    The scenes are fixed by ``seed`` (the data set's own seed, not the training seed): training
    scenes are drawn by :func:`make_scenes` from the Fashion-MNIST training images with seed
    ``2 * seed``, test scenes from the test images with seed ``2 * seed + 1``. Defaults: 3-5 items
    per scene, each 28-56 pixels wide (1x-2x) on a 96-pixel canvas, so items overlap often and
    cover about 30 % of a scene. Images are normalized with the Fashion-MNIST mean and std.
    The scenes' sources, positions, sides and boxes are kept as ``train_scenes`` and ``test_scenes``.

    Args:
        root: directory of the Fashion-MNIST idx files (default: the Debian package's).
        canvas: side of the scenes (>= 56 with the default scale).
        num_train, num_test: number of scenes of each split; smaller counts give the first scenes
            of the larger data set.
        seed: the data set's seed.
        items: (min, max) items per scene.
        scale: (lo, hi) item side relative to 28 pixels.

    Example::

        >>> source = SceneSource(num_train=8, num_test=4)  # doctest: +SKIP
        >>> source.train_images.shape, source.num_classes  # doctest: +SKIP
        (torch.Size([8, 1, 96, 96]), 11)
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        canvas: int = 96,
        num_train: int = 12000,
        num_test: int = 1000,
        seed: int = 0,
        items: tuple[int, int] = (3, 5),
        scale: tuple[float, float] = (1.0, 2.0),
    ) -> None:
        self.canvas, self.seed = canvas, seed
        self.train_scenes, self.test_scenes = scene_splits(root, canvas, num_train, num_test, seed, items, scale)
        super().__init__(
            "fashion-scenes",
            (self.train_scenes.images, self.train_scenes.masks),
            (self.test_scenes.images, self.test_scenes.masks),
            num_classes=len(SCENE_CLASSES),
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        )


def fashion_scenes_source(
    root: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    canvas: int = 96,
) -> SceneSource:
    """The default :class:`SceneSource` (12,000 training and 1,000 test scenes), or its first scenes.

    Args:
        root: directory of the Fashion-MNIST idx files; default the Debian package's.
        limit_train, limit_test: keep only the first scenes of a split (for quick checks).
        canvas: side of the scenes.

    Example::

        >>> source = fashion_scenes_source(limit_train=64, limit_test=16)  # doctest: +SKIP
        >>> source.num_train, source.in_channels, source.num_classes  # doctest: +SKIP
        (64, 1, 11)
    """
    return SceneSource(
        root,
        canvas,
        num_train=limit_train if limit_train is not None else 12000,
        num_test=limit_test if limit_test is not None else 1000,
    )


def _color(masks: Tensor) -> Tensor:
    """(n, H, W) labels -> (n, H, W, 3) uint8 RGB in :data:`PALETTE` (labels past the palette wrap around)."""
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    return palette[masks.long() % len(PALETTE)]


def plot_scenes(
    scenes: SegmentationTensorSource | tuple[Tensor, Tensor],
    path: str | os.PathLike,
    n: int = 6,
    predictions: Mapping[str, Tensor] | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG of ``n`` scenes: a row of images, a row of label maps, one row per prediction.

    Label maps are drawn in :data:`PALETTE` with a legend of :data:`SCENE_CLASSES`. The file is
    written to a temporary name and then moved into place, so ``path`` is never half-written.

    Args:
        scenes: a segmentation source (its first ``n`` test scenes) or (images (N, [1,] H, W), label maps (N, H, W)).
        path: the PNG to write (its directory is created).
        n: number of scenes (columns), at most the number available.
        predictions: optional ``{name: (n, H, W) label maps}``, e.g. ``{"BN(2)": ..., "MABN(2)": ...}``.
        title: figure title (default: a description of the figure).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    if isinstance(scenes, SegmentationTensorSource):
        images, masks = scenes.test_images, scenes.test_masks
    else:
        images, masks = scenes
    if images.dim() == 4:
        if images.shape[1] != 1:
            raise ValueError(f"plot_scenes draws one-channel images, got {tuple(images.shape)}")
        images = images[:, 0]
    if images.dim() != 3 or masks.shape != images.shape:
        raise ValueError(
            f"expected images (N, [1,] H, W) and label maps (N, H, W), got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if not 1 <= n <= images.shape[0]:
        raise ValueError(f"n must be in [1, {images.shape[0]}] (the scenes available), got {n}")
    rows = [("image", None), ("ground truth", masks[:n])]
    for name, pred in (predictions or {}).items():
        if tuple(pred.shape) != (n, *masks.shape[1:]):
            raise ValueError(f"prediction {name!r} must have shape {(n, *masks.shape[1:])}, got {tuple(pred.shape)}")
        rows.append((name, pred))
    # Fixed inches for the panels, the title (top) and the legend (bottom), whatever n and the row count.
    cell, top, bottom = 1.8, 0.45, 0.35 if n >= 6 else 0.75
    height = cell * len(rows) + top + bottom
    fig, axes = plt.subplots(len(rows), n, figsize=(cell * n + 0.35, height), squeeze=False)
    fig.subplots_adjust(left=0.35 / (cell * n + 0.35), right=0.995, bottom=bottom / height, top=1 - top / height)
    fig.subplots_adjust(wspace=0.05, hspace=0.06)
    # uint8 images have a fixed range; float (e.g. normalized) images are scaled per image.
    vrange = {"vmin": 0, "vmax": 255} if images.dtype == torch.uint8 else {}
    for r, (name, maps) in enumerate(rows):
        colored = _color(maps) if maps is not None else None
        for c in range(n):
            ax = axes[r, c]
            if colored is None:
                ax.imshow(images[c].numpy(), cmap="gray", interpolation="nearest", **vrange)
            else:
                ax.imshow(colored[c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=10)
    handles = [
        Patch(facecolor=[v / 255 for v in rgb], edgecolor="gray", label=label)
        for rgb, label in zip(PALETTE, SCENE_CLASSES)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=11 if n >= 6 else 4, fontsize=8, frameon=False)
    h, w = masks.shape[1:]
    fig.suptitle(title or f"Fashion-MNIST scenes ({h} x {w}) and their label maps", fontsize=11)
    return save_figure(fig, path, dpi=110)


def scene_figure_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """``prog --plot PNG [--n N] [--canvas C] [--data-dir DIR]``: a figure of the first test scenes.

    ``doc`` is the module's docstring; its first line describes the command.
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--plot", required=True, metavar="PNG", help="the figure to write")
    parser.add_argument("--n", type=int, default=6, help="number of test scenes (default: 6)")
    parser.add_argument("--canvas", type=int, default=96, help="scene side (default: 96)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the Debian package's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mabn.apps.scenes --plot PNG``: draw the first test scenes of the default data set."""
    args = scene_figure_parser("python -m mabn.apps.scenes", __doc__).parse_args(argv)
    # Scenes are prefix-stable, so these are the first test scenes of the full data set.
    source = SceneSource(args.data_dir, args.canvas, num_train=1, num_test=args.n)
    print(plot_scenes(source, args.plot, n=args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
