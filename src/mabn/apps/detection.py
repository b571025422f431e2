"""Detection on the Fashion-MNIST scenes: targets, the data source, COCO evaluation and pictures.

A scene's items are its objects (:mod:`mabn.apps.scenes`): each has a class, a box and an
instance mask, all taken from its *visible* pixels (its foreground minus what later items cover),
as COCO annotates objects. Boxes are ``(x0, y0, x1, y1)`` in pixels, ``x1`` one past the last
visible column (so a box never has zero width), labels are ``class + 1`` (1-10; 0 is the
background of :data:`~mabn.apps.scenes.SCENE_CLASSES`).

**Occlusion rule.** Later items occlude earlier ones, often heavily (in the default test scenes a
tenth of the items keep less than 27 % of their pixels). An item keeps its place as a target when at
least :data:`MIN_VISIBLE` (25 %) of its foreground is visible. An item less visible than that, but
not hidden completely, becomes an *ignored region*: it is no training target, and in evaluation
it is a COCO ``iscrowd`` annotation, so that a detection on it counts neither as a hit nor as a
false positive. Items hidden completely are dropped. The rule is the same for training and test scenes.

* :func:`detection_targets`: boxes, labels and ignored regions of :class:`~mabn.apps.scenes.Scenes`;
* :class:`DetectionTensorSource`: (image, targets) batches for ``mabn train --task detection``;
* :class:`DetectionSceneSource`: the scene data set (``--data fashion-scenes --task detection``);
* :func:`coco_ground_truth`, :func:`coco_metrics`: COCO box (and mask) AP with pycocotools' ``COCOeval``;
* :func:`plot_detections`: scenes with ground-truth and predicted boxes.

``results/fashion_scenes_boxes.png`` (test scenes with their boxes; ignored regions dashed) is made by::

    python -m mabn.apps.detection --plot results/fashion_scenes_boxes.png
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InMemorySource, normalize
from .files import pyplot, save_figure
from .scenes import FASHION_MNIST_CLASSES, PALETTE, SCENE_CLASSES, Scenes, scene_figure_parser, scene_splits

__all__ = [
    "MIN_VISIBLE",
    "METRIC_KEYS",
    "SceneTargets",
    "detection_targets",
    "DetectionTensorSource",
    "DetectionSceneSource",
    "coco_ground_truth",
    "coco_metrics",
    "plot_detections",
]

#: An item is a target when at least this fraction of its foreground pixels is visible.
MIN_VISIBLE = 0.25

#: ``COCOeval.stats`` index -> metric name (percent): AP over IoU 0.5:0.95, AP at 0.5, AP at 0.75.
METRIC_KEYS = {0: "ap", 1: "ap50", 2: "ap75"}


class SceneTargets(NamedTuple):
    """Per-slot detection targets of S scenes with K item slots.

    Attributes:
        boxes: (S, K, 4) float32 boxes ``(x0, y0, x1, y1)`` of the visible pixels (0 where none).
        labels: (S, K) int64 ``class + 1`` of the visible items, 0 for empty slots and hidden items.
        targets: (S, K) bool, the items that are targets (visible enough).
        ignored: (S, K) bool, the items that are ignored regions (partly visible, below the rule).
        areas: (S, K) int64 visible pixels of each item.
    """

    boxes: Tensor
    labels: Tensor
    targets: Tensor
    ignored: Tensor
    areas: Tensor


def _visible_boxes(instances: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """(S, K, 4) float boxes and (S, K) pixel counts of each slot's pixels in (S, H, W) instance maps."""
    s, h, w = instances.shape
    boxes = torch.zeros(s, num_slots, 4)
    areas = torch.zeros(s, num_slots, dtype=torch.long)
    for k in range(num_slots):
        mine = instances == k + 1
        rows, cols = mine.any(2).to(torch.uint8), mine.any(1).to(torch.uint8)  # argmax needs numbers
        top, left = rows.argmax(1), cols.argmax(1)
        bottom, right = h - rows.flip(1).argmax(1), w - cols.flip(1).argmax(1)
        boxes[:, k] = torch.stack([left, top, right, bottom], 1).float()
        areas[:, k] = mine.flatten(1).sum(1)
    boxes[areas == 0] = 0.0
    return boxes, areas


