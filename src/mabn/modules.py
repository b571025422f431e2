"""Normalization layers: :class:`StreamNorm` holds the state, :func:`mabn.functional.stream_norm` does the math.

Laid out as torch's ``batchnorm.py``: a base holding the state (:class:`StreamNorm`), one private
base per family holding the family's one constructor, which builds the :class:`mabn.NormConfig` of
its preset in :data:`mabn.PRESETS` with the values given (``MABN*d``: ``"mabn"``,
``GhostBatchNorm*d``: ``"bn"``, ``BatchRenorm*d``: ``"brn"``; ``GeneralBatchNorm*d`` takes every
field, MABN's by default), and public 1-D/2-D/3-D classes that hold their input's dimensionality
and their docstring.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ._checks import check_num_features
from ._layers import NormLayer, is_proxy, leaf_call, run_post_norm
from .config import FROM_PRESET, PRESETS, STRUCTURE_FIELDS, FromPreset, NormConfig, preset_config
from .functional import ACCUMULATION_FIELDS, STATISTICS_FIELDS, STREAM_FIELDS, NormState, accumulation_rows, stream_norm
from .kernels import HALF, stat_dtype

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
    "MABN_CLASSES",
    "GHOST_BATCH_NORM_CLASSES",
    "BATCH_RENORM_CLASSES",
    "GENERAL_BATCH_NORM_CLASSES",
]


def _config_property(name: str, doc: str) -> property:
    def fget(self: StreamNorm) -> Any:
        return getattr(self.config, name)

    def fset(self: StreamNorm, value: Any) -> None:
        self._change_config(**{name: value})

    return property(fget, fset, doc=doc)


#: The fields of NormState after ``running_mean``, in order.
_STATE_AFTER_MEAN = NormState._fields[1:]


class StreamNorm(NormLayer, nn.Module):
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
    #: The fields of :class:`mabn.NormConfig` a family's constructor takes as keywords, in order (this
    #: class takes a whole ``config``); the converters carry over the settings a target takes.
    config_keywords: ClassVar[tuple[str, ...]] = ()

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
        self.register_buffer("running_var", state.running_var)
        self.register_buffer("num_batches_tracked", state.num_batches_tracked)
        for name in STREAM_FIELDS:
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

    def _change_config(self, **changes: Any) -> None:
        """Set hyper-parameters (validated by :class:`mabn.NormConfig`); the window's size is fixed,
        and ``accumulate`` changes only between optimizer steps."""
        config = dataclasses.replace(self.config, **changes)
        if config.window != self.config.window:
            raise AttributeError("window fixes the shape of the window buffers; build a new layer to change it")
        before = self.config.accumulate
        if config.accumulate != before:
            pending = int(self.accum_calls) if before > 1 else 0
            if pending:
                raise ValueError(
                    f"{type(self).__name__}: cannot change accumulate from {before} to {config.accumulate} in the "
                    f"middle of an optimizer step ({pending} of its {before} calls made); change it between steps"
                )
        self.config = config
        if config.accumulate != before:
            self._register_accumulation()

    def _register_accumulation(self) -> None:
        """(Un)register the step's pending sums: buffers of the current step only, not saved.

        The one place that starts a step's accumulation state afresh: at construction, when
        ``accumulate`` changes (between steps) and after a state dict is loaded, so pending sums
        never outlive a load or a setting change.
        """
        if self.config.accumulate > 1:
            k = accumulation_rows(self.config)
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
            self.num_batches_tracked.zero_()
            for name in (*STREAM_FIELDS, *ACCUMULATION_FIELDS):
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
        buffers = self._buffers  # read directly: every training call builds this
        return NormState(buffers.get("running_mean"), *(buffers.get(name) for name in _STATE_AFTER_MEAN))

    def forward(self, input: Tensor) -> Tensor:
        if is_proxy(input):  # a torch.fx trace: this layer is one call_module node of the graph
            return leaf_call(self, input)
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} takes a Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        probe = verify = False
        if self.process_group is not None and self.training:
            # The ranks' calls are compared on the first call, and on every call on CPU, where the
            # fingerprint travels in the statistics' own collective.
            probe = self._sync_calls == 0
            verify = probe or input.device.type == "cpu"
            self._sync_calls += 1
        output = stream_norm(
            input,
            self.weight,
            self.bias,
            self.state(),
            self.config,
            self.training,
            process_group=self.process_group,
            probe_sync=probe,
            verify_sync=verify,
        )
        return run_post_norm(self, output) if self.post_norm else output

    def _apply(self, fn: Any, recurse: bool = True) -> StreamNorm:
        # model.half() and .to(torch.bfloat16) cast the parameters; the statistics stay in float32.
        before = {n: b for n, b in self._buffers.items() if n in STATISTICS_FIELDS and b is not None}
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
            parts += [f"{name}={getattr(c, name)!r}" for name in STRUCTURE_FIELDS]
        # The sizes and rates that act in this member of the family (accumulate: only when on).
        parts += [
            f"{n}={getattr(c, n)}"
            for n in c.settings()
            if n not in ("eps", "momentum", "norm_batch_size", "accumulate")
        ]
        if c.accumulate > 1:
            parts.append(f"accumulate={c.accumulate}")
        if self.process_group is not None:
            parts.append("synced")
        return ", ".join(parts)

    def _prepare_load(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        # Checkpoints of torch's BatchNorm before its version 2 carry no num_batches_tracked (one
        # that holds no entry of this layer has nothing to add it to).
        held = prefix + "running_var" in state_dict
        if (version is None or version < 2) and held and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_var.device)
        if version is not None and version < 2:
            _migrate_v1(state_dict, prefix)

    def _loaded(self) -> None:
        self._register_accumulation()  # a loaded layer continues as a fresh one loaded with it


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


# --------------------------------------------------------------------------------------------------
# The families, laid out as torch's BatchNorm1d/2d/3d: one base per family holds the constructor,
# whose keywords left out keep the values of the family's preset (PRESETS is the one place a default
# lives), and the public 1-D/2-D/3-D classes hold their input's dimensionality and their docstring.


class _MABNBase(StreamNorm):
    preset: ClassVar[str] = "mabn"
    config_keywords = PRESETS[preset].settings()

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None | FromPreset = FROM_PRESET,
        affine: bool = True,
        *,
        norm_batch_size: int | None = None,
        window: int | None = None,
        r_max: float | None = None,
        warmup_iters: int | None = None,
        renorm_warmup_iters: int | None = None,
        accumulate: int | None = None,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = preset_config(
            self.preset,
            momentum,
            eps=eps,
            norm_batch_size=norm_batch_size,
            window=window,
            r_max=r_max,
            warmup_iters=warmup_iters,
            renorm_warmup_iters=renorm_warmup_iters,
            accumulate=accumulate,
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


class MABN1d(_MABNBase):
    r"""Moving Average Batch Normalization over a 2D or 3D input (N, C) or (N, C, L).

    The layer of :class:`MABN2d` for sequences and feature vectors: for each normalization group
    t (B consecutive samples, all positions),

    .. math::
        y = \gamma\, r_t \frac{x}{\sqrt{S_t + \epsilon}} + \beta, \qquad
        S_t = \mathrm{SMA}_m(E[x^2])_t, \qquad
        r_t = \mathrm{clip}_{[1/\lambda, \lambda]}\sqrt{(S_t + \epsilon) / (R + \epsilon)}

    and the backward pass uses the moving average of :math:`\Psi = E[h z]` over the same window.
    :class:`MABN2d` explains every term, the warm-ups and what the layer guarantees.

    Args:
        num_features: number of channels C.
        eps: added to the second moment. Default: ``1e-5``.
        momentum: weight of the new value in the running second moment ``running_var``; ``None`` for
            the cumulative average. Default: ``0.02``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        norm_batch_size: samples per normalization group B; ``None`` is the whole batch. Default: ``None``.
        window: number m of groups in the moving averages. Default: ``16``.
        r_max: clipping bound lambda of r. Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: a ``torch.distributed`` process group to sync the statistics over, or ``None``.
            Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.MABN1d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5)).shape
        torch.Size([4, 8, 5])
    """

    _input_dims = (2, 3)
    _input_shape = "(N, C) or (N, C, L)"


class MABN2d(_MABNBase):
    r"""Moving Average Batch Normalization over a 4D input (N, C, H, W) (Yan et al., ICLR 2020).

    A drop-in replacement for :class:`torch.nn.BatchNorm2d` that keeps its accuracy at 1-2 samples
    per normalization group and, like BatchNorm, is a per-channel affine map at inference (so it
    folds into the preceding convolution). It normalizes by the second moment only (no centering),
    replaces that statistic by its simple moving average (SMA) over the last ``window`` normalization
    groups, renormalized towards the running (EMA) second moment, and replaces the backward
    statistic :math:`\Psi` by its SMA as well. For group t (B consecutive samples) of a training call:

    .. math::
        \chi^2_t = E[x^2], \quad S_t = \mathrm{SMA}_m(\chi^2)_t, \quad
        r_t = \mathrm{clip}_{[1/\lambda, \lambda]}\left(\sqrt{\frac{S_t + \epsilon}{R + \epsilon}}\right),
        \quad y = \gamma\, r_t \frac{x}{\sqrt{S_t + \epsilon}} + \beta

    and in the backward pass, with :math:`h = \gamma r_t \partial L / \partial y` and
    :math:`z = x / \sqrt{S_t + \epsilon}`:

    .. math::
        \Psi_t = E[h z], \quad P_t = \mathrm{SMA}_m(\Psi)_t, \quad
        \frac{\partial L}{\partial x} = \frac{h - z P_t}{\sqrt{S_t + \epsilon}}

    The running second moment ``running_var`` is updated once per step,
    :math:`R \leftarrow (1 - \text{momentum}) R + \text{momentum} \cdot \text{mean}_t S_t`, and in
    evaluation mode the layer is :math:`y = \gamma x / \sqrt{R + \epsilon} + \beta`. While the
    1-based count of training steps is below ``warmup_iters`` both passes use the group's own
    statistics (still pushed into the windows); while it is at most ``renorm_warmup_iters``,
    :math:`r = 1`. The backward window advances in the backward pass and counts backward passes
    itself, so a training forward that is never backpropagated leaves it alone.

    Guarantees (each a test; docs/design.md lists them): a training call whose statistics are not
    finite (inf or NaN input, or E[x^2] beyond the float32 range) outputs NaN and leaves every
    buffer untouched; the backward window skips non-finite gradients; statistics are kept in
    float32 for float16/bfloat16 parameters (``model.half()`` included). A second backward pass
    through the same graph (``retain_graph=True``) advances nothing and yields, summed with the
    first, the gradients and window of one backward pass of the summed losses. Under
    :func:`mabn.checkpoint` a recomputed forward reuses the original statistics. With
    ``accumulate=K`` the K calls of an optimizer step are one stream, as one call on their
    concatenated batch; ``accumulate`` changes only between steps, and a loaded state dict starts a
    fresh step.

    Args:
        num_features: number of channels C.
        eps: added to the second moment. Default: ``1e-5``.
        momentum: weight of the new value in the running second moment ``running_var`` (the EMA
            weight 0.98 is 0.02 here); ``None`` for the cumulative average. Default: ``0.02``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        norm_batch_size: samples per normalization group B; ``None`` is the whole batch; 1 is legal.
            Default: ``None``.
        window: number m of groups in the moving averages. Default: ``16``.
        r_max: clipping bound lambda of r. Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation): the calls of a step
            are consecutive steps of the statistics stream. Default: ``1``.
        process_group: a ``torch.distributed`` process group: each normalization group's statistics
            are those of the union of the matching groups on every rank (forward and backward).
            Default: ``None`` (this process's statistics).
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.MABN2d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    _input_dims = (4,)
    _input_shape = "(N, C, H, W)"


class MABN3d(_MABNBase):
    r"""Moving Average Batch Normalization over a 5D input (N, C, D, H, W).

    The layer of :class:`MABN2d` for volumes and video: for each normalization group t,

    .. math::
        y = \gamma\, r_t \frac{x}{\sqrt{S_t + \epsilon}} + \beta, \qquad
        S_t = \mathrm{SMA}_m(E[x^2])_t, \qquad
        r_t = \mathrm{clip}_{[1/\lambda, \lambda]}\sqrt{(S_t + \epsilon) / (R + \epsilon)}

    and the backward pass uses the moving average of :math:`\Psi = E[h z]` over the same window.
    :class:`MABN2d` explains every term, the warm-ups and what the layer guarantees.

    Args:
        num_features: number of channels C.
        eps: added to the second moment. Default: ``1e-5``.
        momentum: weight of the new value in the running second moment ``running_var``; ``None`` for
            the cumulative average. Default: ``0.02``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        norm_batch_size: samples per normalization group B; ``None`` is the whole batch. Default: ``None``.
        window: number m of groups in the moving averages. Default: ``16``.
        r_max: clipping bound lambda of r. Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: a ``torch.distributed`` process group to sync the statistics over, or ``None``.
            Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.MABN3d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 3, 5, 5)).shape
        torch.Size([4, 8, 3, 5, 5])
    """

    _input_dims = (5,)
    _input_shape = "(N, C, D, H, W)"


class _GhostBatchNormBase(StreamNorm):
    preset: ClassVar[str] = "bn"
    config_keywords = PRESETS[preset].settings()

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None | FromPreset = FROM_PRESET,
        affine: bool = True,
        *,
        norm_batch_size: int | None = None,
        accumulate: int | None = None,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = preset_config(self.preset, momentum, eps=eps, norm_batch_size=norm_batch_size, accumulate=accumulate)
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


class GhostBatchNorm1d(_GhostBatchNormBase):
    r"""Ghost Batch Normalization over a 2D or 3D input (N, C) or (N, C, L).

    BatchNorm with the statistics of B-sample groups: each group t of ``norm_batch_size``
    consecutive samples is normalized with its own mean and variance,

    .. math::
        y = \gamma \frac{x - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta,

    with BatchNorm's gradient inside each group. The running statistics move once per step towards
    the mean over the groups (unbiased variance). With ``norm_batch_size=None`` this is exactly
    :class:`torch.nn.BatchNorm1d`, state dict included; with a ``process_group`` it is
    :class:`torch.nn.SyncBatchNorm` on every backend.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average, as in torch's BatchNorm. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GhostBatchNorm1d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5)).shape
        torch.Size([4, 8, 5])
    """

    _input_dims = (2, 3)
    _input_shape = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNormBase):
    r"""Ghost Batch Normalization over a 4D input (N, C, H, W): BatchNorm with statistics of B-sample groups.

    Each group t of ``norm_batch_size`` consecutive samples is normalized with its own mean and
    variance, as if each group were on a device of its own,

    .. math::
        y = \gamma \frac{x - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta,

    with BatchNorm's gradient inside each group. The running statistics are updated once per step
    with the mean over the groups (unbiased variance). With ``norm_batch_size=None`` (or B = N)
    this is exactly :class:`torch.nn.BatchNorm2d`, state dict included; with a ``process_group`` it
    is :class:`torch.nn.SyncBatchNorm`, on every backend (gloo on CPU as well as NCCL). It is the
    baseline that shows what small normalization batches cost.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average, as in torch's BatchNorm. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GhostBatchNorm2d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    _input_dims = (4,)
    _input_shape = "(N, C, H, W)"


class GhostBatchNorm3d(_GhostBatchNormBase):
    r"""Ghost Batch Normalization over a 5D input (N, C, D, H, W).

    Each group t of ``norm_batch_size`` consecutive samples is normalized with its own statistics,

    .. math::
        y = \gamma \frac{x - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta,

    with BatchNorm's gradient inside each group; with ``norm_batch_size=None`` this is exactly
    :class:`torch.nn.BatchNorm3d`. :class:`GhostBatchNorm2d` says more.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GhostBatchNorm3d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 3, 5, 5)).shape
        torch.Size([4, 8, 3, 5, 5])
    """

    _input_dims = (5,)
    _input_shape = "(N, C, D, H, W)"


class _BatchRenormBase(StreamNorm):
    preset: ClassVar[str] = "brn"
    config_keywords = PRESETS[preset].settings()

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None | FromPreset = FROM_PRESET,
        affine: bool = True,
        *,
        norm_batch_size: int | None = None,
        r_max: float | None = None,
        d_max: float | None = None,
        renorm_warmup_iters: int | None = None,
        accumulate: int | None = None,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = preset_config(
            self.preset,
            momentum,
            eps=eps,
            norm_batch_size=norm_batch_size,
            r_max=r_max,
            d_max=d_max,
            renorm_warmup_iters=renorm_warmup_iters,
            accumulate=accumulate,
        )
        super().__init__(num_features, config, affine, process_group=process_group, device=device, dtype=dtype)


class BatchRenorm1d(_BatchRenormBase):
    r"""Batch Renormalization over a 2D or 3D input (N, C) or (N, C, L), with optional ghost groups.

    .. math::
        y = \gamma \left(r \frac{x - \mu_t}{\sigma_t} + d\right) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_t / \sigma), \quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_t - \mu) / \sigma)

    with the group's statistics :math:`\mu_t, \sigma_t` and the running ones :math:`\mu, \sigma`
    (before this step's update); :class:`BatchRenorm2d` says more.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        r_max: clipping bound of r. Default: ``3.0``.
        d_max: clipping bound of d. Default: ``5.0``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.BatchRenorm1d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5)).shape
        torch.Size([4, 8, 5])
    """

    _input_dims = (2, 3)
    _input_shape = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenormBase):
    r"""Batch Renormalization over a 4D input (N, C, H, W) (Ioffe, 2017), with optional ghost groups.

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_t}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_t - \mu}{\sigma}\right), \quad
        y = \gamma \left(r \frac{x - \mu_t}{\sigma_t} + d\right) + \beta

    where :math:`\mu_t, \sigma_t = \sqrt{\sigma_t^2 + \epsilon}` are the group's statistics and
    :math:`\mu, \sigma` the running ones before this step's update; no gradient flows through r and
    d. While the 1-based step count is at most ``renorm_warmup_iters``, r = 1 and d = 0 exactly
    (BatchNorm). The small-batch baseline between BatchNorm and MABN.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        r_max: clipping bound of r. Default: ``3.0``.
        d_max: clipping bound of d. Default: ``5.0``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.BatchRenorm2d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    _input_dims = (4,)
    _input_shape = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenormBase):
    r"""Batch Renormalization over a 5D input (N, C, D, H, W), with optional ghost groups.

    .. math::
        y = \gamma \left(r \frac{x - \mu_t}{\sigma_t} + d\right) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_t / \sigma), \quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_t - \mu) / \sigma)

    with the group's statistics :math:`\mu_t, \sigma_t` and the running ones :math:`\mu, \sigma`
    (before this step's update); :class:`BatchRenorm2d` says more.

    Args:
        num_features: number of channels C.
        eps: added to the variance. Default: ``1e-5``.
        momentum: weight of the new value in the running statistics; ``None`` for the cumulative
            average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        norm_batch_size: samples per group B; ``None`` is the whole batch. Default: ``None``.
        r_max: clipping bound of r. Default: ``3.0``.
        d_max: clipping bound of d. Default: ``5.0``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.BatchRenorm3d(8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 3, 5, 5)).shape
        torch.Size([4, 8, 3, 5, 5])
    """

    _input_dims = (5,)
    _input_shape = "(N, C, D, H, W)"


