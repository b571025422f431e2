"""Normalization layers: thin modules that hold the state and call :func:`mabn.functional.stream_norm`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .functional import NormConfig, NormState, stream_norm

__all__ = [
    "PRESETS",
    "GeneralBatchNorm1d",
    "GeneralBatchNorm2d",
    "GeneralBatchNorm3d",
    "MABN1d",
    "MABN2d",
    "MABN3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
]

#: The named members of the family: the paper's methods and the rows of its ablation (Table 2).
#: Each entry fixes the form and the statistics; the hyper-parameters stay free.
PRESETS: dict[str, dict[str, Any]] = {
    # BatchNorm; "ghost" BN when norm_batch_size < N.
    "bn": dict(centered=True, forward_stats="batch", renorm=False, backward_stats="batch", momentum=0.1),
    # Batch Renormalization: batch statistics renormalized towards the EMA with clipped r and d.
    "brn": dict(centered=True, forward_stats="batch", renorm=True, backward_stats="batch", momentum=0.1, r_max=3.0),
    # Centered form, EMA-renormalized forward, SMA of g and Psi backward (the paper saw no convergence).
    "bn_ema_sma": dict(centered=True, forward_stats="batch", renorm=True, backward_stats="sma", momentum=0.1),
    # Uncentered ("modified") form with batch statistics.
    "uncentered": dict(centered=False, forward_stats="batch", renorm=False, backward_stats="batch", momentum=0.1),
    # Uncentered form, batch statistics renormalized towards the EMA ("EMAS in FP").
    "uncentered_ema": dict(centered=False, forward_stats="batch", renorm=True, backward_stats="batch", momentum=0.02),
    # MABN: uncentered, SMA renormalized towards the EMA forward, SMA of Psi backward.
    "mabn": dict(centered=False, forward_stats="sma", renorm=True, backward_stats="sma", momentum=0.02),
}


def _config_property(name: str, doc: str) -> property:
    def fget(self: _StreamNorm) -> Any:
        return getattr(self.config, name)

    def fset(self: _StreamNorm, value: Any) -> None:
        if name == "window" and value != self.config.window:
            raise AttributeError("window fixes the shape of the window buffers; build a new layer to change it")
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(fget, fset, doc=doc)


class _StreamNorm(nn.Module):
    """State and bookkeeping shared by every layer; the math lives in ``stream_norm``."""

    _version = 1
    config: NormConfig

    def __init__(
        self,
        num_features: int,
        config: NormConfig,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine must be a bool, got {affine!r}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.affine = affine
        self.config = config
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if config.centered:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        else:
            self.register_buffer("running_mean", None)
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        long = {"device": device, "dtype": torch.long}
        self.register_buffer("num_batches_tracked", torch.tensor(0, **long))
        m = config.window
        if config.forward_stats == "sma":
            self.register_buffer("forward_window", torch.zeros(m, config.num_forward_stats, num_features, **factory))
            self.register_buffer("forward_steps", torch.tensor(0, **long))
        if config.backward_stats == "sma":
            self.register_buffer("backward_window", torch.zeros(m, config.num_backward_stats, num_features, **factory))
            self.register_buffer("backward_steps", torch.tensor(0, **long))
            self.register_buffer("backward_calls", torch.tensor(0, **long))
        self.reset_parameters()

    eps = _config_property("eps", "Added to the variance (second moment) for numerical stability.")
    momentum = _config_property(
        "momentum", "Weight of the new value in the running statistics (None: cumulative average)."
    )
    norm_batch_size = _config_property("norm_batch_size", "Samples per normalization group (None: the batch).")
    window = _config_property("window", "Number of groups in the moving averages.")
    r_max = _config_property("r_max", "Clipping bound of the renormalization factor r.")
    d_max = _config_property("d_max", "Clipping bound of the renormalization shift d (centered form).")
    warmup_iters = _config_property("warmup_iters", "Training calls on batch statistics before the SMAs.")
    renorm_warmup_iters = _config_property("renorm_warmup_iters", "Training calls with r = 1 and d = 0.")

    def reset_running_stats(self) -> None:
        """Reset the running statistics, the windows and the counters to their initial values."""
        with torch.no_grad():
            if self.running_mean is not None:
                self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
            for name in ("forward_window", "forward_steps", "backward_window", "backward_steps", "backward_calls"):
                buffer = getattr(self, name, None)
                if buffer is not None:
                    buffer.zero_()

    def reset_parameters(self) -> None:
        """Reset the statistics and set ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def state(self) -> NormState:
        """The buffers as the engine takes them (live references, updated in place)."""
        return NormState(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            getattr(self, "forward_window", None),
            getattr(self, "forward_steps", None),
            getattr(self, "backward_window", None),
            getattr(self, "backward_steps", None),
            getattr(self, "backward_calls", None),
        )

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return stream_norm(input, self.weight, self.bias, self.state(), self.config, self.training)

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.num_features}", f"eps={c.eps}", f"momentum={c.momentum}", f"affine={self.affine}"]
        parts.append(f"norm_batch_size={c.norm_batch_size}")
        if not (c.centered and c.forward_stats == "batch" and c.backward_stats == "batch" and not c.renorm):
            parts.append(f"centered={c.centered}, forward_stats={c.forward_stats!r}, renorm={c.renorm}")
            parts.append(f"backward_stats={c.backward_stats!r}")
        if "sma" in (c.forward_stats, c.backward_stats):
            parts.append(f"window={c.window}, warmup_iters={c.warmup_iters}")
        if c.renorm:
            parts.append(f"r_max={c.r_max}" + (f", d_max={c.d_max}" if c.centered else ""))
            parts.append(f"renorm_warmup_iters={c.renorm_warmup_iters}")
        return ", ".join(parts)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        # Checkpoints of torch's BatchNorm before its version 2 carry no num_batches_tracked.
        if version is None and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_var.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _Dims1d:
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (N, C) or (N, C, L), got {input.dim()}D input")


