"""FPN semantic segmentation on the package's ResNets, with every norm layer chosen by name.

:class:`SegmentationFPN` puts a feature-pyramid decoder (Lin et al. 2017; the semantic head follows
Kirillov et al. 2019 in spirit, reduced to its finest level) on a :class:`~mabn.models.ResNet`
encoder:

* a lateral 1x1 convolution + norm on the output of every stage, to ``decoder_channels``;
* a top-down path: from the coarsest level down, the merged map is upsampled by a 2x2 stride-2
  ``nn.ConvTranspose2d`` + norm + ReLU and added to the next finer lateral;
* a 3x3 convolution + norm + ReLU on the finest merged map, a 1x1 classifier convolution with bias;
* a bilinear resize of the logits to the input size.

Every norm layer, in the encoder and in the decoder, is built by :func:`mabn.create_norm_layer`
from ``norm_layer`` and its keyword arguments, and every convolution and transposed convolution is
directly followed by its norm, so that :func:`mabn.fold` merges all of them for inference (the model
is ``torch.fx``-traceable). ``conv_layer="centralized"`` makes the encoder and decoder convolutions
and the classifier weight-centralized (:class:`mabn.CenConv2d`); the transposed convolutions stay
plain ``nn.ConvTranspose2d``.

Any input height and width work, not only multiples of the total stride: a stride-2 layer maps a
side ``h`` to ``ceil(h / 2)``, so an upsampled map is at most one row or column larger than the
finer lateral it joins and is cropped to it; the final resize restores the input size exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..factory import NormSpec
from .resnet import BasicBlock, ConvSpec, EncoderDecoder, ResNet, resnet18, resnet50

__all__ = ["SegmentationFPN", "fpn_resnet_small", "fpn_resnet18", "fpn_resnet50"]


class SegmentationFPN(EncoderDecoder):
    """A ResNet encoder with an FPN decoder that predicts a class score for every pixel.

    Use the builders (:func:`fpn_resnet_small`, :func:`fpn_resnet18`, :func:`fpn_resnet50`) rather
    than this class directly. The encoder's classifier is replaced by ``nn.Identity`` (it would hold
    parameters that receive no gradient); its stem and stages are used through
    :meth:`ResNet.forward_stages`.

    Args:
        encoder: a :class:`~mabn.models.ResNet` (its ``stage_channels`` set the lateral widths).
        num_classes: channels of the output (one score map per class).
        decoder_channels: width of every lateral, top-down and head layer.
        norm_layer, norm_kwargs: the decoder's norm layers, through :func:`mabn.create_norm_layer`
            (the builders pass the encoder's choice).
        conv_layer: None (``nn.Conv2d``), ``"centralized"`` (:class:`mabn.CenConv2d`) or a
            Conv2d-like class, for the decoder convolutions and the classifier.

    Attributes:
        task: ``"segmentation"`` (classifiers say ``"classification"``).
        encoder, lateral, upsample, head, classifier: the parts described in the module docstring;
            ``upsample[i]`` brings level ``i + 1`` to level ``i``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`, any :math:`H, W \\geq 1`.
        - Output: :math:`(N, \\text{num\\_classes}, H, W)`, logits.

    Example::

        >>> import mabn, torch
        >>> encoder = mabn.models.resnet_small(width=8, norm_layer="mabn")
        >>> model = mabn.models.SegmentationFPN(encoder, num_classes=5, decoder_channels=16, norm_layer="mabn")
        >>> model.eval()(torch.randn(1, 1, 30, 45)).shape
        torch.Size([1, 5, 30, 45])
    """

    task = "segmentation"

    def __init__(
        self,
        encoder: ResNet,
        num_classes: int,
        decoder_channels: int,
        norm_layer: NormSpec = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        conv_layer: ConvSpec = None,
    ) -> None:
        super().__init__()
        conv, norm = self._choices(encoder, norm_layer, norm_kwargs, conv_layer)
        num_classes = check_int("num_classes", num_classes, 1)
        width = check_int("decoder_channels", decoder_channels, 1)
        self._take(encoder)
        channels = list(encoder.stage_channels)
        self.lateral = nn.ModuleList(nn.Sequential(conv(c, width, 1, bias=False), norm(width)) for c in channels)
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2, bias=False), norm(width), nn.ReLU(inplace=True))
            for _ in channels[1:]
        )
        self.head = nn.Sequential(conv(width, width, 3, padding=1, bias=False), norm(width), nn.ReLU(inplace=True))
        self.classifier = conv(width, num_classes, 1, bias=True)
        self._init_decoder()

    def _init_decoder(self) -> None:
        for part in (self.lateral, self.upsample, self.head):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.ConvTranspose2d):
                    # A 2x2 stride-2 transposed conv gives each output pixel one tap per input
                    # channel, so the He fan-in is in_channels / groups (torch's formula assumes k*k).
                    nn.init.normal_(m.weight, std=math.sqrt(2.0 / (m.in_channels // m.groups)))
        # Small logits at the start: every class about equally likely at every pixel.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        features = self.encoder.forward_stages(x)
        y = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            up = self.upsample[i](y)
            # ceil-halving strides make the upsampled map up to one row/column larger: crop it.
            y = lateral + up[:, :, : lateral.shape[-2], : lateral.shape[-1]]
        y = self.classifier(self.head(y))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def fpn_resnet_small(
    num_classes: int = 11,
    in_channels: int = 1,
    depth: int = 1,
    width: int = 16,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    decoder_channels: int | None = None,
    zero_init_residual: bool = False,
    stem_stride: int = 2,
    **norm_kwargs: Any,
) -> SegmentationFPN:
    """FPN segmentation on :func:`~mabn.models.resnet_small` (three stages, strides 1, 2, 2 after the stem).

    The default stem is the small 3x3 stem with stride 2 (``stem_stride=2``): for the 96-128 px scenes
    of the dense-prediction stand-in (items 28-56 px) it cuts the encoder's cost 4x, the stages see
    the image at strides 2, 4 and 8 (the coarsest level still has 12x12 positions at 96 px, and the
    smallest item spans 3-4 of them), and the logits come at stride 2 before the final resize.
    ``stem_stride=1`` keeps the classifier's full-resolution stem (strides 1, 2, 4).

    Args:
        num_classes: output score maps. Default: 11 (background + the 10 Fashion-MNIST classes).
        in_channels: input image channels. Default: 1.
        depth: basic blocks per stage. Default: 1.
        width: channels of the first stage (stages: ``width``, ``2 * width``, ``4 * width``). Default: 16.
        norm_layer: name, class or partial for :func:`mabn.create_norm_layer`, for every norm of the
            encoder and the decoder. Default: ``"bn"``.
        conv_layer: None, ``"centralized"`` (weight centralization) or a Conv2d class.
        decoder_channels: width of the decoder. Default: ``2 * width``.
        zero_init_residual: zero the weight of each encoder block's last norm. Default: ``False``.
        stem_stride: 1 or 2, the stride of the 3x3 stem. Default: 2.
        **norm_kwargs: passed to every norm layer (e.g. ``norm_batch_size=2``).

    Returns:
        The model, in training mode.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W) for any H, W.

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.fpn_resnet_small(norm_layer="mabn", conv_layer="centralized", norm_batch_size=2)
        >>> model(torch.randn(2, 1, 96, 90)).shape
        torch.Size([2, 11, 96, 90])
    """
    if isinstance(stem_stride, bool) or stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
    depth = check_int("depth", depth, 1)
    width = check_int("width", width, 1)
    stem = "small_stride2" if stem_stride == 2 else "small"
    encoder = ResNet(
        BasicBlock, [depth] * 3, [width, 2 * width, 4 * width], 1, in_channels, stem,
        norm_layer, norm_kwargs, conv_layer, zero_init_residual,
    )  # fmt: skip
    decoder = 2 * width if decoder_channels is None else decoder_channels
    return SegmentationFPN(encoder, num_classes, decoder, norm_layer, norm_kwargs, conv_layer)


def _imagenet_fpn(
    make_encoder: Callable[..., ResNet],
    default_decoder: int,
    num_classes: int,
    in_channels: int,
    norm_layer: NormSpec,
    conv_layer: ConvSpec,
    decoder_channels: int | None,
    zero_init_residual: bool,
    norm_kwargs: dict[str, Any],
) -> SegmentationFPN:
    encoder = make_encoder(1, in_channels, norm_layer, conv_layer, zero_init_residual=zero_init_residual, **norm_kwargs)
    decoder = default_decoder if decoder_channels is None else decoder_channels
    return SegmentationFPN(encoder, num_classes, decoder, norm_layer, norm_kwargs, conv_layer)


def fpn_resnet18(
    num_classes: int = 21,
    in_channels: int = 3,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    decoder_channels: int | None = None,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> SegmentationFPN:
    """FPN segmentation on :func:`~mabn.models.resnet18` (ImageNet layout: stages at strides 4, 8, 16, 32).

    The logits come at stride 4 (the finest stage) and are resized to the input.

    Args:
        num_classes: output score maps. Default: 21 (Pascal VOC: 20 classes and background).
        in_channels: input image channels. Default: 3.
        norm_layer: name, class or partial for :func:`mabn.create_norm_layer`, for every norm of the
            encoder and the decoder. Default: ``"bn"``.
        conv_layer: None, ``"centralized"`` (weight centralization) or a Conv2d class.
        decoder_channels: width of the decoder. Default: 128 (a quarter of the last stage's 512).
        zero_init_residual: zero the weight of each encoder block's last norm. Default: ``False``.
        **norm_kwargs: passed to every norm layer (e.g. ``norm_batch_size=2``).

    Returns:
        The model, in training mode.

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, H, W) for any H, W.

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.fpn_resnet18(num_classes=4, norm_layer="gn")
        >>> model.eval()(torch.randn(1, 3, 65, 100)).shape
        torch.Size([1, 4, 65, 100])
    """
    return _imagenet_fpn(resnet18, 128, num_classes, in_channels, norm_layer, conv_layer,
                         decoder_channels, zero_init_residual, norm_kwargs)  # fmt: skip


def fpn_resnet50(
    num_classes: int = 21,
    in_channels: int = 3,
    norm_layer: NormSpec = "bn",
    conv_layer: ConvSpec = None,
    *,
    decoder_channels: int | None = None,
    zero_init_residual: bool = False,
    **norm_kwargs: Any,
) -> SegmentationFPN:
    """FPN segmentation on :func:`~mabn.models.resnet50` (the paper's Mask R-CNN backbone layout).

    Arguments as :func:`fpn_resnet18`, except ``decoder_channels`` (default: 256, the FPN paper's).

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.fpn_resnet50(norm_layer="mabn", conv_layer="centralized", norm_batch_size=1)
        >>> model.eval()(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 21, 64, 64])
    """
    return _imagenet_fpn(resnet50, 256, num_classes, in_channels, norm_layer, conv_layer,
                         decoder_channels, zero_init_residual, norm_kwargs)  # fmt: skip
