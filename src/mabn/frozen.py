r"""Frozen BatchNorm: the evaluation-mode map of a BatchNorm with fixed statistics and affine parameters.

The usual way to fine-tune a pretrained BatchNorm backbone at 1-2 images per device: the layer
computes :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta` with all four vectors
held as buffers, in training and evaluation alike, so neither the tiny batches nor the optimizer
change it. Other libraries' frozen-BN classes (detectron2's and torchvision's ``FrozenBatchNorm2d``)
are recognized by :func:`is_frozen_batch_norm` from their buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_num_features

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "is_frozen_batch_norm"]

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """True for a frozen BatchNorm of any library: buffers ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` of one length, and no parameters of its own (nothing it could learn).

    Example::

        >>> import mabn, torch
        >>> mabn.is_frozen_batch_norm(mabn.FrozenBatchNorm2d(4)), mabn.is_frozen_batch_norm(torch.nn.BatchNorm2d(4))
        (True, False)
    """
    if isinstance(module, _FrozenBatchNorm):
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase) or any(True for _ in module.parameters(recurse=False)):
        return False
    buffers = [module._buffers.get(name) for name in _FROZEN_BUFFERS]
    if not all(isinstance(b, Tensor) and b.dim() == 1 for b in buffers):
        return False
    return len({b.numel() for b in buffers}) == 1


def num_channels(module: nn.Module) -> int:
    """The channel count of a norm layer: ``num_features``, or the length of a frozen BN's statistics."""
    n = getattr(module, "num_features", None)
    return int(n) if n is not None else module.running_var.numel()


class _FrozenBatchNorm(nn.Module):
    _dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_num_features(num_features)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    # What BatchNorm tooling reads: an affine layer whose running statistics are always used.
    affine = True
    track_running_stats = True
    momentum = None

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(input).__name__}")
        if input.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expects {self._expected} input, got {input.dim()}-D")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input with {input.shape[1]} channels")

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` with ``y = scale * x + shift``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        scale, shift = self.scale_and_shift()
        shape = (1, -1) + (1,) * (input.dim() - 2)
        return input * scale.to(input.dtype).view(shape) + shift.to(input.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


_DOC = r"""Frozen BatchNorm over {dims} input: fixed statistics and affine parameters, in training as in evaluation.

.. math::
    y = \gamma \frac{{x - \mu}}{{\sqrt{{\sigma^2 + \epsilon}}}} + \beta

with ``weight`` (:math:`\gamma`), ``bias`` (:math:`\beta`), ``running_mean`` (:math:`\mu`) and
``running_var`` (:math:`\sigma^2`) all buffers: nothing is learned and no statistic is updated.
:func:`mabn.convert_model` (``norm="frozen_bn"``) freezes a trained BatchNorm or any layer of this
package into it (exactly its evaluation-mode map) and turns it back into a trainable layer;
:func:`mabn.fold` folds it into the preceding convolution.

Args:
    num_features: number of channels C.
    eps: added to the variance. Default: ``1e-5``.
    device: device of the buffers.
    dtype: dtype of the buffers.

Shape:
    - Input: {shape}
    - Output: the same shape as the input.

Example::

    >>> import torch, mabn
    >>> layer = mabn.{name}(4)
    >>> layer.running_var.fill_(4.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> x = torch.randn({example})
    >>> torch.allclose(layer(x), x / (4.0 + 1e-5) ** 0.5)
    True
"""


def _frozen(d: int, dims: tuple[int, ...], expected: str, shape: str, example: str) -> type[_FrozenBatchNorm]:
    name = f"FrozenBatchNorm{d}d"
    cls = type(name, (_FrozenBatchNorm,), {"__module__": __name__, "__qualname__": name})
    cls._dims, cls._expected = dims, expected
    cls.__doc__ = _DOC.format(dims=expected, shape=shape, name=name, example=example)
    return cls


FrozenBatchNorm1d = _frozen(1, (2, 3), "2-D or 3-D", ":math:`(N, C)` or :math:`(N, C, L)`", "2, 4, 5")
FrozenBatchNorm2d = _frozen(2, (4,), "4-D", ":math:`(N, C, H, W)`", "2, 4, 3, 3")
FrozenBatchNorm3d = _frozen(3, (5,), "5-D", ":math:`(N, C, D, H, W)`", "2, 4, 2, 3, 3")
