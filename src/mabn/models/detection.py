"""torchvision's detectors (FCOS, RetinaNet, Mask R-CNN) on a :class:`~mabn.models.FeaturePyramid`, every norm by name.

This module imports torchvision. The rest of :mod:`mabn.models` imports torch only and reaches this
module lazily: :func:`mabn.models.build_model` imports it when a detection architecture is built,
and ``import mabn`` never does.

What comes from torchvision: the detector classes (``FCOS``, ``RetinaNet``, ``MaskRCNN``), their
matching, losses, anchors, RoI pooling and post-processing, and the predictors of the heads. What
this module adds:

* the backbone: a :class:`~mabn.models.ResNet` with a :class:`~mabn.models.FeaturePyramid`;
* the heads' convolution towers (:class:`LevelTower`) with every norm layer built by
  :func:`mabn.create_norm_layer` (torchvision's one-stage heads hard-code GroupNorm or no norm);
* for Mask R-CNN, the paper's "4conv1fc" box head and a 4-convolution mask head, each convolution
  followed by a norm from the factory;
* :class:`PreparedImages`, a transform that batches images without resizing or normalizing them
  (the data sources of ``mabn train`` already deliver normalized images of the model's size).

**Norm layers in heads shared across levels.** One-stage heads run the same convolutions on every
level of the pyramid. A norm layer there would be called once per level and step: its statistics
stream would mix levels of very different statistics, and layers that count calls (MABN's windows
and warm-ups, gradient accumulation, syncing across processes) would count levels as steps. So,
as detectron2 does for BatchNorm in RetinaNet's head, the convolutions are shared and each level has
norm layers of its own (:class:`LevelTower`): every norm layer is called once per forward, on the
whole batch of its level, and its window, warm-up and accumulation count steps exactly as in the
backbone. GroupNorm gets per-level affine parameters the same way, so every row of a comparison
has the same head.

**Batch statistics in the heads first** (the paper's Table 5 recipe): ``head_warmup_iters=N`` makes
the heads' norm layers use their batch statistics for their first N steps, whatever the backbone's
warm-up (``warmup_iters`` of a moving-average norm such as ``"mabn"``).

**Folding.** :func:`mabn.fold` merges every convolution and norm of the backbone, the pyramid and the
RoI heads. The one-stage towers' norm layers follow convolutions shared by all levels, so no single
convolution can absorb them; fold leaves them as plain per-channel affine layers
(``nn.BatchNorm2d``), which compute the same.

Example::

    >>> import mabn, torch
    >>> model = mabn.models.build_model({"arch": "fcos_resnet_small", "norm": "mabn", "conv": "centralized",
    ...                                  "norm_kwargs": {"norm_batch_size": 2}})
    >>> images = [torch.randn(1, 96, 96) for _ in range(2)]
    >>> targets = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([3])}] * 2
    >>> sorted(model(images, targets))
    ['bbox_ctrness', 'bbox_regression', 'classification']
    >>> sorted(model.eval()(images)[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from .._checks import check_int
from ..factory import NormSpec
from .fpn import FeaturePyramid
from .resnet import BasicBlock, ConvSpec, NormBuilder, ResNet, resolve_conv

__all__ = [
    "LevelTower",
    "FCOSLevelHead",
    "RetinaNetLevelHead",
    "PreparedImages",
    "fcos_resnet_small",
    "retinanet_resnet_small",
    "maskrcnn_resnet_small",
]

#: The task of every detector built here (``mabn.models.ARCH_TASKS``).
TASK = "detection"


class LevelTower(nn.Module):
    """3x3 convolutions shared across the pyramid's levels, each followed by a norm of its level and a ReLU.

    ``convs[i]`` is shared; ``norms[level][i]`` belongs to one level. See the module docstring for why.

    Args:
        channels: input and output channels.
        num_convs: depth of the tower (0 makes it the identity).
        num_levels: number of pyramid levels the tower runs on.
        norm: ``num_features -> norm module`` (e.g. a :class:`~mabn.models.resnet.NormBuilder`).
        conv: the convolution class (``nn.Conv2d``, :class:`mabn.CenConv2d`, ...).

    Shape:
        a list of ``num_levels`` maps (N, channels, H_l, W_l) -> a list of maps of the same shapes.

    Example::

        >>> import torch
        >>> from mabn.models.resnet import NormBuilder
        >>> tower = LevelTower(8, 2, 3, NormBuilder("mabn", {}), nn.Conv2d)
        >>> [tuple(y.shape) for y in tower([torch.randn(2, 8, s, s) for s in (12, 6, 3)])]
        [(2, 8, 12, 12), (2, 8, 6, 6), (2, 8, 3, 3)]
    """

    def __init__(
        self, channels: int, num_convs: int, num_levels: int, norm: Callable[[int], nn.Module], conv: Callable
    ) -> None:
        super().__init__()
        for name, value, low in (("channels", channels, 1), ("num_convs", num_convs, 0), ("num_levels", num_levels, 1)):
            check_int(name, value, low)
        self.convs = nn.ModuleList(conv(channels, channels, 3, padding=1, bias=False) for _ in range(num_convs))
        self.norms = nn.ModuleList(nn.ModuleList(norm(channels) for _ in range(num_convs)) for _ in range(num_levels))
        self.relu = nn.ReLU(inplace=True)
        for m in self.convs:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.norms):
            raise ValueError(f"this tower has norm layers for {len(self.norms)} levels, got {len(features)} maps")
        out = []
        for x, norms in zip(features, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = self.relu(norm(conv(x)))
            out.append(x)
        return out


class FCOSLevelHead(FCOSHead):
    """torchvision's FCOS head (predictors, losses) behind two :class:`LevelTower` s.

    torchvision's predictors are built with no convolutions of their own (``num_convs=0``); the
    classification tower feeds the class logits, the regression tower the box distances and the
    centerness, as in FCOS.

    Args:
        in_channels: width of the pyramid.
        num_classes: class logits per position.
        num_levels: levels of the pyramid.
        num_convs: depth of each tower.
        norm: ``num_features -> norm module`` for the towers.
        conv: the towers' convolution class.
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_levels: int, num_convs: int, norm: Callable, conv: Callable
    ) -> None:
        super().__init__(in_channels, 1, num_classes, num_convs=0)
        self.classification_tower = LevelTower(in_channels, num_convs, num_levels, norm, conv)
        self.regression_tower = LevelTower(in_channels, num_convs, num_levels, norm, conv)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        regression, centerness = self.regression_head(self.regression_tower(x))
        return {
            "cls_logits": self.classification_head(self.classification_tower(x)),
            "bbox_regression": regression,
            "bbox_ctrness": centerness,
        }