def detection_targets(scenes: Scenes, min_visible: float = MIN_VISIBLE) -> SceneTargets:
    """Boxes, labels and ignored regions of scenes, from their instance maps (see the occlusion rule).

    Args:
        scenes: scenes made by :func:`~mabn.apps.scenes.make_scenes`.
        min_visible: the visible fraction of its foreground an item needs to be a target, in [0, 1].

    Returns:
        :class:`SceneTargets`.

    Example::

        >>> from mabn.apps.scenes import make_scenes
        >>> pool = torch.full((4, 28, 28), 200, dtype=torch.uint8)
        >>> made = make_scenes(pool, torch.arange(4), num_scenes=1, canvas=64, items=(2, 2))
        >>> targets = detection_targets(made)
        >>> targets.boxes.shape, targets.labels.shape, bool(targets.targets.any())
        (torch.Size([1, 2, 4]), torch.Size([1, 2]), True)
    """
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
    k = scenes.sides.shape[1]
    boxes, areas = _visible_boxes(scenes.instances, k)
    present = scenes.sides > 0
    fraction = areas.double() / scenes.areas.clamp(min=1).double()
    keep = present & (areas > 0) & (fraction >= min_visible)
    ignored = present & (areas > 0) & ~keep
    labels = torch.where(keep | ignored, scenes.boxes[..., 0] + 1, 0)
    return SceneTargets(boxes, labels, keep, ignored, areas)


class DetectionTensorSource(InMemorySource):
    """A detection data set in memory: uint8 images, instance maps and per-slot boxes and labels.

    Training batches are mirrored horizontally with probability 1/2 (images, boxes and masks
    together), the randomness a function of the seed and the batch indices only. Targets are lists
    of torchvision's dicts, one per image: ``"boxes"`` (n, 4) float32, ``"labels"`` (n,) int64 and,
    with ``masks=True``, ``"masks"`` (n, H, W) uint8 (each target's visible pixels). Ignored regions
    are left out of the targets and kept for :meth:`coco_ground_truth`.

    Args:
        name: the source's name (for messages).
        train, test: per split, ``(images (N, C, H, W) uint8, instances (N, H, W) uint8, objects)``
            with :class:`SceneTargets` ``objects`` whose slot ``k`` is the pixels ``instances == k + 1``.
        num_classes: classes of the detector, background included (labels lie in [1, num_classes)).
        mean, std: per-channel normalization of the pixels scaled to [0, 1].
        masks: serve instance masks (for Mask R-CNN).
        flip: random horizontal flips of the training batches.

    Raises:
        ValueError: inconsistent shapes or labels outside [0, num_classes) (the message names them).
    """

    task = "detection"

    def __init__(
        self,
        name: str,
        train: tuple[Tensor, Tensor, SceneTargets],
        test: tuple[Tensor, Tensor, SceneTargets],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        masks: bool = False,
        flip: bool = True,
    ) -> None:
        for split, (images, instances, targets) in (("train", train), ("test", test)):
            n = images.shape[0]
            if images.dim() != 4 or instances.shape != (n, *images.shape[2:]):
                raise ValueError(
                    f"{name} {split}: expected images (N, C, H, W) and instance maps (N, H, W), got "
                    f"{tuple(images.shape)} and {tuple(instances.shape)}"
                )
            if targets.boxes.shape[:1] != (n,) or targets.labels.shape != targets.boxes.shape[:2]:
                raise ValueError(f"{name} {split}: targets of {targets.boxes.shape[0]} scenes for {n} images")
            if targets.labels.numel() and (int(targets.labels.min()) < 0 or int(targets.labels.max()) >= num_classes):
                raise ValueError(f"{name} {split}: labels must lie in [0, {num_classes}) (0 = no target)")
        super().__init__(name, train[0], test[0], num_classes, mean, std)
        _, self.train_instances, self.train_objects = train
        _, self.test_instances, self.test_objects = test
        self.masks, self.flip = masks, flip
        self._coco: Any = None

    @staticmethod
    def _image_targets(
        instances: Tensor, targets: SceneTargets, rows: Tensor, mirrored: Tensor | None, masks: bool
    ) -> list[dict[str, Tensor]]:
        width = instances.shape[-1]
        out = []
        for j, i in enumerate(rows.tolist()):
            keep = targets.targets[i].nonzero().squeeze(1)
            boxes = targets.boxes[i, keep].clone()
            item: dict[str, Tensor] = {"labels": targets.labels[i, keep].clone()}
            flipped = mirrored is not None and bool(mirrored[j])
            if flipped:
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            item["boxes"] = boxes
            if masks:
                m = (instances[i][None] == (keep + 1).to(torch.uint8)[:, None, None]).to(torch.uint8)
                item["masks"] = m.flip(-1) if flipped else m
            out.append(item)
        return out

    def train_batches(self, batches: Tensor, seed: int, workers: int = 0) -> Iterator[tuple[Tensor, list]]:
        """Yield (images float32 (B, C, H, W), targets: a list of B dicts) for each row of ``batches`` (S, B)."""
        generator = torch.Generator().manual_seed(seed)
        for rows in batches:
            images = self.train_images[rows]
            mirrored = torch.rand(len(rows), generator=generator) < 0.5 if self.flip else None
            if mirrored is not None:
                images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
            targets = self._image_targets(self.train_instances, self.train_objects, rows, mirrored, self.masks)
            yield normalize(images, self.mean, self.std), targets

    def test_targets(self, start: int, stop: int) -> list[dict[str, Tensor]]:
        """The targets of test scenes ``start:stop`` (ignored regions left out)."""
        rows = torch.arange(start, min(stop, self.num_test))
        return self._image_targets(self.test_instances, self.test_objects, rows, None, self.masks)

    def coco_ground_truth(self) -> Any:
        """The test split as a pycocotools ``COCO`` object (built once), see :func:`coco_ground_truth`."""
        if self._coco is None:
            self._coco = coco_ground_truth(self.test_instances, self.test_objects)
        return self._coco


