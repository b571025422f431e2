r"""Frozen BatchNorm: the evaluation-mode map of a BatchNorm with fixed statistics and affine parameters.

The usual way to fine-tune a pretrained BatchNorm backbone at 1-2 images per device: the layer
computes :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta` with all four vectors
held as buffers, in training and evaluation alike, so neither the tiny batches nor the optimizer
change it. Other libraries' frozen-BN classes (torchvision's, timm's and detectron2's) are known to
the converters through :mod:`mabn.adapters`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_float, check_num_features
from ._layers import NormLayer, is_proxy, leaf_call, run_post_norm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FROZEN_CLASSES"]


class _FrozenBatchNorm(NormLayer, nn.Module):
    """The state and the map shared by :class:`FrozenBatchNorm1d`, ``2d`` and ``3d``."""

    # What BatchNorm tooling reads: an affine layer whose running statistics are always used.
    affine = True
    momentum = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_num_features(num_features)
        if check_float("eps", eps) <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` with ``y = scale * x + shift``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if is_proxy(input):
                return leaf_call(self, input)
            if not isinstance(input, Tensor):
                raise TypeError(f"{type(self).__name__} takes a Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (num_features), got input with C={input.shape[1]}")
        scale, shift = self.scale_and_shift()
        shape = [1, -1] + [1] * (input.dim() - 2)
        output = input * scale.to(input.dtype).reshape(shape) + shift.to(input.dtype).reshape(shape)
        if not torch.jit.is_scripting():
            if self.post_norm:
                output = run_post_norm(self, output)
        return output

    def __prepare_scriptable__(self) -> nn.Module:
        if self.post_norm:
            raise TypeError(
                f"{type(self).__name__} with post-norm modules {self.post_norm} cannot be scripted: "
                "script mabn.fold(model) (or mabn.revert_model) instead"
            )
        return self

    def _prepare_load(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
        # A BatchNorm's state dict loads as it is: its call counter means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    r"""Frozen BatchNorm over 2-D or 3-D input: :class:`FrozenBatchNorm2d` for sequences and feature vectors.

    The frozen form of :class:`torch.nn.BatchNorm1d`: fixed statistics and affine parameters, all
    buffers; arguments and map as :class:`FrozenBatchNorm2d`.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`.
        - Output: the shape of the input.

    Example::

        >>> import torch, mabn
        >>> layer = mabn.FrozenBatchNorm1d(4)
        >>> _ = layer.running_var.fill_(4.0)
        >>> x = torch.randn(2, 4, 5)
        >>> torch.allclose(layer(x), x / (4.0 + 1e-5) ** 0.5)
        True
    """

    _input_dims = (2, 3)
    _input_shape = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    r"""Frozen BatchNorm over 4-D input: fixed statistics and affine parameters.

    .. math::
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    per channel, with ``weight`` (:math:`\gamma`), ``bias`` (:math:`\beta`), ``running_mean``
    (:math:`\mu`) and ``running_var`` (:math:`\sigma^2`) all buffers, in training as in evaluation:
    nothing is learned and no statistic is updated. The frozen form of :class:`torch.nn.BatchNorm2d`
    (the same state as torchvision's ``FrozenBatchNorm2d``: a BatchNorm2d state dict loads into it,
    its ``num_batches_tracked`` dropped); ``mabn.convert_model(model, "frozen_bn")`` freezes a model's
    norm layers into it, and :func:`mabn.fold` folds it into the convolution before it.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        device: device of the buffers. Default: ``None`` (torch's default device).
        dtype: dtype of the buffers. Default: ``None`` (torch's default dtype).

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: the shape of the input.

    Example::

        >>> import torch, mabn
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> _ = bn.running_var.fill_(4.0)
        >>> layer = mabn.FrozenBatchNorm2d(4)
        >>> layer.load_state_dict(bn.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(layer(x), bn(x))
        True
    """

    _input_dims = (4,)
    _input_shape = "(N, C, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    r"""Frozen BatchNorm over 5-D input: :class:`FrozenBatchNorm2d` for volumes and video.

    The frozen form of :class:`torch.nn.BatchNorm3d`: fixed statistics and affine parameters, all
    buffers; arguments and map as :class:`FrozenBatchNorm2d`.

    Shape:
        - Input: :math:`(N, C, D, H, W)`.
        - Output: the shape of the input.

    Example::

        >>> import torch, mabn
        >>> layer = mabn.FrozenBatchNorm3d(4)
        >>> _ = layer.bias.fill_(1.0)
        >>> x = torch.randn(2, 4, 2, 3, 3)
        >>> torch.allclose(layer(x), x / (1 + 1e-5) ** 0.5 + 1.0)
        True
    """

    _input_dims = (5,)
    _input_shape = "(N, C, D, H, W)"


#: The frozen layers of this package, 1-D to 3-D.
FROZEN_CLASSES: tuple[type[nn.Module], type[nn.Module], type[nn.Module]] = (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