_General = TypeVar("_General", bound="_GeneralBatchNormBase")


class _GeneralBatchNormBase(StreamNorm):
    # Any member of the family: every field of NormConfig is a keyword, MABN's values by default.
    preset: ClassVar[str] = "mabn"
    config_keywords = tuple(f.name for f in dataclasses.fields(NormConfig))

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None | FromPreset = FROM_PRESET,
        affine: bool = True,
        *,
        centered: bool | None = None,
        forward_stats: str | None = None,
        renorm: bool | None = None,
        backward_stats: str | None = None,
        norm_batch_size: int | None = None,
        window: int | None = None,
        r_max: float | None = None,
        d_max: float | None = None,
        warmup_iters: int | None = None,
        renorm_warmup_iters: int | None = None,
        accumulate: int | None = None,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = preset_config(
            self.preset,
            momentum,
            centered=centered,
            forward_stats=forward_stats,
            renorm=renorm,
            backward_stats=backward_stats,
            eps=eps,
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
    def from_preset(cls: type[_General], preset: str, num_features: int, **kwargs: Any) -> _General:
        """Build the layer of a named preset (see ``mabn.PRESETS``); ``kwargs`` override its values.

        Example::

            >>> import mabn
            >>> mabn.GeneralBatchNorm2d.from_preset("uncentered_ema", 8).config == mabn.PRESETS["uncentered_ema"]
            True
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(num_features, **{**dataclasses.asdict(PRESETS[preset]), **kwargs})


class GeneralBatchNorm1d(_GeneralBatchNormBase):
    r"""Any member of the family over a 2D or 3D input (N, C) or (N, C, L).

    .. math::
        \hat x = \frac{x - \mu_t}{\sqrt{S_t + \epsilon}}, \qquad y = \gamma (r_t \hat x + d_t) + \beta

    with :math:`\mu_t = 0` and :math:`S_t = E[x^2]` in the uncentered form, batch or moving-average
    statistics, and the clipped renormalization :math:`r_t, d_t` (1 and 0 when off);
    :class:`GeneralBatchNorm2d` says more.

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
        norm_batch_size: samples per normalization group; ``None`` is the whole batch. Default: ``None``.
        window: groups in the moving averages. Default: ``16``.
        r_max: clipping bound of r. Default: ``5.0``.
        d_max: clipping bound of d (centered form). Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GeneralBatchNorm1d(8, centered=True, forward_stats="batch", norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5)).shape
        torch.Size([4, 8, 5])
    """

    _input_dims = (2, 3)
    _input_shape = "(N, C) or (N, C, L)"


class GeneralBatchNorm2d(_GeneralBatchNormBase):
    r"""Any member of the family over a 4D input (N, C, H, W): every method of the paper and every ablation row.

    Choose the form (``centered``), the forward statistics (``forward_stats``, with ``renorm``) and
    the backward statistics (``backward_stats``); ``from_preset(name, num_features)`` builds a named
    row of ``mabn.PRESETS``. For group t (B consecutive samples) of a training call:

    .. math::
        \hat x = \frac{x - \mu_t}{\sqrt{S_t + \epsilon}}, \qquad
        y = \gamma (r_t \hat x + d_t) + \beta

    with :math:`\mu_t = 0`, :math:`S_t = \chi^2_t = E[x^2]` in the uncentered form, the batch or
    windowed (SMA) statistics, and :math:`r_t, d_t` the clipped renormalization towards the running
    statistics (1 and 0 when off or warming up). The backward uses :math:`g = E[h]` and
    :math:`\Psi = E[h \hat x]` (:math:`h = \gamma r\, \partial L / \partial y`) of the group or their
    SMA: :math:`\partial L/\partial x = (h - g - \hat x \Psi) / \sqrt{S_t + \epsilon}` (no g in the
    uncentered form).

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
        norm_batch_size: samples per normalization group; ``None`` is the whole batch. Default: ``None``.
        window: groups in the moving averages. Default: ``16``.
        r_max: clipping bound of r. Default: ``5.0``.
        d_max: clipping bound of d (centered form). Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GeneralBatchNorm2d.from_preset("uncentered_ema", 8, norm_batch_size=2)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    _input_dims = (4,)
    _input_shape = "(N, C, H, W)"


