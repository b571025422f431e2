"""Weight-centralized convolutions and linear layers (weight centralization, WC).

Each layer is a subclass of its torch counterpart with the same arguments and state dict; on every
call it uses ``W - mean(W)``, the mean taken per output channel over all other axes, so the
gradient reaching the raw weight passes through the centering. The centered weight is not kept for
the backward pass: the layers save the raw weight (a parameter, saved anyway) and center it again
there, so training holds no second, model-sized copy of the weights per forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "centralize_weight",
    "is_centralized",
    "CenConv1d",
    "CenConv2d",
    "CenConv3d",
    "CenLinear",
    "CENTRALIZED",
    "CONV_CHOICES",
    "check_conv",
]

#: The named convolution choices of the library: weight centralization (WC); ``None`` is plain layers.
CONV_CHOICES = ("centralized",)


def check_conv(conv: str | None) -> str | None:
    """``None`` (plain convolutions) or ``"centralized"``, returned as given; anything else is a ValueError."""
    if conv is None or conv == "centralized":
        return conv
    raise ValueError(f"conv must be one of {(None, *CONV_CHOICES)}, got {conv!r}")


def centralize_weight(weight: Tensor) -> Tensor:
    """Subtract from each output channel's weights their mean over every other axis."""
    if not isinstance(weight, Tensor):  # a torch.fx proxy, whose number of dims is not known
        flat = weight.flatten(1)
        return (flat - flat.mean(dim=1, keepdim=True)).view_as(weight)
    # Elementwise on the weight itself: the result keeps the weight's memory format.
    return weight - weight.mean(dim=list(range(1, weight.dim())), keepdim=True)


class _CenteredConvolution(torch.autograd.Function):
    """conv(x, W - mean(W), b) that saves ``x`` and ``W`` (not the centered weight) for its backward.

    The centering is a projection per output channel, symmetric, so the raw weight's gradient is
    the centered weight's gradient with its own per-channel mean removed.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, options: tuple) -> Tensor:
        stride, padding, dilation, groups = options
        ctx.save_for_backward(input, weight)
        ctx.options, ctx.has_bias = options, bias is not None
        centered = centralize_weight(weight)
        return torch.ops.aten.convolution(input, centered, bias, stride, padding, dilation, False, [0], groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad_input, grad_centered, grad_bias = torch.ops.aten.convolution_backward(
            grad, input, centralize_weight(weight), bias_sizes, stride, padding, dilation, False, [0], groups, mask
        )
        grad_weight = None if grad_centered is None else centralize_weight(grad_centered)
        return grad_input, grad_weight, grad_bias, None


class _CenteredLinear(torch.autograd.Function):
    """linear(x, W - mean(W), b) that saves ``x`` and ``W`` (not the centered weight) for its backward."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return F.linear(input, centralize_weight(weight), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad @ centralize_weight(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = centralize_weight(grad.reshape(-1, grad.shape[-1]).t() @ input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias


class _CenConvNd:
    """The forward shared by the centralized convolutions (a mixin before ``nn.Conv*d``)."""

    def centered_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)  # type: ignore[attr-defined]

    def forward(self, input: Tensor) -> Tensor:
        # Scripted or symbolically traced (torch.fx): the plain operations, which compute the same.
        if torch.jit.is_scripting() or not isinstance(input, Tensor):
            return self._conv_forward(input, self.centered_weight(), self.bias)  # type: ignore[attr-defined]
        return self._centered_forward(input)

    @torch.jit.unused
    def _centered_forward(self, input: Tensor) -> Tensor:
        conv: Any = self
        padding = conv.padding
        if conv.padding_mode != "zeros":
            input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = [0] * len(conv.kernel_size)
        elif padding == "valid":
            padding = [0] * len(conv.kernel_size)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(total % 2 for total in totals):  # uneven padding: torch's own path pads explicitly
                return conv._conv_forward(input, self.centered_weight(), self.bias)
            padding = [total // 2 for total in totals]
        options = (list(conv.stride), list(padding), list(conv.dilation), conv.groups)
        return _CenteredConvolution.apply(input, conv.weight, conv.bias, options)


def is_centralized(module: nn.Module) -> bool:
    """True for the weight-centralized layers of this package (:class:`CenConv2d`, :class:`CenLinear`, ...)."""
    return isinstance(module, (_CenConvNd, CenLinear))


class CenConv1d(_CenConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with weight centralization: the kernel of each output channel has zero mean.

    .. math::
        y = x \\star (W - \\bar W) + b, \\qquad \\bar W_o = \\text{mean}_{i, k}\\, W_{o, i, k}

    Same arguments, parameters and state dict as :class:`torch.nn.Conv1d` (groups, dilation, stride
    and every padding mode). The centered weight is computed on every call and again in the
    backward pass (it is not stored), so gradients reach ``weight`` through the centering.

    Example::

        >>> import mabn, torch
        >>> conv = mabn.CenConv1d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 10)).shape
        torch.Size([2, 8, 10])
    """


class CenConv2d(_CenConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with weight centralization: the kernel of each output channel has zero mean.

    .. math::
        y = x \\star (W - \\bar W) + b, \\qquad \\bar W_o = \\text{mean}_{i, h, w}\\, W_{o, i, h, w}

    The paper's WC, which makes up for the centering an uncentered normalization (MABN) leaves out.
    Same arguments, parameters and state dict as :class:`torch.nn.Conv2d` (groups, dilation, stride
    and every padding mode). The centered weight is computed on every call and again in the
    backward pass (it is not stored: no second, model-sized copy of the weights per forward), so
    gradients reach ``weight`` through the centering. :func:`mabn.fold` bakes the centering into a
    plain convolution for deployment.

    Example::

        >>> import mabn, torch
        >>> conv = mabn.CenConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
        >>> bool(conv.centered_weight().mean(dim=(1, 2, 3)).abs().max() < 1e-6)
        True
    """


class CenConv3d(_CenConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with weight centralization: the kernel of each output channel has zero mean.

    .. math::
        y = x \\star (W - \\bar W) + b, \\qquad \\bar W_o = \\text{mean}_{i, d, h, w}\\, W_{o, i, d, h, w}

    Same arguments, parameters and state dict as :class:`torch.nn.Conv3d` (groups, dilation, stride
    and every padding mode). The centered weight is computed on every call and again in the
    backward pass (it is not stored), so gradients reach ``weight`` through the centering.

    Example::

        >>> import mabn, torch
        >>> conv = mabn.CenConv3d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 4, 10, 10)).shape
        torch.Size([2, 8, 4, 10, 10])
    """


class CenLinear(nn.Linear):
    """:class:`torch.nn.Linear` with weight centralization: each output's weights have zero mean.

    .. math::
        y = x (W - \\bar W)^T + b, \\qquad \\bar W_o = \\text{mean}_i\\, W_{o, i}

    Same arguments, parameters and state dict as :class:`torch.nn.Linear`. The centered weight is
    computed on every call and again in the backward pass (it is not stored).

    Example::

        >>> import mabn, torch
        >>> mabn.CenLinear(3, 8)(torch.randn(2, 3)).shape
        torch.Size([2, 8])
    """

    def centered_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting() or not isinstance(input, Tensor):
            return F.linear(input, self.centered_weight(), self.bias)
        return self._centered_forward(input)

    @torch.jit.unused
    def _centered_forward(self, input: Tensor) -> Tensor:
        return _CenteredLinear.apply(input, self.weight, self.bias)


#: torch layer -> its weight-centralized twin.
CENTRALIZED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: CenConv1d,
    nn.Conv2d: CenConv2d,
    nn.Conv3d: CenConv3d,
    nn.Linear: CenLinear,
}
