"""ResNets whose normalization and convolution layers are chosen by name.

``resnet18``, ``resnet34`` and ``resnet50`` follow the ImageNet layout of He et al. (2016): a 7x7
stride-2 stem, a max-pool, four stages of basic or bottleneck blocks (stride on the 3x3 convolution),
global average pooling and a linear classifier; module names match the common torchvision layout
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``), so state dicts of that
layout load. ``resnet_small`` is the CIFAR-style network for 28x28 / 32x32 images: a 3x3 stem and
three stages of basic blocks of widths ``width``, ``2 * width``, ``4 * width``.
:meth:`ResNet.forward_stages` returns the output of every stage, for dense-prediction decoders
(:mod:`mabn.models.segmentation`).

Every norm layer is built by :func:`mabn.create_norm_layer`, so ``norm_layer`` is a name
(``"bn"``, ``"mabn"``, ``"gn"``, ...), a class or a ``functools.partial``; ``conv_layer="centralized"``
uses weight-centralized convolutions and classifier (:class:`mabn.CenConv2d`, :class:`mabn.CenLinear`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..conv import CenConv2d, CenLinear, check_conv
from ..factory import NormSpec, create_norm_layer
from ..recompute import checkpoint

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "EncoderDecoder",
    "NormBuilder",
    "resolve_conv",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_small",
]

ConvSpec = str | type[nn.Module] | Callable[..., nn.Module] | None

# stem name -> its stride (the max-pool's included).
_STEMS = {"imagenet": 4, "small": 1, "small_stride2": 2}


def resolve_conv(conv_layer: ConvSpec) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(conv class, linear class) for ``conv_layer``: None, "centralized", or a conv class.

    Shared by the models of this package, so that ``conv_layer`` means the same everywhere.

    Raises:
        ValueError: an unknown name. TypeError: neither None, a name nor a callable.

    Example::

        >>> resolve_conv("centralized")[0].__name__
        'CenConv2d'
    """
    if conv_layer is None or isinstance(conv_layer, str):
        return (CenConv2d, CenLinear) if check_conv(conv_layer) else (nn.Conv2d, nn.Linear)
    if callable(conv_layer):
        return conv_layer, nn.Linear
    raise TypeError(f"conv_layer must be None, 'centralized' or a class, got {conv_layer!r}")


