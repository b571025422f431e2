"""Normalization layers: :class:`StreamNorm` holds the state, :func:`mabn.functional.stream_norm` does the math.

Every class here is :class:`StreamNorm` with a :class:`mabn.NormConfig` taken from :data:`mabn.PRESETS`
(``MABN*d``: ``"mabn"``, ``GhostBatchNorm*d``: ``"bn"``, ``BatchRenorm*d``: ``"brn"``) or given in full
(``GeneralBatchNorm*d``), and a check of the input's dimensionality.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._checks import check_num_features
from ._kernels import HALF, stat_dtype
from ._layers import check_track_running_stats, is_proxy, leaf_call, load_all_or_nothing, run_post_norm
from .config import PRESETS, NormConfig
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .functional import NormState, stream_norm

__all__ = [
    "StreamNorm",
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
    "FAMILIES",
]

#: Buffers that hold statistics (kept in float32 at least, whatever the parameters' dtype).
_STAT_BUFFERS = ("running_mean", "running_var", "forward_window", "backward_window", "accum_sum")
_COUNTERS = ("num_batches_tracked", "forward_steps", "backward_steps", "backward_calls", "accum_calls")


def _config_property(name: str, doc: str) -> property:
    def fget(self: StreamNorm) -> Any:
        return getattr(self.config, name)

    def fset(self: StreamNorm, value: Any) -> None:
        if name == "window" and value != self.config.window:
            raise AttributeError("window fixes the shape of the window buffers; build a new layer to change it")
        self.config = dataclasses.replace(self.config, **{name: value})
        if name == "accumulate":
            self._register_accumulation()

    return property(fget, fset, doc=doc)


class StreamNorm(nn.Module):
    r"""Base class of every normalization layer of this package: the state of one statistics stream.

    A layer is a :class:`mabn.NormConfig` (which member of the family, with which hyper-parameters)
    plus its buffers, and its forward is :func:`mabn.functional.stream_norm`. It exposes what
    BatchNorm tooling reads: ``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats = True``, ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked``; in evaluation mode it computes
    :math:`y = \gamma (x - \text{running\_mean}) / \sqrt{\text{running\_var} + \epsilon} + \beta`,
    with ``running_mean`` a constant zero (not saved in the state dict) in the uncentered form.
    Hence ``torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer)`` is exact for a plain
    convolution; after a weight-centralized one (:class:`mabn.CenConv2d`) it would fold the raw
    weight, so use :func:`mabn.fold` (or :func:`mabn.to_batchnorm` first) there.

    Statistics buffers (running statistics, windows) are kept in float32 at least: a layer built with
    ``dtype=torch.float16`` or converted by ``model.half()`` has half-precision parameters and float32
    statistics, which finite half-precision activations cannot overflow.

    Use the subclasses (:class:`MABN2d`, :class:`GhostBatchNorm2d`, :class:`BatchRenorm2d`,
    :class:`GeneralBatchNorm2d`, ...); this class takes input of any dimensionality (N, C, \*).

    Args:
        num_features: number of channels C.
        config: the member of the family and its hyper-parameters.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        process_group: a ``torch.distributed`` process group to sync the statistics over (see
            :func:`mabn.functional.stream_norm`), or ``None``. Default: ``None``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters (statistics: float32 for half precision).

    Example::

        >>> import torch, mabn
        >>> layer = mabn.StreamNorm(8, mabn.PRESETS["mabn"])
        >>> isinstance(mabn.MABN2d(8), mabn.StreamNorm), layer.track_running_stats
        (True, True)
        >>> layer(torch.randn(4, 8, 3)).shape
        torch.Size([4, 8, 3])
    """

    _version = 2
    config: NormConfig
    # Names of child modules applied after the normalization (a converted norm+activation layer's
    # dropout and activation, see mabn.adapters); empty for a layer built directly.
    post_norm: tuple[str, ...] = ()

    @property
    def track_running_stats(self) -> bool:
        """Always True: the layer keeps and uses running statistics (setting False raises ``ValueError``)."""
        return True

    @track_running_stats.setter
    def track_running_stats(self, value: bool) -> None:
        check_track_running_stats(self, value)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__
        if not cls.__name__.startswith("_") and "__init__" not in cls.__dict__ and init is not StreamNorm.__init__:
            # A copy of the inherited constructor named after this class, so that an unknown
            # keyword is reported as "MABN2d.__init__() got an unexpected keyword argument".
            qualname = f"{cls.__qualname__}.__init__"
            code = init.__code__
            if hasattr(code, "co_qualname"):
                code = code.replace(co_qualname=qualname)
            named = types.FunctionType(code, init.__globals__, "__init__", init.__defaults__, init.__closure__)
            named.__kwdefaults__ = init.__kwdefaults__
            named.__qualname__, named.__doc__, named.__module__ = qualname, init.__doc__, cls.__module__
            named.__annotations__ = init.__annotations__
            cls.__init__ = named

    def __init__(
        self,
        num_features: int,
        config: NormConfig,
        affine: bool = True,
        *,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_num_features(num_features)
        if not isinstance(affine, bool):
            raise TypeError(f"affine must be a bool, got {affine!r}")
        if not isinstance(config, NormConfig):
            raise TypeError(f"config must be a mabn.NormConfig, got {type(config).__name__}")
        super().__init__()
        self.num_features = num_features
        self.affine = affine
        self.config = config
        self.process_group = process_group
        self._sync_calls = 0
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        state = NormState.zeros(num_features, config, device=device, dtype=dtype)
        if config.centered:
            self._buffers["running_mean"] = state.running_mean  # see the running_mean property
        for name in NormState._fields[1:8]:  # accum_* are registered with the accumulation
            value = getattr(state, name)
            if value is not None:
                self.register_buffer(name, value)
        self._register_accumulation()
        self.reset_parameters()

    @property
    def running_mean(self) -> Tensor:
        """The running mean (centered form); in the uncentered form a fresh zero tensor, not a buffer.

        Tools written for BatchNorm read it (``fuse_conv_bn_eval``, exporters) and see the evaluation
        map; writing into the zeros of an uncentered layer has no effect.
        """
        if self.config.centered:
            return self._buffers["running_mean"]
        return torch.zeros_like(self.running_var)

    eps = _config_property("eps", "Added to the variance (second moment) for numerical stability.")
    momentum = _config_property(
        "momentum", "Weight of the new value in the running statistics (None: cumulative average)."
    )
    norm_batch_size = _config_property("norm_batch_size", "Samples per normalization group (None: the batch).")
    window = _config_property("window", "Number of groups in the moving averages.")
    r_max = _config_property("r_max", "Clipping bound of the renormalization factor r.")
    d_max = _config_property("d_max", "Clipping bound of the renormalization shift d (centered form).")
    warmup_iters = _config_property("warmup_iters", "Training steps on batch statistics before the SMAs.")
    renorm_warmup_iters = _config_property("renorm_warmup_iters", "Training steps with r = 1 and d = 0.")
    accumulate = _config_property("accumulate", "Training calls per optimizer step (gradient accumulation).")

    def _register_accumulation(self) -> None:
        """(Un)register the step's pending sums: buffers of the current step only, not saved."""
        if self.config.accumulate > 1:
            k = self.config.num_forward_stats + 1
            ref = self.running_var
            self.register_buffer("accum_sum", ref.new_zeros(k, self.num_features), persistent=False)
            self.register_buffer("accum_calls", torch.zeros((), dtype=torch.long, device=ref.device), persistent=False)
        else:
            self._buffers.pop("accum_sum", None)
            self._buffers.pop("accum_calls", None)

    def reset_running_stats(self) -> None:
        """Reset the running statistics, the windows and the counters to their initial values."""
        with torch.no_grad():
            self.running_mean.zero_()  # a fresh tensor in the uncentered form: no effect
            self.running_var.fill_(1.0)
            for name in (*_COUNTERS, *_STAT_BUFFERS[2:]):
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
            self.running_mean if self.config.centered else None,
            self.running_var,
            self.num_batches_tracked,
            *(getattr(self, name, None) for name in NormState._fields[3:]),
        )

    def _check_input_dim(self, input: Tensor) -> None:
        """Subclasses check the dimensionality of their input; this class takes any (N, C, *)."""

    def forward(self, input: Tensor) -> Tensor:
        if is_proxy(input):  # a torch.fx trace: this layer is one call_module node of the graph
            return leaf_call(self, input)
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} takes a Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        check = None
        if self.process_group is not None and self.training:
            check = True if self._sync_calls == 0 else None  # every call on CPU, the first one elsewhere
            self._sync_calls += 1
        output = stream_norm(
            input,
            self.weight,
            self.bias,
            self.state(),
            self.config,
            self.training,
            process_group=self.process_group,
            sync_check=check,
        )
        return run_post_norm(self, output) if self.post_norm else output

    def _apply(self, fn: Any, recurse: bool = True) -> StreamNorm:
        # model.half() and .to(torch.bfloat16) cast the parameters; the statistics stay in float32.
        before = {n: b for n, b in self._buffers.items() if n in _STAT_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype in HALF:
                self._buffers[name] = old.to(device=new.device, dtype=stat_dtype(new.dtype))
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> StreamNorm:
        # A process group is a handle to shared communication state: copies share it.
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.num_features}", f"eps={c.eps}", f"momentum={c.momentum}", f"affine={self.affine}"]
        parts.append(f"norm_batch_size={c.norm_batch_size}")
        if c.structure != PRESETS["bn"].structure:
            parts.append(f"centered={c.centered}, forward_stats={c.forward_stats!r}, renorm={c.renorm}")
            parts.append(f"backward_stats={c.backward_stats!r}")
        if "sma" in (c.forward_stats, c.backward_stats):
            parts.append(f"window={c.window}, warmup_iters={c.warmup_iters}")
        if c.renorm:
            parts.append(f"r_max={c.r_max}" + (f", d_max={c.d_max}" if c.centered else ""))
            parts.append(f"renorm_warmup_iters={c.renorm_warmup_iters}")
        if c.accumulate > 1:
            parts.append(f"accumulate={c.accumulate}")
        if self.process_group is not None:
            parts.append("synced")
        return ", ".join(parts)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        # Checkpoints of torch's BatchNorm before its version 2 carry no num_batches_tracked.
        if (version is None or version < 2) and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_var.device)
        if version is not None and version < 2:
            _migrate_v1(state_dict, prefix)
        # All of this layer's keys or none (see load_all_or_nothing): a refused load copies nothing.
        if not load_all_or_nothing(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs):
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _migrate_v1(state_dict: dict[str, Tensor], prefix: str) -> None:
    """Version 1 kept a half-precision layer's statistics in half precision, where one large batch
    could store inf; version 2 keeps them in float32. Non-finite statistics of a version-1 state
    dict are reset (the window emptied, the running variance set to 1), with a warning."""
    reset = []
    for name in ("running_var", "forward_window", "backward_window"):
        value = state_dict.get(prefix + name)
        if value is not None and not bool(torch.isfinite(value).all()):
            reset.append(name)
            if name == "running_var":
                state_dict[prefix + name] = torch.where(torch.isfinite(value), value, torch.ones_like(value))
            else:
                state_dict[prefix + name] = torch.zeros_like(value)
                steps = prefix + name.replace("window", "steps")
                if steps in state_dict:
                    state_dict[steps] = torch.zeros_like(state_dict[steps])
    if reset:
        warnings.warn(
            f"{prefix or 'layer '}: the version-1 state dict holds non-finite statistics ({', '.join(reset)}), "
            "which are reset",
            stacklevel=4,
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


_DIMS = {
    1: (_Dims1d, "a 2D or 3D input", "(N, C) or (N, C, L)", "4, 8, 5"),
    2: (_Dims2d, "a 4D input", "(N, C, H, W)", "4, 8, 5, 5"),
    3: (_Dims3d, "a 5D input", "(N, C, D, H, W)", "4, 8, 3, 5, 5"),
}

_G = NormConfig()  # the defaults of every field


class _GeneralBatchNorm(StreamNorm):
    preset: ClassVar[str | None] = None

    def __init__(
        self,
        num_features: int,
        eps: float = _G.eps,
        momentum: float | None = _G.momentum,
        affine: bool = True,
        *,
        centered: bool = _G.centered,
        forward_stats: str = _G.forward_stats,
        renorm: bool = _G.renorm,
        backward_stats: str = _G.backward_stats,
        norm_batch_size: int | None = _G.norm_batch_size,
        window: int = _G.window,
        r_max: float = _G.r_max,
        d_max: float = _G.d_max,
        warmup_iters: int = _G.warmup_iters,
        renorm_warmup_iters: int = _G.renorm_warmup_iters,
        accumulate: int = _G.accumulate,
        process_group: Any = None,
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
            accumulate=accumulate,
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)

    @classmethod
    def from_preset(cls, preset: str, num_features: int, **kwargs: Any) -> _GeneralBatchNorm:
        """Build the layer of a named preset (see ``mabn.PRESETS``); ``kwargs`` override its values."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(num_features, **{**dataclasses.asdict(PRESETS[preset]), **kwargs})


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
        eps: added to the variance (second moment). Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.02``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        centered: subtract the mean (True) or not (False). Default: ``False``.
        forward_stats: ``"batch"`` or ``"sma"``. Default: ``"sma"``.
        renorm: renormalize towards the running statistics. Default: ``True``.
        backward_stats: ``"batch"`` or ``"sma"``. Default: ``"sma"``.
        norm_batch_size: samples per normalization group; ``None`` is the whole batch.
        window: groups in the moving averages. Default: ``16``.
        r_max: clipping bound of r. Default: ``5.0``.
        d_max: clipping bound of d (centered form). Default: ``5.0``.
        warmup_iters: training steps on batch statistics before the SMAs. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters (statistics: float32 at least).

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}.from_preset("uncentered_ema", 8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""

_P = PRESETS["mabn"]


class _MABN(StreamNorm):
    preset: ClassVar[str] = "mabn"

    def __init__(
        self,
        num_features: int,
        eps: float = _P.eps,
        momentum: float | None = _P.momentum,
        affine: bool = True,
        *,
        norm_batch_size: int | None = _P.norm_batch_size,
        window: int = _P.window,
        r_max: float = _P.r_max,
        warmup_iters: int = _P.warmup_iters,
        renorm_warmup_iters: int = _P.renorm_warmup_iters,
        accumulate: int = _P.accumulate,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = dataclasses.replace(
            PRESETS[self.preset],
            eps=eps,
            momentum=momentum,
            norm_batch_size=norm_batch_size,
            window=window,
            r_max=r_max,
            warmup_iters=warmup_iters,
            renorm_warmup_iters=renorm_warmup_iters,
            accumulate=accumulate,
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


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

    The running second moment is updated once per step,
    :math:`R \leftarrow (1 - \text{{momentum}}) R + \text{{momentum}} \cdot \text{{mean}}_t S_t`, and in
    evaluation mode the layer is the per-channel affine :math:`y = \gamma x / \sqrt{{R + \epsilon}} + \beta`,
    which folds into the preceding convolution. While the 1-based count of training steps is below
    ``warmup_iters`` both passes use the group's own statistics (still pushed into the windows);
    while it is at most ``renorm_warmup_iters``, :math:`r = 1`. The backward window advances in the
    backward pass and counts backward passes itself, so a training forward that is never
    backpropagated (for example under ``torch.no_grad()``) leaves it alone.

    Robustness (each statement is a test): a training call whose statistics are not finite (inf or
    NaN input, or E[x^2] beyond the float32 range) outputs NaN and leaves every buffer untouched;
    the backward window skips non-finite gradients; statistics are kept in float32 for
    float16/bfloat16 parameters (``model.half()`` included), and training and evaluation take
    float16, bfloat16, float32 and float64 input alike. A second backward pass through the same
    graph (``retain_graph=True``) advances nothing and yields, summed with the first, the gradients
    and window of one backward pass of the summed losses. Under :func:`mabn.checkpoint` a recomputed
    forward reuses the original statistics; without it the stream advances twice. With a loss
    scaler whose scale changes, the backward window mixes scales until it has refilled.

    Args:
        num_features: number of channels C.
        eps: added to the second moment. Default: ``1e-5``.
        momentum: weight of the new value in the running second moment ``running_var`` (the paper's
            EMA weight 0.98 is 0.02 here); ``None`` for the cumulative average. Default: ``0.02``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        norm_batch_size: samples per normalization group B; ``None`` is the whole batch. 1 is legal.
        window: number m of groups in the moving averages. Default: ``16``.
        r_max: clipping bound lambda of r. Default: ``5.0``.
        warmup_iters: training steps on batch statistics before the SMAs. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation): the calls of a step
            are consecutive steps of the statistics stream, as one call on their concatenated batch
            would be. Default: ``1``.
        process_group: a ``torch.distributed`` process group: each normalization group's statistics
            are those of the union of the matching groups on every rank (forward and backward).
            Default: ``None`` (this process's statistics).
        device: device of the parameters and buffers.
        dtype: dtype of the parameters (statistics: float32 at least).

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""

_B = PRESETS["bn"]


class _GhostBatchNorm(StreamNorm):
    preset: ClassVar[str] = "bn"

    def __init__(
        self,
        num_features: int,
        eps: float = _B.eps,
        momentum: float | None = _B.momentum,
        affine: bool = True,
        *,
        norm_batch_size: int | None = _B.norm_batch_size,
        accumulate: int = _B.accumulate,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = dataclasses.replace(
            PRESETS[self.preset], eps=eps, momentum=momentum, norm_batch_size=norm_batch_size, accumulate=accumulate
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


_GHOST_DOC = r"""Ghost Batch Normalization over {dims}: BatchNorm with statistics of B-sample groups.

    Each group of ``norm_batch_size`` consecutive samples is normalized with its own mean and
    variance, :math:`y = \gamma (x - \mu_t) / \sqrt{{\sigma^2_t + \epsilon}} + \beta`, with BatchNorm's
    gradient inside each group. The running statistics are updated once per step with the mean over
    the groups (unbiased variance). With ``norm_batch_size=None`` (or B = N) this is exactly
    :class:`torch.nn.{torch_name}`, state dict included; with a ``process_group`` it is
    :class:`torch.nn.SyncBatchNorm`, on every backend (gloo on CPU as well as NCCL).

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average, as in torch's BatchNorm. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters (statistics: float32 at least).

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""

_R = PRESETS["brn"]


class _BatchRenorm(StreamNorm):
    preset: ClassVar[str] = "brn"

    def __init__(
        self,
        num_features: int,
        eps: float = _R.eps,
        momentum: float | None = _R.momentum,
        affine: bool = True,
        *,
        norm_batch_size: int | None = _R.norm_batch_size,
        r_max: float = _R.r_max,
        d_max: float = _R.d_max,
        renorm_warmup_iters: int = _R.renorm_warmup_iters,
        accumulate: int = _R.accumulate,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = dataclasses.replace(
            PRESETS[self.preset],
            eps=eps,
            momentum=momentum,
            norm_batch_size=norm_batch_size,
            r_max=r_max,
            d_max=d_max,
            renorm_warmup_iters=renorm_warmup_iters,
            accumulate=accumulate,
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


_BRN_DOC = r"""Batch Renormalization over {dims} (Ioffe, 2017), with optional ghost groups.

    .. math::
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\left(\frac{{\sigma_t}}{{\sigma}}\right), \quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\left(\frac{{\mu_t - \mu}}{{\sigma}}\right), \quad
        y = \gamma \left(r \frac{{x - \mu_t}}{{\sigma_t}} + d\right) + \beta

    where :math:`\mu_t, \sigma_t = \sqrt{{\sigma_t^2 + \epsilon}}` are the group's statistics and
    :math:`\mu, \sigma` the running ones before this step's update; no gradient flows through r and
    d. While the 1-based step count is at most ``renorm_warmup_iters``, r = 1 and d = 0 (BatchNorm).

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch.
        r_max: clipping bound of r. Default: ``3.0``.
        d_max: clipping bound of d. Default: ``5.0``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters (statistics: float32 at least).

    Shape:
        - Input: {shape}; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Examples::

        >>> import mabn, torch
        >>> m = mabn.{name}(8, norm_batch_size=2)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
"""


def _family(base: type[StreamNorm], name: str, doc: str, **fmt: str) -> tuple[type[StreamNorm], ...]:
    """The 1-D, 2-D and 3-D public classes of ``base``, each documented from ``doc``."""
    classes = []
    for d, (dims_mixin, dims, shape, example) in _DIMS.items():
        torch_name = f"BatchNorm{d}d"
        cls = type(f"{name}{d}d", (dims_mixin, base), {"__module__": __name__, "__qualname__": f"{name}{d}d"})
        cls.__doc__ = doc.format(
            dims=dims, shape=shape, name=cls.__name__, example=example, torch_name=torch_name, **fmt
        )
        classes.append(cls)
    return tuple(classes)


MABN1d, MABN2d, MABN3d = _family(_MABN, "MABN", _MABN_DOC)
GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d = _family(_GhostBatchNorm, "GhostBatchNorm", _GHOST_DOC)
BatchRenorm1d, BatchRenorm2d, BatchRenorm3d = _family(_BatchRenorm, "BatchRenorm", _BRN_DOC)
GeneralBatchNorm1d, GeneralBatchNorm2d, GeneralBatchNorm3d = _family(
    _GeneralBatchNorm, "GeneralBatchNorm", _GENERAL_DOC
)

#: Families of 1-D/2-D/3-D layer classes by name: this package's and torch's (for the factory,
#: the converter and :func:`mabn.factory.same_family`).
FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "mabn": (MABN1d, MABN2d, MABN3d),
    "ghost_bn": (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
    "brn": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    "general": (GeneralBatchNorm1d, GeneralBatchNorm2d, GeneralBatchNorm3d),
    "torch_bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "torch_in": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "frozen_bn": (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d),
}
