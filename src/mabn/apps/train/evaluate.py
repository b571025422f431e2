"""Losses and test metrics of the tasks: top-1 error (classification), mean IoU and pixel accuracy
(segmentation), COCO box AP (detection, with mask AP for detectors that predict masks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "task_loss",
    "training_loss",
    "evaluate",
    "evaluate_folded",
    "confusion_matrix",
    "segmentation_scores",
    "METRICS",
]

#: The metrics each task reports (percent), the first one being the headline.
METRICS = {
    "classification": ("error",),
    "segmentation": ("miou", "pixel_acc"),
    "detection": ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"),
}


def task_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over classes: per image (N, K) or per pixel (N, K, H, W) against (N, H, W)."""
    return nn.functional.cross_entropy(logits, target)


def training_loss(net: nn.Module, x: Tensor, y: Any, task: str) -> tuple[Tensor, Tensor | None]:
    """The loss of one training forward, and the logits (None for detection).

    Detectors (torchvision's) take a list of images and their targets and return their losses,
    which are summed with equal weights, as torchvision's references do.
    """
    if task == "detection":
        losses = net(list(x), y)
        return torch.stack(list(losses.values())).sum(), None
    logits = net(x)
    return task_loss(logits, y), logits


def to_device(y: Any, device: torch.device) -> Any:
    """Targets on ``device``: a tensor, or detection targets (a list of dicts of tensors)."""
    if isinstance(y, Tensor):
        return y.to(device)
    return [{k: v.to(device) for k, v in t.items()} for t in y]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 counts, rows the true class and columns the predicted one."""
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """Mean IoU over the classes present in the ground truth or the predictions, and pixel accuracy (%).

    Example::

        >>> segmentation_scores(torch.tensor([[3, 1], [0, 4]]))
        {'miou': 77.5, 'pixel_acc': 87.5}
    """
    c = confusion.double()
    tp = c.diagonal()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {
        "miou": round(100.0 * float(iou.mean()), 4) if present.any() else 0.0,
        "pixel_acc": round(100.0 * float(tp.sum() / c.sum().clamp(min=1)), 4),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, source: Any, batch_size: int, device: torch.device, workers: int = 0
) -> dict[str, float]:
    """The test metrics of ``model`` (put in eval mode, restored after) on the test split of ``source``.

    Returns ``{"error": top-1 error %}`` for classification data, ``{"miou": ..., "pixel_acc": ...}``
    (percent) for segmentation data and ``{"box_ap", "box_ap50", "box_ap75"}`` (COCO, percent; plus
    ``"mask_..."`` when the detector predicts masks) for detection data.
    """
    task = getattr(source, "task", "classification")
    if task == "detection":
        return _evaluate_detection(model, source, batch_size, device, workers)
    was_training = model.training
    model.eval()
    segmentation = task == "segmentation"
    confusion = torch.zeros(source.num_classes, source.num_classes, dtype=torch.long)
    wrong = total = 0
    try:
        for x, y in source.test_batches(batch_size, workers):
            pred = model(x.to(device)).argmax(1).cpu()
            if segmentation:
                confusion += confusion_matrix(pred, y, source.num_classes)
            else:
                wrong += int((pred != y).sum())
                total += y.numel()
    finally:
        model.train(was_training)
    if segmentation:
        return segmentation_scores(confusion)
    return {"error": 100.0 * wrong / max(total, 1)}


def _evaluate_detection(
    model: nn.Module, source: Any, batch_size: int, device: torch.device, workers: int = 0
) -> dict[str, float]:
    from ..detection import coco_metrics

    was_training = model.training
    model.eval()
    detections: list[dict[str, Tensor]] = []
    try:
        for x, _ in source.test_batches(batch_size, workers):
            detections += [{k: v.cpu() for k, v in d.items()} for d in model(list(x.to(device)))]
    finally:
        model.train(was_training)
    masks = bool(detections) and "masks" in detections[0]
    return coco_metrics(source.coco_ground_truth(), detections, masks=masks)


def evaluate_folded(
    model: nn.Module, source: Any, batch_size: int, device: torch.device, workers: int = 0
) -> tuple[dict[str, float] | None, str | None]:
    """The metrics of ``mabn.fold`` of the eval model, or (None, reason) when it does not fold.

    Norm layers that cannot fold (e.g. GroupNorm, or the per-level norms of shared detection head
    convolutions) stay in the folded model as plain layers computing the same.
    """
    from ...fold import fold

    was_training = model.training
    model.eval()
    try:
        folded, _ = fold(model, return_report=True)
    except (ValueError, TypeError, NotImplementedError) as exc:
        return None, f"fold failed: {exc}"
    finally:
        model.train(was_training)
    return evaluate(folded, source, batch_size, device, workers), None