class NormBuilder:
    """Binds a norm choice and its keyword arguments: ``self(num_features)`` builds one layer.

    Every norm layer of the models of this package is built through one of these, so by
    :func:`mabn.create_norm_layer`.

    Example::

        >>> NormBuilder("mabn", {"norm_batch_size": 2})(16).norm_batch_size
        2
    """

    def __init__(self, norm_layer: NormSpec, norm_kwargs: dict[str, Any]) -> None:
        self.norm_layer, self.norm_kwargs = norm_layer, norm_kwargs

    def __call__(self, num_features: int) -> nn.Module:
        return create_norm_layer(self.norm_layer, num_features, **self.norm_kwargs)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of ``conv1``.
        downsample: the shortcut (1x1 convolution + norm) when the shape changes, else None.
        norm: ``num_features -> norm module``.
        conv: the 2-D convolution class.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        norm: Callable[[int], nn.Module],
        conv: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        """The norm layer just before the residual addition (zero-initialized on request)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), with a residual connection.

    Args:
        inplanes: input channels.
        planes: width of the 3x3 convolution (output: ``4 * planes``).
        stride: stride of ``conv2``.
        downsample: the shortcut when the shape changes, else None.
        norm: ``num_features -> norm module``.
        conv: the 2-D convolution class.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        norm: Callable[[int], nn.Module],
        conv: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        """The norm layer just before the residual addition (zero-initialized on request)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A residual network: stem, stages of blocks, global average pooling, linear classifier.

    Use the builders (:func:`resnet18`, :func:`resnet34`, :func:`resnet50`, :func:`resnet_small`)
    rather than this class directly.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        widths: ``planes`` of each stage (the first stage has stride 1, the others stride 2).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        stem: ``"imagenet"`` (7x7 stride-2 convolution and 3x3 stride-2 max-pool), ``"small"``
            (3x3 stride-1 convolution, no pooling) or ``"small_stride2"`` (3x3 stride-2 convolution,
            no pooling: the small stem at half the resolution, for larger images).
        norm_layer, norm_kwargs: the norm layers, through :func:`mabn.create_norm_layer`.
        conv_layer: None (``nn.Conv2d``/``nn.Linear``), ``"centralized"`` (``CenConv2d``/``CenLinear``)
            or a Conv2d-like class.
        zero_init_residual: set the weight of the last norm of each block to 0, so that each block
            starts as the identity. Default: ``False``.

    Attributes:
        task: ``"classification"`` (segmentation models say ``"segmentation"``).
        stage_channels: output channels of each stage (``widths[i] * block.expansion``).
        stage_strides: total stride of each stage's output relative to the input.
        checkpoint_stages: when ``True`` and training, each stage runs under :func:`mabn.checkpoint`
            (activations recomputed in the backward pass, statistics replayed). Default: ``False``.
    """

    task = "classification"
    checkpoint_stages = False

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: list[int],
        num_classes: int,
        in_channels: int,
        stem: str,
        norm_layer: NormSpec = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        conv_layer: ConvSpec = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        if len(layers) != len(widths) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be positive ints, one per stage, got layers={layers}, widths={widths}")
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {', '.join(map(repr, _STEMS))}, got {stem!r}")
        conv, linear = resolve_conv(conv_layer)
        norm = NormBuilder(norm_layer, dict(norm_kwargs or {}))
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = conv(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        else:
            stride = 2 if stem == "small_stride2" else 1
            self.conv1 = conv(in_channels, self.inplanes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.num_stages = len(layers)
        self.stage_channels = [w * block.expansion for w in widths]
        stem_stride = _STEMS[stem]
        self.stage_strides = [stem_stride * 2**i for i in range(len(layers))]
        for i, (blocks, planes) in enumerate(zip(layers, widths)):
            stage = self._make_stage(block, planes, blocks, 1 if i == 0 else 2, norm, conv)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = linear(widths[-1] * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_stage(self, block, planes, blocks, stride, norm, conv) -> nn.Sequential:
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv(self.inplanes, out, 1, stride=stride, bias=False), norm(out))
        modules = [block(self.inplanes, planes, stride, downsample, norm, conv)]
        self.inplanes = out
        modules += [block(out, planes, 1, None, norm, conv) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialization for ReLU networks, scaled by the fan-out.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif not isinstance(m, nn.Linear) and hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
                if m.weight.dim() == 1:  # a norm layer's affine parameters
                    nn.init.ones_(m.weight)
                    if isinstance(getattr(m, "bias", None), torch.Tensor):
                        nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    weight = getattr(m.last_norm(), "weight", None)
                    if isinstance(weight, torch.Tensor):
                        nn.init.zeros_(weight)

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        stage = getattr(self, f"layer{i + 1}")
        if self.checkpoint_stages and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x)
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything but the classifier: the pooled features, shape (N, features)."""
        x = self.forward_stages(x)[-1]
        return torch.flatten(self.avgpool(x), 1)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The output of every stage, finest first: shapes (N, ``stage_channels[i]``, ~H / ``stage_strides[i]``, ...).

        Uses the stem and the stages only (not the pooling or the classifier), for dense-prediction decoders.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


class EncoderDecoder(nn.Module):
    """A model built on the stages of a :class:`ResNet` encoder (its classifier dropped), whose other
    layers come from one norm and one convolution choice: the base of the feature pyramid and of
    the segmentation FPN."""

    encoder: ResNet

    @staticmethod
    def _choices(
        encoder: ResNet, norm_layer: NormSpec, norm_kwargs: dict[str, Any] | None, conv_layer: ConvSpec
    ) -> tuple[Callable[..., nn.Module], NormBuilder]:
        """Check the shared arguments; return the conv class and the norm builder (nothing changed yet)."""
        if not isinstance(encoder, ResNet):
            raise TypeError(f"encoder must be a mabn.models.ResNet, got {type(encoder).__name__}")
        if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
            raise TypeError(f"norm_kwargs must be a dict or None, got {norm_kwargs!r}")
        conv, _ = resolve_conv(conv_layer)
        return conv, NormBuilder(norm_layer, dict(norm_kwargs or {}))

    def _take(self, encoder: ResNet) -> None:
        """Own ``encoder``, its classifier replaced by ``Identity`` (once every argument is checked)."""
        encoder.fc = nn.Identity()
        self.encoder = encoder

    @property
    def checkpoint_stages(self) -> bool:
        """The encoder's :attr:`ResNet.checkpoint_stages` (recompute its stages in the backward pass)."""
        return self.encoder.checkpoint_stages

    @checkpoint_stages.setter
    def checkpoint_stages(self, value: bool) -> None:
        self.encoder.checkpoint_stages = value


