"""Models whose normalization and convolution layers are chosen by name: ResNets, FPN segmentation, their builder.

Classifiers have ``task = "classification"``, segmentation models ``task = "segmentation"``.

Every norm layer is built by :func:`mabn.create_norm_layer`, so ``norm_layer`` is a name
(``"bn"``, ``"mabn"``, ``"gn"``, ...), a class or a ``functools.partial``; ``conv_layer="centralized"``
uses weight-centralized convolutions (:class:`mabn.CenConv2d`, :class:`mabn.CenLinear`).
"""

from .build import ARCH_TASKS, ARCHS, build_model
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
    "build_model",
    "ARCHS",
    "ARCH_TASKS",
]