class GeneralBatchNorm3d(_GeneralBatchNormBase):
    r"""Any member of the family over a 5D input (N, C, D, H, W).

    .. math::
        \hat x = \frac{x - \mu_t}{\sqrt{S_t + \epsilon}}, \qquad y = \gamma (r_t \hat x + d_t) + \beta

    with :math:`\mu_t = 0` and :math:`S_t = E[x^2]` in the uncentered form, batch or moving-average
    statistics, and the clipped renormalization :math:`r_t, d_t` (1 and 0 when off);
    :class:`GeneralBatchNorm2d` says more.

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
        norm_batch_size: samples per normalization group; ``None`` is the whole batch. Default: ``None``.
        window: groups in the moving averages. Default: ``16``.
        r_max: clipping bound of r. Default: ``5.0``.
        d_max: clipping bound of d (centered form). Default: ``5.0``.
        warmup_iters: training steps on the groups' own statistics before the moving averages. Default: ``100``.
        renorm_warmup_iters: training steps with r = 1 and d = 0. Default: ``1000``.
        accumulate: training calls per optimizer step (gradient accumulation). Default: ``1``.
        process_group: process group to sync the statistics over, or ``None``. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters (statistics: float32 at least). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`; N divisible by ``norm_batch_size`` in training mode.
        - Output: same shape as input.

    Example::

        >>> import mabn, torch
        >>> m = mabn.GeneralBatchNorm3d(8, norm_batch_size=2, window=4)
        >>> m(torch.randn(4, 8, 3, 5, 5)).shape
        torch.Size([4, 8, 3, 5, 5])
    """

    _input_dims = (5,)
    _input_shape = "(N, C, D, H, W)"


#: The 1-D, 2-D and 3-D classes of each family (:data:`mabn.factory.NORMS` names them).
MABN_CLASSES: tuple[type[StreamNorm], type[StreamNorm], type[StreamNorm]] = (MABN1d, MABN2d, MABN3d)
GHOST_BATCH_NORM_CLASSES: tuple[type[StreamNorm], type[StreamNorm], type[StreamNorm]] = (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
BATCH_RENORM_CLASSES: tuple[type[StreamNorm], type[StreamNorm], type[StreamNorm]] = (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
)
GENERAL_BATCH_NORM_CLASSES: tuple[type[StreamNorm], type[StreamNorm], type[StreamNorm]] = (
    GeneralBatchNorm1d,
    GeneralBatchNorm2d,
    GeneralBatchNorm3d,
)