_IMAGENET_WIDTHS = [64, 128, 256, 512]


def _imagenet(block, layers, num_classes, in_channels, norm_layer, conv_layer, zero_init_residual, norm_kwargs):
    return ResNet(
        block, layers, _IMAGENET_WIDTHS, num_classes, in_channels, "imagenet",
        norm_layer, norm_kwargs, conv_layer, zero_init_residual,
    )  # fmt: skip


def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2) in the ImageNet layout.

    Args:
        num_classes: classifier outputs. Default: 1000.
        in_channels: input image channels. Default: 3.
        norm_layer: name, class or partial for :func:`mabn.create_norm_layer`. Default: ``"bn"``.
        conv_layer: None, ``"centralized"`` (weight centralization) or a Conv2d class.
        zero_init_residual: zero the weight of each block's last norm. Default: ``False``.
        **norm_kwargs: passed to every norm layer (e.g. ``norm_batch_size=2``).

    Returns:
        The model, in training mode, He-initialized.

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.resnet18(num_classes=10, norm_layer="mabn", conv_layer="centralized")
        >>> model.eval()(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    return _imagenet(
        BasicBlock, [2, 2, 2, 2], num_classes, in_channels, norm_layer, conv_layer, zero_init_residual, norm_kwargs
    )


def resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3) in the ImageNet layout; arguments as :func:`resnet18`.

    Example::

        >>> import mabn
        >>> mabn.models.resnet34(norm_layer="gn").bn1.num_groups
        32
    """
    return _imagenet(
        BasicBlock, [3, 4, 6, 3], num_classes, in_channels, norm_layer, conv_layer, zero_init_residual, norm_kwargs
    )


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> ResNet:
    """ResNet-50 (bottleneck blocks 3-4-6-3, stride on the 3x3) in the ImageNet layout; arguments as :func:`resnet18`.

    Example::

        >>> import mabn
        >>> model = mabn.models.resnet50(norm_layer="mabn", conv_layer="centralized", norm_batch_size=2)
        >>> sum(p.numel() for p in model.parameters())
        25557032
    """
    return _imagenet(
        Bottleneck, [3, 4, 6, 3], num_classes, in_channels, norm_layer, conv_layer, zero_init_residual, norm_kwargs
    )


def resnet_small(
    num_classes: int = 10,
    in_channels: int = 1,
    depth: int = 1,
    width: int = 16,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> ResNet:
    """A ResNet for 28x28 / 32x32 images: 3x3 stem, three stages of basic blocks, no max-pool.

    Stage widths are ``width``, ``2 * width``, ``4 * width`` (16/32/64 by default) with strides 1, 2,
    2; ``depth`` basic blocks per stage (``depth=3`` is the CIFAR ResNet-20).

    Args:
        num_classes: classifier outputs. Default: 10.
        in_channels: input image channels. Default: 1 (Fashion-MNIST).
        depth: basic blocks per stage. Default: 1.
        width: channels of the first stage. Default: 16.
        norm_layer, conv_layer, zero_init_residual, **norm_kwargs: as in :func:`resnet18`.

    Returns:
        The model, in training mode, He-initialized.

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.resnet_small(norm_layer="mabn", conv_layer="centralized", norm_batch_size=2)
        >>> model(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    check_int("depth", depth, 1)
    check_int("width", width, 1)
    return ResNet(
        BasicBlock, [depth] * 3, [width, 2 * width, 4 * width], num_classes, in_channels, "small",
        norm_layer, norm_kwargs, conv_layer, zero_init_residual,
    )  # fmt: skip
