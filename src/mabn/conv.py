"""Weight-centralized convolutions and linear layers (the paper's WC).

Each layer is a subclass of its torch counterpart with the same arguments and state dict; on every
call it uses ``W - mean(W)``, the mean taken per output channel over all other axes, so the
gradient reaching the raw weight passes through the centering.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "centralize_weight",
    "CenConv1d",
    "CenConv2d",
    "CenConv3d",
    "CenLinear",
    "CENTRALIZED",
    "CONV_CHOICES",
    "check_conv",
]

#: The convolution choices of every API and command: plain layers or weight centralization (the paper's WC).
CONV_CHOICES = ("none", "centralized")


def check_conv(conv: str | None) -> str | None:
    """``None``/``"none"`` -> None (plain convolutions), ``"centralized"`` -> ``"centralized"``; else a ValueError."""
    if conv is None or conv == "none":
        return None
    if conv == "centralized":
        return conv
    raise ValueError(f"conv must be one of {CONV_CHOICES} (or None), got {conv!r}")


def centralize_weight(weight: Tensor) -> Tensor:
    """Subtract from each output channel's weights their mean over every other axis."""
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class _CenConv:
    def centered_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.centered_weight(), self.bias)


_DOC = """{torch} with weight centralization: the kernel of each output channel has zero mean.

    Same arguments, parameters and state dict as :class:`torch.nn.{torch}` (groups, dilation,
    stride and every padding mode). The forward applies ``W - W.mean(dim=(1, ...), keepdim=True)``
    computed on every call, so gradients reach ``weight`` through the centering.

    Examples::

        >>> import mabn, torch
        >>> conv = mabn.{name}(3, 8, 3, padding=1)
        >>> conv(torch.randn({example})).shape[1]
        8
"""


class CenConv1d(_CenConv, nn.Conv1d):
    __doc__ = _DOC.format(torch="Conv1d", name="CenConv1d", example="2, 3, 10")


class CenConv2d(_CenConv, nn.Conv2d):
    __doc__ = _DOC.format(torch="Conv2d", name="CenConv2d", example="2, 3, 10, 10")


class CenConv3d(_CenConv, nn.Conv3d):
    __doc__ = _DOC.format(torch="Conv3d", name="CenConv3d", example="2, 3, 4, 10, 10")


class CenLinear(nn.Linear):
    __doc__ = _DOC.format(torch="Linear", name="CenLinear", example="2, 3").replace(
        "CenLinear(3, 8, 3, padding=1)", "CenLinear(3, 8)"
    )

    def centered_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.centered_weight(), self.bias)


#: torch layer -> its weight-centralized twin.
CENTRALIZED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: CenConv1d,
    nn.Conv2d: CenConv2d,
    nn.Conv3d: CenConv3d,
    nn.Linear: CenLinear,
}