def coco_ground_truth(instances: Tensor, targets: SceneTargets, class_names: Sequence[str] = FASHION_MNIST_CLASSES):
    """A pycocotools ``COCO`` data set of scenes: image ``i`` is scene ``i``, its targets and ignored regions.

    Each annotation has the item's visible box (``[x, y, width, height]``), its visible pixel count
    as ``area``, its visible pixels as an RLE ``segmentation``, ``category_id = class + 1``, and
    ``iscrowd = 1`` for ignored regions.

    Args:
        instances: (S, H, W) instance maps (slot ``k`` is ``k + 1``).
        targets: the scenes' :class:`SceneTargets`.
        class_names: names of categories 1, 2, ...
    """
    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    s, h, w = instances.shape
    annotations = []
    for i in range(s):
        for k in (targets.targets[i] | targets.ignored[i]).nonzero().squeeze(1).tolist():
            x0, y0, x1, y1 = targets.boxes[i, k].tolist()
            rle = mask_utils.encode(np.asfortranarray((instances[i] == k + 1).numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            crowd = bool(targets.ignored[i, k])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    # COCOeval matches per category: an ignored region keeps its item's class.
                    "category_id": int(targets.labels[i, k]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(targets.areas[i, k]),
                    "iscrowd": int(crowd),
                    "segmentation": rle,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i in range(s)],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(
    ground_truth: Any, detections: Sequence[Mapping[str, Tensor]], masks: bool = False
) -> dict[str, float]:
    """COCO AP, AP50 and AP75 in percent of detections on the images of ``ground_truth`` (pycocotools' COCOeval).

    Args:
        ground_truth: a ``COCO`` object whose image ids are 0..len(detections)-1 (:func:`coco_ground_truth`).
        detections: one torchvision detection dict per image, in image order: ``"boxes"`` (n, 4)
            ``(x0, y0, x1, y1)``, ``"scores"``, ``"labels"`` (the category ids) and, for masks,
            ``"masks"`` (n, 1, H, W) probabilities (thresholded at 0.5).
        masks: also evaluate the masks.

    Returns:
        ``{"box_ap", "box_ap50", "box_ap75"}`` (and ``"mask_..."``) in percent; 0 without any detection.

    Raises:
        ValueError: a detection count different from the ground truth's image count.
    """
    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(ground_truth.getImgIds()):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth.getImgIds())} ground-truth images")
    kinds = ["bbox"] + (["segm"] if masks else [])
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for image_id, det in enumerate(detections):
        boxes = det["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        scores, labels = det["scores"].detach().cpu().tolist(), det["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            results["bbox"].append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
        if masks:
            binary = (det["masks"].detach().cpu()[:, 0] > 0.5).numpy().astype(np.uint8)
            for m, score, label in zip(binary, scores, labels):
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                results["segm"].append(
                    {"image_id": image_id, "category_id": label, "segmentation": rle, "score": score}
                )
    metrics: dict[str, float] = {}
    for kind in kinds:
        prefix = "box" if kind == "bbox" else "mask"
        if not results[kind]:
            metrics.update({f"{prefix}_{name}": 0.0 for name in METRIC_KEYS.values()})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(ground_truth, ground_truth.loadRes(results[kind]), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for index, name in METRIC_KEYS.items():
            # COCOeval reports -1 where no ground truth exists in a category/area range.
            metrics[f"{prefix}_{name}"] = round(100.0 * max(float(evaluator.stats[index]), 0.0), 4)
    return metrics


class DetectionSceneSource(DetectionTensorSource):
    """The Fashion-MNIST scene data set for detection (``--data fashion-scenes --task detection``).

    The scenes are those of :class:`~mabn.apps.scenes.SceneSource` with the same arguments (the
    same images, items and seeds); the targets follow the module's occlusion rule. Labels 1-10, so
    detectors have 11 classes, background included.

    Args:
        root: directory of the Fashion-MNIST idx files (default: the Debian package's).
        canvas: side of the scenes.
        num_train, num_test: number of scenes of each split (the first scenes of the larger set).
        seed: the data set's seed.
        min_visible: the occlusion rule's threshold.
        masks: serve instance masks in the training targets (Mask R-CNN).

    Example::

        >>> source = DetectionSceneSource(num_train=8, num_test=4)  # doctest: +SKIP
        >>> images, targets = next(source.test_batches(2))  # doctest: +SKIP
        >>> images.shape, sorted(targets[0])  # doctest: +SKIP
        (torch.Size([2, 1, 96, 96]), ['boxes', 'labels'])
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        canvas: int = 96,
        num_train: int = 12000,
        num_test: int = 1000,
        seed: int = 0,
        min_visible: float = MIN_VISIBLE,
        masks: bool = False,
    ) -> None:
        self.canvas, self.seed, self.min_visible = canvas, seed, min_visible
        self.train_scenes, self.test_scenes = scene_splits(root, canvas, num_train, num_test, seed)
        super().__init__(
            "fashion-scenes",
            (self.train_scenes.images, self.train_scenes.instances, detection_targets(self.train_scenes, min_visible)),
            (self.test_scenes.images, self.test_scenes.instances, detection_targets(self.test_scenes, min_visible)),
            num_classes=len(SCENE_CLASSES),
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
            masks=masks,
        )


def plot_detections(
    images: Tensor,
    rows: Mapping[str, Sequence[Mapping[str, Tensor]]],
    path: str | os.PathLike,
    score_min: float = 0.3,
    ignored: Sequence[Tensor] | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG of scenes (columns) with the boxes of each row: ground truth, a model's detections ...

    Boxes are drawn in the class colours of :data:`~mabn.apps.scenes.PALETTE` with the class name
    (and the score for detections, which are drawn from ``score_min`` up). The file is written to
    a temporary name and moved into place.

    Args:
        images: (n, [1,] H, W) scenes (uint8, or float scaled per image).
        rows: ``{row name: one dict per scene with "boxes" (m, 4), "labels" and optionally "scores"}``.
        path: the PNG to write (its directory is created).
        score_min: detections scoring below this are not drawn.
        ignored: per scene, (m, 4) boxes of ignored regions, drawn dashed grey on every row that has no scores.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    if images.dim() == 4:
        images = images[:, 0]
    n = images.shape[0]
    for name, dets in rows.items():
        if len(dets) != n:
            raise ValueError(f"row {name!r} has {len(dets)} scenes, the images {n}")
    cell = 2.0
    fig, axes = plt.subplots(len(rows), n, figsize=(cell * n + 0.4, cell * len(rows) + 0.5), squeeze=False)
    fig.subplots_adjust(left=0.4 / (cell * n + 0.4), right=0.995, bottom=0.01, top=1 - 0.45 / (cell * len(rows) + 0.5))
    fig.subplots_adjust(wspace=0.04, hspace=0.04)
    vrange = {"vmin": 0, "vmax": 255} if images.dtype == torch.uint8 else {}
    for r, (name, dets) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c].numpy(), cmap="gray", interpolation="nearest", **vrange)
            det = dets[c]
            scores = det.get("scores")
            for j, (box, label) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist())):
                if scores is not None and float(scores[j]) < score_min:
                    continue
                color = [v / 255 for v in PALETTE[int(label) % len(PALETTE)]]
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=1.2))
                text = SCENE_CLASSES[int(label)] if 0 <= int(label) < len(SCENE_CLASSES) else str(label)
                if scores is not None:
                    text += f" {float(scores[j]):.2f}"
                ax.text(x0, y0 - 1, text, color=color, fontsize=5, va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0})  # fmt: skip
            if ignored is not None and scores is None:
                for x0, y0, x1, y1 in ignored[c].tolist():
                    ax.add_patch(
                        Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="0.6", lw=1, ls="--")
                    )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title or "Fashion-MNIST scenes and their boxes", fontsize=10)
    return save_figure(fig, path, dpi=120)


def ground_truth_rows(source: DetectionTensorSource, n: int) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    """The first ``n`` test scenes' targets and ignored-region boxes, for :func:`plot_detections`."""
    targets = source.test_targets(0, n)
    t = source.test_objects
    ignored = [t.boxes[i, t.ignored[i]] for i in range(n)]
    return targets, ignored


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mabn.apps.detection --plot PNG``: the first test scenes with their boxes."""
    args = scene_figure_parser("python -m mabn.apps.detection", __doc__).parse_args(argv)
    source = DetectionSceneSource(args.data_dir, args.canvas, num_train=1, num_test=args.n)
    targets, ignored = ground_truth_rows(source, args.n)
    title = f"Fashion-MNIST scenes ({args.canvas} px) with their boxes; dashed: ignored (< {MIN_VISIBLE:.0%} visible)"
    print(
        plot_detections(
            source.test_images[: args.n], {"ground truth": targets}, args.plot, ignored=ignored, title=title
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