class _Dims2d:
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {input.dim()}D input")


class _Dims3d:
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (N, C, D, H, W), got {input.dim()}D input")


class _GeneralBatchNorm(_StreamNorm):
    def __init__(
        self,
        num_features: int,
        centered: bool = False,
        forward_stats: str = "sma",
        renorm: bool = True,
        backward_stats: str = "sma",
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        norm_batch_size: int | None = None,
        window: int = 16,
        r_max: float = 5.0,
        d_max: float = 5.0,
        warmup_iters: int = 100,
        renorm_warmup_iters: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = NormConfig(
            centered=centered,
            forward_stats=forward_stats,
            renorm=renorm,
            backward_stats=backward_stats,
            eps=eps,
            momentum=momentum,
            norm_batch_size=norm_batch_size,
            window=window,
            r_max=r_max,
            d_max=d_max,
            warmup_iters=warmup_iters,
            renorm_warmup_iters=renorm_warmup_iters,
        )
        super().__init__(num_features, config, affine, device, dtype)

    @classmethod
    def from_preset(cls, preset: str, num_features: int, **kwargs: Any) -> _GeneralBatchNorm:
        """Build the layer of a named preset (see ``mabn.PRESETS``); ``kwargs`` override its values."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(num_features, **{**PRESETS[preset], **kwargs})


_GENERAL_DOC = r"""Batch normalization of any member of the family: {dims}.

    One class for every method of the paper and every row of its ablation: choose the form
    (``centered``), the forward statistics (``forward_stats``, with ``renorm``) and the backward
    statistics (``backward_stats``). ``from_preset(name, num_features)`` builds a named row of
    ``mabn.PRESETS``. For group t (B consecutive samples) of a training call:

    .. math::
        \hat x = \frac{{x - \mu_t}}{{\sqrt{{S_t + \epsilon}}}}, \qquad
        y = \gamma (r_t \hat x + d_t) + \beta

    with :math:`\mu_t = 0`, :math:`S_t = \chi^2_t = E[x^2]` in the uncentered form, the batch or
    windowed (SMA) statistics, and :math:`r_t, d_t` the clipped renormalization towards the running
    statistics (1 and 0 when off or warming up). The backward uses :math:`g = E[h]` and
    :math:`\Psi = E[h \hat x]` (:math:`h = \gamma r\, \partial L / \partial y`) of the group or their
    SMA: :math:`\partial L/\partial x = (h - g - \hat x \Psi) / \sqrt{{S_t + \epsilon}}`.

    Args:
        num_features: number of channels C.
        centered: subtract the mean (True) or not (False). Default: ``False``.
        forward_stats: ``"batch"`` or ``"sma"``. Default: ``"sma"``.
        renorm: renormalize towards the running statistics. Default: ``True``.
        backward_stats: ``"batch"`` or ``"sma"``. Default: ``"sma"``.
        eps: Default: ``1e-5``. momentum: Default: ``0.02`` (``None``: cumulative average).
        affine: Default: ``True``.
        norm_batch_size: samples per normalization group; ``None`` is the whole batch.
        window, r_max, d_max, warmup_iters, renorm_warmup_iters: as in :class:`mabn.NormConfig`.

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}.from_preset("uncentered_ema", 8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""


class GeneralBatchNorm1d(_Dims1d, _GeneralBatchNorm):
    __doc__ = _GENERAL_DOC.format(
        dims="2D or 3D input", shape="(N, C) or (N, C, L)", name="GeneralBatchNorm1d", example="4, 8, 5"
    )


class GeneralBatchNorm2d(_Dims2d, _GeneralBatchNorm):
    __doc__ = _GENERAL_DOC.format(
        dims="4D input", shape="(N, C, H, W)", name="GeneralBatchNorm2d", example="4, 8, 5, 5"
    )


class GeneralBatchNorm3d(_Dims3d, _GeneralBatchNorm):
    __doc__ = _GENERAL_DOC.format(
        dims="5D input", shape="(N, C, D, H, W)", name="GeneralBatchNorm3d", example="4, 8, 3, 5, 5"
    )


class _MABN(_StreamNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        norm_batch_size: int | None = None,
        window: int = 16,
        r_max: float = 5.0,
        warmup_iters: int = 100,
        renorm_warmup_iters: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = NormConfig(
            **{**PRESETS["mabn"], "momentum": momentum},
            eps=eps,
            norm_batch_size=norm_batch_size,
            window=window,
            r_max=r_max,
            warmup_iters=warmup_iters,
            renorm_warmup_iters=renorm_warmup_iters,
        )
        super().__init__(num_features, config, affine, device, dtype)


_MABN_DOC = r"""Moving Average Batch Normalization over {dims} (Yan et al., ICLR 2020).

    Uncentered normalization by the second moment, with the forward statistic replaced by its
    simple moving average (SMA) over the last ``window`` normalization groups, renormalized towards
    the running (EMA) second moment, and the backward statistic :math:`\Psi` replaced by its SMA.
    For group t (B consecutive samples) of a training call:

    .. math::
        \chi^2_t = E[x^2], \quad S_t = \mathrm{{SMA}}_m(\chi^2)_t, \quad
        r_t = \mathrm{{clip}}_{{[1/\lambda, \lambda]}}\left(\sqrt{{\frac{{S_t + \epsilon}}{{R + \epsilon}}}}\right),
        \quad y = \gamma\, r_t \frac{{x}}{{\sqrt{{S_t + \epsilon}}}} + \beta

    and in the backward pass, with :math:`h = \gamma r_t \partial L / \partial y` and
    :math:`z = x / \sqrt{{S_t + \epsilon}}`:

    .. math::
        \Psi_t = E[h z], \quad P_t = \mathrm{{SMA}}_m(\Psi)_t, \quad
        \frac{{\partial L}}{{\partial x}} = \frac{{h - z P_t}}{{\sqrt{{S_t + \epsilon}}}}

    The running second moment is updated once per call,
    :math:`R \leftarrow (1 - \text{{momentum}}) R + \text{{momentum}} \cdot \text{{mean}}_t S_t`, and in
    evaluation mode the layer is the per-channel affine :math:`y = \gamma x / \sqrt{{R + \epsilon}} + \beta`,
    which folds into the preceding convolution. While the 1-based count of training calls is below
    ``warmup_iters`` both passes use the group's own statistics (still pushed into the windows);
    while it is at most ``renorm_warmup_iters``, :math:`r = 1`. The backward window advances in the
    backward pass and counts backward calls itself, so a training forward that is never
    backpropagated (for example under ``torch.no_grad()``) leaves it alone. A training call whose
    statistics are not finite leaves every buffer untouched. Statistics of float16/bfloat16 input
    are computed in float32. Pair it with weight-centralized convolutions (:class:`mabn.CenConv2d`).

    Every training forward is a step of the stream: with gradient accumulation over k calls the
    warm-ups count k calls per optimizer step, and activation checkpointing (which runs the forward
    twice) advances the stream twice, unlike the statistics the backward saw. The backward window
    holds :math:`\Psi` of the gradients as they arrive, so with a loss scaler whose scale changes
    the window mixes scales until it has refilled.

    Args:
        num_features: number of channels C.
        eps: added to the second moment. Default: ``1e-5``.
        momentum: weight of the new value in the running second moment ``running_var`` (the paper's
            EMA weight 0.98 is 0.02 here); ``None`` for the cumulative average. Default: ``0.02``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        norm_batch_size: samples per normalization group B; ``None`` is the whole batch. 1 is legal.
        window: number m of groups in the moving averages. Default: ``16``.
        r_max: clipping bound lambda of r. Default: ``5.0``.
        warmup_iters: training calls on batch statistics before the SMAs. Default: ``100``.
        renorm_warmup_iters: training calls with r = 1. Default: ``1000``.
        device, dtype: factory arguments of the parameters and buffers.

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""


class MABN1d(_Dims1d, _MABN):
    __doc__ = _MABN_DOC.format(dims="a 2D or 3D input", shape="(N, C) or (N, C, L)", name="MABN1d", example="4, 8, 5")


class MABN2d(_Dims2d, _MABN):
    __doc__ = _MABN_DOC.format(dims="a 4D input", shape="(N, C, H, W)", name="MABN2d", example="4, 8, 5, 5")


class MABN3d(_Dims3d, _MABN):
    __doc__ = _MABN_DOC.format(dims="a 5D input", shape="(N, C, D, H, W)", name="MABN3d", example="4, 8, 3, 5, 5")


class _GhostBatchNorm(_StreamNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        norm_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = NormConfig(**{**PRESETS["bn"], "momentum": momentum}, eps=eps, norm_batch_size=norm_batch_size)
        super().__init__(num_features, config, affine, device, dtype)


_GHOST_DOC = r"""Ghost Batch Normalization over {dims}: BatchNorm with statistics of B-sample groups.

    Each group of ``norm_batch_size`` consecutive samples is normalized with its own mean and
    variance, :math:`y = \gamma (x - \mu_t) / \sqrt{{\sigma^2_t + \epsilon}} + \beta`, with BatchNorm's
    gradient inside each group. The running statistics are updated once per call with the mean over
    the groups (unbiased variance). With ``norm_batch_size=None`` (or B = N) this is exactly
    :class:`torch.nn.{torch_name}`, state dict included.

    Args:
        num_features: number of channels C.
        eps: Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average, as in torch's BatchNorm. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch.
        device, dtype: factory arguments.

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""


class GhostBatchNorm1d(_Dims1d, _GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(
        dims="a 2D or 3D input",
        shape="(N, C) or (N, C, L)",
        name="GhostBatchNorm1d",
        torch_name="BatchNorm1d",
        example="4, 8, 5",
    )


class GhostBatchNorm2d(_Dims2d, _GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(
        dims="a 4D input", shape="(N, C, H, W)", name="GhostBatchNorm2d", torch_name="BatchNorm2d", example="4, 8, 5, 5"
    )


class GhostBatchNorm3d(_Dims3d, _GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(
        dims="a 5D input",
        shape="(N, C, D, H, W)",
        name="GhostBatchNorm3d",
        torch_name="BatchNorm3d",
        example="4, 8, 3, 5, 5",
    )


class _BatchRenorm(_StreamNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        norm_batch_size: int | None = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        renorm_warmup_iters: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = NormConfig(
            **{**PRESETS["brn"], "momentum": momentum, "r_max": r_max},
            eps=eps,
            norm_batch_size=norm_batch_size,
            d_max=d_max,
            renorm_warmup_iters=renorm_warmup_iters,
        )
        super().__init__(num_features, config, affine, device, dtype)


_BRN_DOC = r"""Batch Renormalization over {dims} (Ioffe, 2017), with optional ghost groups.

    .. math::
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\left(\frac{{\sigma_t}}{{\sigma}}\right), \quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\left(\frac{{\mu_t - \mu}}{{\sigma}}\right), \quad
        y = \gamma \left(r \frac{{x - \mu_t}}{{\sigma_t}} + d\right) + \beta

    where :math:`\mu_t, \sigma_t = \sqrt{{\sigma_t^2 + \epsilon}}` are the group's statistics and
    :math:`\mu, \sigma` the running ones before this call's update; no gradient flows through r and
    d. While the 1-based call count is at most ``renorm_warmup_iters``, r = 1 and d = 0 (BatchNorm).

    Args:
        num_features: number of channels C.
        eps: Default: ``1e-5``. momentum: Default: ``0.1`` (``None``: cumulative average).
        affine: Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch.
        r_max: Default: ``3.0``. d_max: Default: ``5.0``.
        renorm_warmup_iters: Default: ``1000``.
        device, dtype: factory arguments.

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""


class BatchRenorm1d(_Dims1d, _BatchRenorm):
    __doc__ = _BRN_DOC.format(
        dims="a 2D or 3D input", shape="(N, C) or (N, C, L)", name="BatchRenorm1d", example="4, 8, 5"
    )


class BatchRenorm2d(_Dims2d, _BatchRenorm):
    __doc__ = _BRN_DOC.format(dims="a 4D input", shape="(N, C, H, W)", name="BatchRenorm2d", example="4, 8, 5, 5")


class BatchRenorm3d(_Dims3d, _BatchRenorm):
    __doc__ = _BRN_DOC.format(dims="a 5D input", shape="(N, C, D, H, W)", name="BatchRenorm3d", example="4, 8, 3, 5, 5")
