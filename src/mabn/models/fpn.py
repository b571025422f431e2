"""A feature pyramid on the package's ResNets, for detection: every level the same width, every norm by name.

:class:`FeaturePyramid` turns the stage outputs of a :class:`~mabn.models.ResNet` into a pyramid of
maps of ``out_channels`` channels, as the FPN of Lin et al. (2017) does:

* a lateral 1x1 convolution + norm on each chosen stage;
* a top-down path: from the coarsest level down, the merged map is upsampled (nearest neighbour, to
  the exact size of the finer lateral) and added to that lateral;
* a 3x3 output convolution + norm on every merged map;
* optionally extra coarser levels, each a 3x3 stride-2 convolution + norm on the previous level
  (after a ReLU from the second extra level on), as RetinaNet's P6 and P7.

The norm layers follow detectron2's FPN with ``norm`` set (a norm after the lateral and the output
convolutions, no activation): they are built by :func:`mabn.create_norm_layer` from ``norm_layer``,
so the backbone and the pyramid use the same normalization. Each convolution is directly followed
by its norm inside an ``nn.Sequential``, so :func:`mabn.fold` merges all of them, with or without a
``torch.fx`` trace of the model around the pyramid (the detectors of torchvision cannot be traced).

The output is an ``OrderedDict`` of the levels, finest first, named ``"p<k>"`` for stride ``2**k``:
the interface torchvision's detectors expect of a backbone, together with the attribute
``out_channels``. This module imports torch only; :mod:`mabn.models.detection` puts torchvision's
detectors on it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..factory import NormSpec
from .resnet import ConvSpec, EncoderDecoder, ResNet

__all__ = ["FeaturePyramid"]


class FeaturePyramid(EncoderDecoder):
    """A ResNet encoder and an FPN: multi-scale feature maps of one width, for detection heads.

    Args:
        encoder: a :class:`~mabn.models.ResNet`; its classifier is replaced by ``nn.Identity``
            (it would hold parameters without gradient) and its stages are used through
            :meth:`ResNet.forward_stages`.
        out_channels: width of every level.
        stages: indices of the encoder stages that become levels (increasing). Default: all.
        extra_levels: coarser levels added after the last stage's, each at twice the stride. Default: 0.
        norm_layer, norm_kwargs: the pyramid's norm layers, through :func:`mabn.create_norm_layer`.
        conv_layer: None (``nn.Conv2d``), ``"centralized"`` (:class:`mabn.CenConv2d`) or a Conv2d-like class.

    Attributes:
        encoder, lateral, output, extra: the parts described in the module docstring.
        out_channels: channels of every level (what torchvision's detectors read).
        strides: stride of each level relative to the input, finest first.
        names: the keys of the output, ``"p<log2(stride)>"``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`, any :math:`H, W \\geq 1`.
        - Output: ``OrderedDict`` name -> :math:`(N, \\text{out\\_channels}, \\lceil H / s \\rceil, \\lceil W / s \\rceil)`
          for each level's stride :math:`s` (ceil-halving convolutions).

    Raises:
        TypeError: ``encoder`` is not a ResNet, or a size that is not an int. ValueError: bad
        ``stages``, ``out_channels`` or ``extra_levels`` (named in the message). A refused call
        leaves ``encoder`` as it was.

    Example::

        >>> import mabn, torch
        >>> encoder = mabn.models.ResNet(mabn.models.BasicBlock, [1, 1, 1], [8, 16, 32], 1, 1, "imagenet")
        >>> pyramid = FeaturePyramid(encoder, 16, stages=(0, 1), extra_levels=1, norm_layer="mabn")
        >>> {k: tuple(v.shape) for k, v in pyramid.eval()(torch.randn(1, 1, 96, 80)).items()}
        {'p2': (1, 16, 24, 20), 'p3': (1, 16, 12, 10), 'p4': (1, 16, 6, 5)}
    """

    def __init__(
        self,
        encoder: ResNet,
        out_channels: int,
        stages: Sequence[int] | None = None,
        extra_levels: int = 0,
        norm_layer: NormSpec = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        conv_layer: ConvSpec = None,
    ) -> None:
        super().__init__()
        conv, norm = self._choices(encoder, norm_layer, norm_kwargs, conv_layer)
        check_int("out_channels", out_channels, 1)
        check_int("extra_levels", extra_levels, 0)
        chosen = list(range(encoder.num_stages)) if stages is None else list(stages)
        if not chosen or chosen != sorted(set(chosen)) or not all(0 <= i < encoder.num_stages for i in chosen):
            raise ValueError(
                f"stages must be increasing indices of the encoder's {encoder.num_stages} stages, got {stages!r}"
            )
        self._take(encoder)
        self.stages = chosen
        self.out_channels = out_channels
        width = out_channels
        self.lateral = nn.ModuleList(
            nn.Sequential(conv(encoder.stage_channels[i], width, 1, bias=False), norm(width)) for i in chosen
        )
        self.output = nn.ModuleList(
            nn.Sequential(conv(width, width, 3, padding=1, bias=False), norm(width)) for _ in chosen
        )
        extra = []
        for j in range(extra_levels):
            layers = [nn.ReLU()] if j > 0 else []
            extra.append(nn.Sequential(*layers, conv(width, width, 3, stride=2, padding=1, bias=False), norm(width)))
        self.extra = nn.ModuleList(extra)
        last = encoder.stage_strides[chosen[-1]]
        self.strides = [encoder.stage_strides[i] for i in chosen] + [last * 2 ** (j + 1) for j in range(extra_levels)]
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]
        for part in (self.lateral, self.output, self.extra):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.encoder.forward_stages(x)
        features = [features[i] for i in self.stages]
        y = self.lateral[-1](features[-1])
        levels = [self.output[-1](y)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            # Nearest upsampling to the lateral's exact size: ceil-halving strides make odd sizes.
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            levels.insert(0, self.output[i](y))
        for layer in self.extra:
            levels.append(layer(levels[-1]))
        return OrderedDict(zip(self.names, levels))
