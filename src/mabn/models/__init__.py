"""Models whose normalization and convolution layers are chosen by name: ResNets, FPN segmentation, detectors.

Classifiers have ``task = "classification"``, segmentation models ``task = "segmentation"``,
detectors ``task = "detection"``. The detectors are torchvision's (:mod:`mabn.models.detection`,
imported with torchvision only when one is built); everything else here imports torch only.

Every norm layer is built by :func:`mabn.create_norm_layer`, so ``norm_layer`` is a name
(``"bn"``, ``"mabn"``, ``"gn"``, ...), a class or a ``functools.partial``; ``conv_layer="centralized"``
uses weight-centralized convolutions (:class:`mabn.CenConv2d`, :class:`mabn.CenLinear`).
"""

from .build import ARCH_TASKS, ARCHS, DETECTION_ARCHS, build_model, encoder_of
from .fpn import FeaturePyramid
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet_small
from .segmentation import SegmentationFPN, fpn_resnet18, fpn_resnet50, fpn_resnet_small

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_small",
    "SegmentationFPN",
    "fpn_resnet_small",
    "fpn_resnet18",
    "fpn_resnet50",
    "FeaturePyramid",
    "build_model",
    "encoder_of",
    "ARCHS",
    "ARCH_TASKS",
    "DETECTION_ARCHS",
]
