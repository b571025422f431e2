"""Weight-centralized convolutions and linear layers (weight centralization, WC).

Each layer is a subclass of its torch counterpart with the same arguments and state dict; on every
call it uses ``W - mean(W)``, the mean taken per output channel over all other axes, so the
gradient reaching the raw weight passes through the centralization. The centralized weight is
computed once per change of the weight (an optimizer step) and kept beside it: forward passes
between two steps and their backward passes share it, so under gradient accumulation the cost is
one centralization per step, at the price of one copy of each centralized layer's weight.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _native

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


class _CentralizedConvolution(torch.autograd.Function):
    """conv(x, W - mean(W), b), given the centralized weight (the layer's cached one, :class:`_Centralized`).

    The centralization is a projection per output channel, symmetric, so the raw weight's gradient is
    the centralized weight's gradient with its own per-channel mean removed.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, centralized: Tensor, options: tuple
    ) -> Tensor:
        stride, padding, dilation, groups = options
        ctx.save_for_backward(input, centralized)
        ctx.options, ctx.has_bias = options, bias is not None
        return torch.ops.aten.convolution(input, centralized, bias, stride, padding, dilation, False, [0], groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        input, centralized = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        bias_sizes = [centralized.shape[0]] if ctx.has_bias else None
        grad_input, grad_centralized, grad_bias = torch.ops.aten.convolution_backward(
            grad, input, centralized, bias_sizes, stride, padding, dilation, False, [0], groups, mask
        )
        grad_weight = None if grad_centralized is None else _centralize_(grad_centralized)
        return grad_input, grad_weight, grad_bias, None, None


def _centralize_(t: Tensor) -> Tensor:
    """:func:`centralize_weight` in place (of a fresh gradient): on a CPU one native pass over it."""
    if _native.centralize(t, t):
        return t
    return t.sub_(t.mean(dim=list(range(1, t.dim())), keepdim=True))


def _centralized_copy(weight: Tensor) -> Tensor:
    """A detached :func:`centralize_weight` of ``weight``, computed as :meth:`centralized_weight` computes
    it (torch's operations), so that a traced, scripted or folded model matches the eager one bit for bit."""
    return centralize_weight(weight.detach())


class _Centralized:
    """A layer's centralized weight, computed once per change of its weight.

    Weights change at optimizer steps (in place, which bumps their version), so every forward pass
    between two steps (the micro-batches of gradient accumulation, evaluation) shares one
    centralization, and the backward pass uses the same tensor instead of centralizing again. The
    copy is detached, kept beside the weight, and neither saved in state dicts nor pickled.
    """

    __slots__ = ("source", "version", "address", "value")

    def __init__(self) -> None:
        self.source: Tensor | None = None
        self.version = self.address = -1
        self.value: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor:
        # The same tensor, unchanged in place and still on the same storage (``.data`` swaps it).
        fresh = self.source is weight and self.version == weight._version and self.address == weight.data_ptr()
        if not fresh or self.value is None:
            with torch.no_grad():
                self.value = _centralized_copy(weight)
            self.source, self.version, self.address = weight, weight._version, weight.data_ptr()
        return self.value


class _CachesCentralization:
    """Keeps a layer's centralized weight between changes of its weight (a mixin)."""

    def _cached_centralization(self) -> Tensor:
        cache = self.__dict__.get("_centralization")
        if cache is None:
            cache = self.__dict__["_centralization"] = _Centralized()
        return cache.get(self.weight)  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_centralization", None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_centralization":
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new


class _CentralizedLinear(torch.autograd.Function):
    """linear(x, W - mean(W), b) that saves ``x`` and ``W`` (not the centralized weight) for its backward."""

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


class _CenConvNd(_CachesCentralization):
    """The forward shared by the centralized convolutions (a mixin before ``nn.Conv*d``)."""

    def centralized_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)  # type: ignore[attr-defined]

    def forward(self, input: Tensor) -> Tensor:
        # Scripted or traced by torch.fx: the plain operations, which compute the same.
        if torch.jit.is_scripting() or not isinstance(input, Tensor):
            return self._conv_forward(input, self.centralized_weight(), self.bias)  # type: ignore[attr-defined]
        return self._centralized_forward(input)

    @torch.jit.unused
    def _centralized_forward(self, input: Tensor) -> Tensor:
        conv: Any = self
        if torch.compiler.is_compiling():  # traced as the plain operations, which the compiler fuses
            return conv._conv_forward(input, self.centralized_weight(), self.bias)
        padding = conv.padding
        if conv.padding_mode != "zeros":
            input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = [0] * len(conv.kernel_size)
        elif padding == "valid":
            padding = [0] * len(conv.kernel_size)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(total % 2 for total in totals):  # uneven padding: torch's own path pads explicitly
                return conv._conv_forward(input, self.centralized_weight(), self.bias)
            padding = [total // 2 for total in totals]
        options = (list(conv.stride), list(padding), list(conv.dilation), conv.groups)
        return _CentralizedConvolution.apply(input, conv.weight, conv.bias, self._cached_centralization(), options)


def is_centralized(module: nn.Module) -> bool:
    """True for the weight-centralized layers of this package (:class:`CenConv2d`, :class:`CenLinear`, ...)."""
    return isinstance(module, (_CenConvNd, CenLinear))


class CenConv1d(_CenConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with weight centralization: the kernel of each output channel has zero mean.

    .. math::
        y = x \\star (W - \\bar W) + b, \\qquad \\bar W_o = \\text{mean}_{i, k}\\, W_{o, i, k}

    Same arguments, parameters and state dict as :class:`torch.nn.Conv1d`; :class:`CenConv2d` says
    how the centralization is computed and what it is for.

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

    Weight centralization (WC) makes up for the centering that an uncentered normalization (MABN)
    leaves out. Same arguments, parameters and state dict as :class:`torch.nn.Conv2d` (groups,
    dilation, stride and every padding mode). The centralized weight is computed once per change of
    ``weight`` (an optimizer step) and shared by the forward and backward passes until then (one
    copy of the weight, not part of the state dict); gradients reach ``weight`` through the
    centralization. :func:`mabn.fold` bakes the centralization into a plain convolution for deployment.

    Example::

        >>> import mabn, torch
        >>> conv = mabn.CenConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
        >>> bool(conv.centralized_weight().mean(dim=(1, 2, 3)).abs().max() < 1e-6)
        True
    """


class CenConv3d(_CenConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with weight centralization: the kernel of each output channel has zero mean.

    .. math::
        y = x \\star (W - \\bar W) + b, \\qquad \\bar W_o = \\text{mean}_{i, d, h, w}\\, W_{o, i, d, h, w}

    Same arguments, parameters and state dict as :class:`torch.nn.Conv3d`; :class:`CenConv2d` says
    how the centralization is computed and what it is for.

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

    Same arguments, parameters and state dict as :class:`torch.nn.Linear`. The centralized weight is
    computed on every call and again in the backward pass (it is not stored).

    Example::

        >>> import mabn, torch
        >>> mabn.CenLinear(3, 8)(torch.randn(2, 3)).shape
        torch.Size([2, 8])
    """

    def centralized_weight(self) -> Tensor:
        """The weight the layer actually applies: :func:`centralize_weight` of ``weight``."""
        return centralize_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting() or not isinstance(input, Tensor):
            return F.linear(input, self.centralized_weight(), self.bias)
        return self._centralized_forward(input)

    @torch.jit.unused
    def _centralized_forward(self, input: Tensor) -> Tensor:
        return _CentralizedLinear.apply(input, self.weight, self.bias)


#: torch layer -> its weight-centralized twin.
CENTRALIZED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: CenConv1d,
    nn.Conv2d: CenConv2d,
    nn.Conv3d: CenConv3d,
    nn.Linear: CenLinear,
}