class RetinaNetLevelHead(RetinaNetHead):
    """torchvision's RetinaNet head (predictors, losses) behind two :class:`LevelTower` s.

    torchvision's sub-heads hard-code four convolutions without a configurable class; they are
    replaced by the identity and the towers run first.

    Args:
        in_channels: width of the pyramid.
        num_anchors: anchors per position.
        num_classes: class logits per anchor.
        num_levels, num_convs, norm, conv: as :class:`FCOSLevelHead`.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_levels: int,
        num_convs: int,
        norm: Callable,
        conv: Callable,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes)
        self.classification_head.conv = nn.Sequential()
        self.regression_head.conv = nn.Sequential()
        self.classification_tower = LevelTower(in_channels, num_convs, num_levels, norm, conv)
        self.regression_tower = LevelTower(in_channels, num_convs, num_levels, norm, conv)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {
            "cls_logits": self.classification_head(self.classification_tower(x)),
            "bbox_regression": self.regression_head(self.regression_tower(x)),
        }


class PreparedImages(GeneralizedRCNNTransform):
    """torchvision's detection transform without resizing or normalization: images are used as given.

    ``mabn train`` sources deliver normalized images at the model's size, so only the batching
    (zero padding to a multiple of ``size_divisible``) and the post-processing of torchvision's
    transform remain.

    Args:
        size_divisible: pad the batch's height and width to a multiple of this. Default: 32.
    """

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0], size_divisible=size_divisible)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


_STEMS = {2: "small_stride2", 4: "imagenet"}


def _parts(
    in_channels: int,
    depth: int,
    width: int,
    stem_stride: int,
    fpn_channels: int | None,
    stages: Sequence[int],
    extra_levels: int,
    norm_layer: NormSpec,
    norm_kwargs: dict[str, Any],
    conv_layer: ConvSpec,
    head_warmup_iters: int | None,
) -> tuple[FeaturePyramid, Callable[..., nn.Module], NormBuilder]:
    """What every detector here is built from: the backbone, and the convolution and norm of its heads."""
    conv, _ = resolve_conv(conv_layer)
    depth, width = check_int("depth", depth, 1), check_int("width", width, 1)
    if stem_stride not in _STEMS or isinstance(stem_stride, bool):
        raise ValueError(f"stem_stride must be 2 or 4, got {stem_stride!r}")
    encoder = ResNet(
        BasicBlock, [depth] * 3, [width, 2 * width, 4 * width], 1, in_channels, _STEMS[stem_stride],
        norm_layer, norm_kwargs, conv_layer,
    )  # fmt: skip
    channels = 2 * width if fpn_channels is None else check_int("fpn_channels", fpn_channels, 1)
    backbone = FeaturePyramid(encoder, channels, stages, extra_levels, norm_layer, norm_kwargs, conv_layer)
    return backbone, conv, _head_norm(norm_layer, norm_kwargs, head_warmup_iters)


def _head_norm(norm_layer: NormSpec, norm_kwargs: dict[str, Any], head_warmup_iters: int | None) -> NormBuilder:
    kwargs = dict(norm_kwargs)
    if head_warmup_iters is not None:
        kwargs["warmup_iters"] = check_int("head_warmup_iters", head_warmup_iters, 0)
    return NormBuilder(norm_layer, kwargs)


def _finish(model: nn.Module, size_divisible: int) -> nn.Module:
    model.transform = PreparedImages(size_divisible)
    model.task = TASK
    return model


def fcos_resnet_small(
    num_classes: int = 11,
    in_channels: int = 1,
    depth: int = 1,
    width: int = 16,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    fpn_channels: int | None = None,
    stages: Sequence[int] = (1, 2),
    extra_levels: int = 0,
    stem_stride: int = 2,
    head_convs: int = 2,
    head_warmup_iters: int | None = None,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    **norm_kwargs: Any,
) -> FCOS:
    """torchvision's FCOS on a small ResNet with a feature pyramid, every norm from the factory.

    The defaults fit the 96 px Fashion-MNIST scenes (items 28-56 px wide). The encoder is the
    segmentation model's (:func:`~mabn.models.fpn_resnet_small`): a 3x3 stride-2 stem and three stages
    of ``width``, ``2 * width``, ``4 * width`` channels at strides 2, 4 and 8, so a ``resnet_small``
    classifier's weights fit it (``mabn train --init``). The pyramid takes the last two stages
    (strides 4 and 8: 24x24 and 12x12 positions at 96 px). FCOS's anchor point of a level has the
    level's stride as its size, so by FCOS's scale ranges the stride-4 level takes objects whose
    farthest edge is within 32 px of the point and the stride-8 level the others.

    Args:
        num_classes: class logits, background included. Default: 11 (the scenes' classes; label 0
            is never a target).
        in_channels: image channels. Default: 1.
        depth: basic blocks per stage. Default: 1.
        width: channels of the first stage. Default: 16.
        norm_layer: every norm of the backbone, the pyramid and the heads (a name, class or partial
            for :func:`mabn.create_norm_layer`). Default: ``"bn"``.
        conv_layer: None, ``"centralized"`` (weight centralization of every convolution followed
            by a norm; the predictors stay plain) or a Conv2d class.
        fpn_channels: width of the pyramid and the heads. Default: ``2 * width``.
        stages: encoder stages that become pyramid levels. Default: ``(1, 2)``.
        extra_levels: coarser levels after the last stage's. Default: 0.
        stem_stride: 2 (3x3 stride-2 convolution) or 4 (7x7 stride-2 convolution and max-pool). Default: 2.
        head_convs: depth of each head tower. Default: 2 (FCOS uses 4 at COCO scale).
        head_warmup_iters: the heads' norms use their batch statistics for this many steps
            (``warmup_iters`` of moving-average norms; None: the same as the backbone's).
        score_thresh, detections_per_img: post-processing of the detections. Defaults: 0.05, 100.
        **norm_kwargs: passed to every norm layer (e.g. ``norm_batch_size=2``).

    Returns:
        The detector, in training mode: ``model(images, targets)`` returns the losses,
        ``model.eval()(images)`` the detections (see torchvision's ``FCOS``).

    Raises:
        TypeError: a size that is not an int. ValueError: a bad size or option (named in the message).
    """
    backbone, conv, norm = _parts(in_channels, depth, width, stem_stride, fpn_channels, stages, extra_levels,
                                  norm_layer, norm_kwargs, conv_layer, head_warmup_iters)  # fmt: skip
    levels = len(backbone.strides)
    head = FCOSLevelHead(backbone.out_channels, check_int("num_classes", num_classes, 2), levels,
                         check_int("head_convs", head_convs, 0), norm, conv)  # fmt: skip
    anchors = AnchorGenerator(tuple((s,) for s in backbone.strides), ((1.0,),) * levels)
    model = FCOS(
        backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )  # fmt: skip
    return _finish(model, backbone.strides[-1])


def retinanet_resnet_small(
    num_classes: int = 11,
    in_channels: int = 1,
    depth: int = 1,
    width: int = 16,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    fpn_channels: int | None = None,
    stages: Sequence[int] = (1, 2),
    extra_levels: int = 1,
    stem_stride: int = 2,
    head_convs: int = 2,
    head_warmup_iters: int | None = None,
    anchor_scale: float = 4.0,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    **norm_kwargs: Any,
) -> RetinaNet:
    """torchvision's RetinaNet on a small ResNet with a feature pyramid, every norm from the factory.

    Anchors as RetinaNet's: at each level three sizes (``anchor_scale * stride`` times 1, 2^(1/3),
    2^(2/3)) and three aspect ratios (1:2, 1:1, 2:1). The default pyramid has strides 4, 8 and 16 (the
    last two stages and one extra level), so the anchors span 16-102 px. Arguments as
    :func:`fcos_resnet_small`, plus ``anchor_scale``.

    Returns:
        The detector, in training mode (see torchvision's ``RetinaNet``).
    """
    backbone, conv, norm = _parts(in_channels, depth, width, stem_stride, fpn_channels, stages, extra_levels,
                                  norm_layer, norm_kwargs, conv_layer, head_warmup_iters)  # fmt: skip
    levels = len(backbone.strides)
    sizes = tuple(tuple(round(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    head = RetinaNetLevelHead(
        backbone.out_channels, anchors.num_anchors_per_location()[0], check_int("num_classes", num_classes, 2),
        levels, check_int("head_convs", head_convs, 0), norm, conv,
    )  # fmt: skip
    model = RetinaNet(
        backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )  # fmt: skip
    return _finish(model, backbone.strides[-1])


def _roi_convs(channels: int, count: int, norm: Callable, conv: Callable) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(count):
        layer = conv(channels, channels, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        layers.append(nn.Sequential(layer, norm(channels), nn.ReLU(inplace=True)))
    return layers


def maskrcnn_resnet_small(
    num_classes: int = 11,
    in_channels: int = 1,
    depth: int = 1,
    width: int = 16,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    fpn_channels: int | None = None,
    stages: Sequence[int] = (1, 2),
    extra_levels: int = 1,
    stem_stride: int = 2,
    head_convs: int = 4,
    representation: int = 128,
    head_warmup_iters: int | None = None,
    anchor_scale: float = 4.0,
    rois_per_image: int = 128,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    **norm_kwargs: Any,
) -> MaskRCNN:
    """torchvision's Mask R-CNN on a small ResNet with a feature pyramid, norms in the backbone and the RoI heads.

    The box head is the paper's "4conv1fc": ``head_convs`` 3x3 convolutions, each with a norm and a
    ReLU, on the 7x7 RoI features, then one fully connected layer of ``representation`` features;
    the mask head is ``head_convs`` such convolutions on the 14x14 RoI features before torchvision's
    mask predictor. The RPN keeps torchvision's head (one convolution, no norm, as in detectron2).
    RPN anchors: one size per level, ``anchor_scale * stride``, with aspect ratios 1:2, 1:1, 2:1.

    The RoI heads' norm layers see the RoIs of the whole batch as their batch (each image contributes
    a varying number of RoIs, the mask head's positives), so they cannot split it into groups of
    images: Mask R-CNN refuses ``norm_batch_size``; simulate devices of a few images with gradient
    accumulation instead (``mabn train --accumulate``), where each micro-batch is one device.

    Arguments as :func:`fcos_resnet_small`, plus ``representation`` (width of the box head's fully
    connected layer), ``rois_per_image`` (RoIs sampled per image for the box head's loss) and
    ``anchor_scale``.

    Returns:
        The detector, in training mode (see torchvision's ``MaskRCNN``).

    Raises:
        TypeError: a size that is not an int. ValueError: ``norm_batch_size`` given, or a bad size or
        option.
    """
    if norm_kwargs.get("norm_batch_size") is not None:
        raise ValueError(
            "maskrcnn_resnet_small normalizes each RoI head over the RoIs of the whole batch: norm_batch_size "
            f"({norm_kwargs['norm_batch_size']}) cannot split it by images; use gradient accumulation instead"
        )
    backbone, conv, norm = _parts(in_channels, depth, width, stem_stride, fpn_channels, stages, extra_levels,
                                  norm_layer, norm_kwargs, conv_layer, head_warmup_iters)  # fmt: skip
    channels, names = backbone.out_channels, backbone.names
    head_convs, representation = check_int("head_convs", head_convs, 0), check_int("representation", representation, 1)
    box_head = nn.Sequential(
        *_roi_convs(channels, head_convs, norm, conv),
        nn.Flatten(),
        nn.Linear(channels * 7 * 7, representation),
        nn.ReLU(inplace=True),
    )
    mask_head = nn.Sequential(*_roi_convs(channels, head_convs, norm, conv))
    num_classes = check_int("num_classes", num_classes, 2)
    anchors = AnchorGenerator(tuple((round(anchor_scale * s),) for s in backbone.strides),
                              ((0.5, 1.0, 2.0),) * len(names))  # fmt: skip
    model = MaskRCNN(
        backbone,
        None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_batch_size_per_image=check_int("rois_per_image", rois_per_image, 1),
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    )
    return _finish(model, backbone.strides[-1])
