"""Models whose normalization and convolution layers are chosen by name: ResNets and their builder.

Every norm layer is built by :func:`mabn.create_norm_layer`, so ``norm_layer`` is a name
(``"bn"``, ``"mabn"``, ``"gn"``, ...), a class or a ``functools.partial``; ``conv_layer="centralized"``
uses weight-centralized convolutions (:class:`mabn.CenConv2d`, :class:`mabn.CenLinear`).
"""

from .build import ARCHS, build_model
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet_small

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_small",
    "build_model",
    "ARCHS",
]
