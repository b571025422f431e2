"""Fold evaluation-mode normalization into the preceding convolution, for deployment.

In evaluation mode every layer of the family is the per-channel affine map
``y = gamma * (x - mu) / sqrt(var + eps) + beta`` (``mu = 0`` and ``var = R`` for MABN), so a
convolution followed by it is one convolution with

    W' = W_c * s,  b' = (b - mu) * s + beta,  s = gamma / sqrt(var + eps)

per output channel, where ``W_c`` is the weight the convolution applies (centered for
weight-centralized layers). A transposed convolution's weight has shape ``(in, out / groups, *k)``:
its output channels are dim 1 within each group, and the scale goes there. :func:`fold` does this
for a whole model; :func:`to_batchnorm` instead rewrites the layers as plain torch
``BatchNorm``/``Conv`` so that torch's own fusion tools apply.
Like :mod:`torch.nn.utils.fusion`, both refuse training-mode models and work on a copy.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Literal, overload

import torch
from torch import fx, nn

from ._layers import post_norm_modules
from .adapters import check_layout, find_norm_adapter, looks_like_norm, num_channels
from .conv import is_centralized
from .convert import PLAIN, carry_flags, is_norm_layer, norm_dim, retype, revert_model
from .frozen import FROZEN_CLASSES
from .modules import StreamNorm

__all__ = ["fold", "to_batchnorm", "FoldReport", "check_eval"]

logger = logging.getLogger(__name__)

_CONV_DIM = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
    nn.Linear: 1,
}
# Normalization layers that cannot fold (statistics of each sample, or no running statistics).
_OTHER_NORMS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: ``(conv name, norm name)`` of every pair folded into one convolution.
        unfolded: ``(norm name, class name, reason)`` of every normalization layer left in the model
            (a ``Linear`` + 1-D norm pair whose shapes were not checked says to pass ``example_input``).
        traced: True when the pairs were found in a ``torch.fx`` trace of the whole model; False when
            it could not be traced (``trace_error`` says why) and its parts were searched instead:
            traces of the sub-modules that trace, ``nn.Sequential`` neighbours and the blocks of
            :mod:`mabn.models` elsewhere.
        trace_error: the tracing error, or None.
    """

    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unfolded: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)} norm layers into convolutions ({'fx trace' if self.traced else 'fallback'})"
        ]
        lines += [f"  kept {name} ({cls}): {reason}" for name, cls, reason in self.unfolded]
        return "\n".join(lines)


def check_eval(model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` naming the sub-modules of ``model`` that are in training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(
            f"{what} needs a model in evaluation mode; call model.eval() first (in training mode: {shown})"
        )


def _conv_dim(module: nn.Module) -> int | None:
    """Dimensionality of a convolution or linear layer :func:`fold` can fold into, else None."""
    cls = PLAIN.get(type(module), type(module))
    return _CONV_DIM.get(cls) if cls in _CONV_DIM else None


def _foldable_norm(module: nn.Module) -> bool:
    """An evaluation-mode affine map per channel that :func:`fold` knows exactly."""
    if isinstance(module, StreamNorm):
        return True
    adapter = find_norm_adapter(module)
    if adapter is None or adapter.kind == "keep":
        return False
    try:
        check_layout("", module, adapter)
    except ValueError:
        return False  # e.g. no running statistics: not an affine map
    return True


def _post_norm(module: nn.Module) -> dict[str, nn.Module]:
    """The modules a foldable norm applies after the normalization (name -> module, in order)."""
    if isinstance(module, (StreamNorm, *FROZEN_CLASSES)):
        return post_norm_modules(module)
    adapter = find_norm_adapter(module)
    names = adapter.post_norm if adapter is not None else ()
    return {n: module._modules[n] for n in names if module._modules.get(n) is not None}


def _compatible(conv: nn.Module, norm: nn.Module) -> bool:
    dim = _conv_dim(conv)
    if dim is None or not _foldable_norm(norm):
        return False
    channels = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if channels != num_channels(norm):
        return False
    if isinstance(conv, nn.Linear):
        return norm_dim(norm) == 1
    return norm_dim(norm) in (dim, None)  # SyncBatchNorm takes any dimensionality


class _Tracer(fx.Tracer):
    """Keeps this package's layers as single calls, so they show up as modules in the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, StreamNorm) or is_centralized(m) or is_norm_layer(m) or looks_like_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _unique_names(model: nn.Module) -> dict[int, str]:
    """id -> name of modules that appear exactly once in the tree (shared modules cannot fold)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        seen.setdefault(id(m), []).append(name)
    return {key: names[0] for key, names in seen.items() if len(names) == 1}


def _pairs_from_trace(module: nn.Module, unique: dict[int, str]) -> list[tuple[str, str]]:
    """The (conv, norm) pairs of a ``torch.fx`` trace of ``module`` (raises when it cannot be traced).

    ``unique`` names the modules of the whole model that appear once in it.
    """
    graph = _Tracer().trace(module)
    calls: dict[int, int] = {}
    attrs: set[int] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(module.get_submodule(node.target))
            calls[key] = calls.get(key, 0) + 1
        elif node.op == "get_attr":
            # A parameter or buffer read directly by the forward pins its module.
            parts = node.target.split(".")
            for i in range(1, len(parts)):
                try:
                    attrs.add(id(module.get_submodule(".".join(parts[:i]))))
                except AttributeError:
                    break
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv, norm = module.get_submodule(prev.target), module.get_submodule(node.target)
        ok = all(id(m) in unique and calls.get(id(m)) == 1 and id(m) not in attrs for m in (conv, norm))
        if ok and _compatible(conv, norm):
            pairs.append((unique[id(conv)], unique[id(norm)]))
    return pairs


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential``, or a subclass that does not change its forward (torchvision's Conv2dNormActivation)."""
    for cls in type(module).__mro__:
        if cls is nn.Sequential:
            return True
        if "forward" in cls.__dict__:
            return False
    return False


def _structural_pairs(module: nn.Module, prefix: str, unique: dict[int, str]) -> list[tuple[str, str]]:
    """Pairs of ``module`` itself whose data flow is known without a trace: sequential neighbours, ResNet blocks.

    This covers every pair of :mod:`mabn.models`: the ResNets' stems and blocks (``convK`` -> ``bnK``),
    their shortcuts, and the decoder of :class:`~mabn.models.SegmentationFPN`, whose lateral,
    upsampling and head layers are ``nn.Sequential`` (conv or transposed conv, norm[, ReLU]).
    """
    from .models import BasicBlock, Bottleneck, ResNet

    candidates: list[tuple[str, str]] = []
    if _plain_sequential(module):
        keys = list(module._modules)
        candidates = list(zip(keys, keys[1:]))
    elif type(module) in (BasicBlock, Bottleneck, ResNet):
        candidates = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(module, f"conv{i}")]
    pairs = []
    for a, b in candidates:
        conv, norm = module._modules.get(a), module._modules.get(b)
        if conv is None or norm is None or id(conv) not in unique or id(norm) not in unique:
            continue
        if _compatible(conv, norm):
            pairs.append((prefix + a, prefix + b))
    return pairs


def _find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """The pairs to fold and the error of tracing the whole model (None when it traced).

    A model that cannot be traced (data-dependent control flow, list inputs) is searched part by
    part: each sub-module that traces gives the pairs of its trace, the others their structural
    pairs and then their own children.
    """
    unique = _unique_names(model)
    try:
        return _pairs_from_trace(model, unique), None
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: look at the parts
        error = f"{type(exc).__name__}: {exc}"

    def search(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
        pairs = _structural_pairs(module, prefix, unique)
        for name, child in module.named_children():
            if child is None or not any(True for _ in child.children()):
                continue
            try:
                pairs += _pairs_from_trace(child, unique)
            except Exception:  # noqa: BLE001 - this part does not trace either: its parts then
                pairs += search(child, f"{prefix}{name}.")
        return pairs

    return list(dict.fromkeys(search(model, ""))), error


def _example_args(example_input: Any) -> tuple[Any, ...] | None:
    """``example_input`` as positional arguments of the model: a Tensor, or a tuple/list of them."""
    if example_input is None:
        return None
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(f"example_input must be a Tensor or a tuple of model inputs, got {type(example_input).__name__}")


@torch.no_grad()
def _input_dims(model: nn.Module, names: list[str], args: tuple[Any, ...]) -> dict[str, set[int]]:
    """name -> dimensionalities of the inputs each named module received in ``model(*args)``.

    Hooks on the modules rather than shape propagation through the fx graph: they see the same
    shapes, and they also work when the model cannot be traced (the structural fallback).
    """
    seen: dict[str, set[int]] = {name: set() for name in names}
    handles = []
    for name in names:

        def record(module, inputs, name=name):
            if inputs and isinstance(inputs[0], torch.Tensor):
                seen[name].add(inputs[0].dim())

        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


_LINEAR_UNCHECKED = (
    "Linear followed by a 1-D norm folds only when the norm's input is 2-D (N, C); "
    "pass example_input to fold so that the shapes can be checked"
)


def _check_linear_pairs(
    model: nn.Module, pairs: list[tuple[str, str]], args: tuple[Any, ...] | None
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Keep the ``Linear`` + 1-D norm pairs that provably fold; the others, norm name -> reason.

    A 1-D norm scales dim 1; a Linear layer's outputs are the last dim. Both are the channel dim only
    for 2-D (N, C) tensors: on (N, C, L) with ``out_features == C`` folding would scale the wrong axis.
    """
    linear = [(c, n) for c, n in pairs if isinstance(model.get_submodule(c), nn.Linear)]
    if not linear:
        return pairs, {}
    if args is None:
        dims: dict[str, set[int]] = {}
    else:
        dims = _input_dims(model, [n for _, n in linear], args)
    rejected: dict[str, str] = {}
    for _, norm_name in linear:
        seen = dims.get(norm_name)
        if seen is None:
            rejected[norm_name] = _LINEAR_UNCHECKED
        elif not seen:
            rejected[norm_name] = "Linear followed by a 1-D norm that example_input did not reach: shapes unknown"
        elif seen != {2}:
            got = "/".join(f"{d}-D" for d in sorted(seen))
            rejected[norm_name] = (
                f"Linear followed by a 1-D norm on {got} input: the norm scales dim 1, "
                "the Linear's outputs are the last dim; cannot fold"
            )
    return [(c, n) for c, n in pairs if n not in rejected], rejected


@torch.no_grad()
def _fused(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """One plain conv (transposed conv, linear) layer computing ``norm(conv(x))`` in evaluation mode."""
    weight = conv.centered_weight() if hasattr(conv, "centered_weight") else conv.weight
    dtype, device = weight.dtype, weight.device
    # Combine in float64 (at least), then round once to the layer's dtype.
    work = torch.promote_types(dtype, torch.float64)
    var = norm.running_var.to(work)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(work)
    shift = -scale * norm.running_mean.to(work) if norm.running_mean is not None else torch.zeros_like(scale)
    if conv.bias is not None:
        shift = shift + scale * conv.bias.to(work)
    if norm.bias is not None:
        shift = shift + norm.bias.to(work)
    ones = [1] * (weight.dim() - 2)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        # weight (in, out / groups, *k): output channel j * (out / groups) + c is column c of the
        # rows of group j, so view the rows as (groups, in / groups) and scale dim 2 per group.
        groups, shape = conv.groups, weight.shape
        grouped = weight.to(work).reshape(groups, shape[0] // groups, *shape[1:])
        new_weight = (grouped * scale.view(groups, 1, shape[1], *ones)).reshape(shape)
    else:
        new_weight = weight.to(work) * scale.view(-1, 1, *ones)
    new = retype(conv, PLAIN.get(type(conv), type(conv)))
    grad = conv.weight.requires_grad
    new._parameters["weight"] = nn.Parameter(new_weight.to(dtype=dtype, device=device), requires_grad=grad)
    new._parameters["bias"] = nn.Parameter(shift.to(dtype=dtype, device=device), requires_grad=grad)
    # The norm's work is inside this layer now: hooks registered on the conv would see another output.
    new._forward_hooks = type(conv._forward_hooks)()
    new._forward_pre_hooks = type(conv._forward_pre_hooks)()
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    model.get_submodule(parent)._modules[leaf] = module


def _reason(module: nn.Module) -> str:
    if isinstance(module, _OTHER_NORMS):
        return "statistics of each sample: not an affine map, cannot fold"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is None:
        return "no running statistics (track_running_stats=False): cannot fold"
    adapter = find_norm_adapter(module)
    if adapter is not None and adapter.kind == "keep":
        return "registered with kind='keep': left as it is"
    why = None if adapter is not None else looks_like_norm(module)
    if why is not None:
        return f"{why}, of an unknown class: left as it is (mabn.register_norm_adapter makes it foldable)"
    return "not preceded by a convolution whose output only it reads"


def _left_norm(module: nn.Module) -> bool:
    """A normalization layer (known or not) that :func:`fold` reports when it stays in the model."""
    if isinstance(module, _OTHER_NORMS) or is_norm_layer(module) or looks_like_norm(module) is not None:
        return True
    adapter = find_norm_adapter(module)
    return adapter is not None  # kind "keep"


@overload
def fold(model: nn.Module, *, example_input: Any = ..., return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold(
    model: nn.Module, *, example_input: Any = ..., return_report: Literal[True]
) -> tuple[nn.Module, FoldReport]: ...


def fold(
    model: nn.Module, *, example_input: Any = None, return_report: bool = False
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """A copy of ``model`` with every foldable norm layer folded into the convolution before it.

    Folds every ``nn.Conv1d/2d/3d`` (plain or weight-centralized, the centering baked in) and every
    ``nn.ConvTranspose1d/2d/3d`` directly followed by an evaluation-mode norm layer with running
    statistics (every layer of this package, torch's ``BatchNorm*d`` and ``SyncBatchNorm``, frozen
    BatchNorms, and the classes :mod:`mabn.adapters` knows, such as timm's ``BatchNormAct2d``) into
    one plain ``nn.Conv*d`` / ``nn.ConvTranspose*d`` with bias (see the module docstring for the
    formula). The norm becomes ``nn.Identity``, or, when it applied modules after the
    normalization (an activation, dropout), an ``nn.Sequential`` of those modules under their names.

    ``nn.Linear`` followed by a 1-D norm folds only when that is provably the same function: the
    norm scales dim 1 and the Linear's outputs are the last dim, which agree for 2-D (N, C) inputs
    only. So these pairs fold only when ``example_input`` is given and the norm receives 2-D inputs
    in ``model(example_input)``; otherwise they stay and are reported. Convolution pairs need no
    shapes.

    "Directly followed" is read from a ``torch.fx`` trace of the model: the conv's output must feed
    the norm and nothing else, and neither module may be shared or called twice. A model that
    cannot be traced (data-dependent control flow, a detection model's list inputs) is searched part
    by part: every sub-module that traces is read from its trace, and elsewhere ``nn.Sequential``
    neighbours and the blocks of :mod:`mabn.models` fold (which covers every model of
    :mod:`mabn.models`).

    Afterwards nothing of this package is left: every remaining weight-centralized layer becomes
    the plain layer with centered weights, and every remaining layer of this package that could not
    fold becomes the class it was converted from, or the equivalent ``nn.BatchNorm*d``
    (:func:`to_batchnorm`). Norm layers that cannot fold (GroupNorm, LayerNorm, InstanceNorm, a
    BatchNorm not after a conv, a BatchNorm-like layer of an unknown class) stay and are reported:
    returned in a :class:`FoldReport` with ``return_report=True``, else logged as a warning on the
    ``mabn.fold`` logger. The caller's model is not changed.

    Args:
        model: a model in evaluation mode (every sub-module).
        example_input: an input of the model (a Tensor, or a tuple of positional inputs), run once
            (without gradients) to check the shapes of ``Linear`` + 1-D norm pairs. Default: None
            (those pairs are not folded).
        return_report: also return the :class:`FoldReport`.

    Returns:
        The folded copy, or ``(copy, report)``.

    Raises:
        ValueError: ``model`` (or any sub-module) is in training mode.
        TypeError: ``example_input`` is neither a Tensor nor a tuple or list.

    Example::

        >>> import mabn, torch
        >>> model = mabn.models.resnet_small(norm_layer="mabn", conv_layer="centralized").eval()
        >>> folded, report = mabn.fold(model, return_report=True)
        >>> len(report.folded), report.unfolded
        (9, [])
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
        >>> head = torch.nn.Sequential(torch.nn.Linear(8, 4), mabn.MABN1d(4)).eval()
        >>> mabn.fold(head, return_report=True)[1].unfolded[0][2].startswith("Linear followed by a 1-D norm")
        True
        >>> len(mabn.fold(head, example_input=torch.randn(2, 8), return_report=True)[1].folded)
        1
    """
    check_eval(model, "fold")
    args = _example_args(example_input)
    model = copy.deepcopy(model)
    report = FoldReport()
    pairs, error = _find_pairs(model)
    if error is not None:
        report.traced, report.trace_error = False, error
    pairs, reasons = _check_linear_pairs(model, pairs, args)
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        _set(model, conv_name, carry_flags(conv, _fused(conv, norm)))
        # What the norm applied after the normalization (an activation, dropout) stays in its place.
        post = _post_norm(norm)
        _set(model, norm_name, carry_flags(norm, nn.Sequential(OrderedDict(post)) if post else nn.Identity()))
        report.folded.append((conv_name, norm_name))
    # What is left of this package becomes plain torch layers computing the same.
    model = revert_model(model, centered_weights=True)
    for name, m in model.named_modules():
        if _left_norm(m):
            report.unfolded.append((name, type(m).__name__, reasons.get(name) or _reason(m)))
    if report.unfolded and not return_report:
        kept = ", ".join(f"{name or '<model>'} ({cls})" for name, cls, _ in report.unfolded[:8])
        more = f" and {len(report.unfolded) - 8} more" if len(report.unfolded) > 8 else ""
        logger.warning("fold: %d norm layers could not fold and stay: %s%s", len(report.unfolded), kept, more)
    return (model, report) if return_report else model


def to_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with this package's layers rewritten as plain torch layers, same outputs.

    Every evaluation-mode layer of the family becomes the class it was converted from
    (:func:`mabn.revert_model`), or ``nn.BatchNorm1d/2d/3d`` when built directly, with the same affine
    parameters and ``eps``: centered presets keep their running statistics, uncentered ones (MABN)
    get ``running_mean = 0`` and ``running_var = R``. Every weight-centralized layer becomes the
    plain ``nn.Conv*d`` / ``nn.Linear`` with the centered weight. The result computes what the model
    did, and torch's deployment tools apply to it: ``torch.nn.utils.fusion.fuse_conv_bn_eval``,
    ``torch.ao.quantization.fuse_modules``, ONNX and TorchScript export (a layer converted from a
    norm+activation class comes back as that class, which ``fuse_conv_bn_eval`` would not keep the
    activation of: use :func:`fold` there). The caller's model is not changed.

    Args:
        model: a model in evaluation mode (every sub-module).

    Returns:
        The rewritten copy.

    Raises:
        ValueError: ``model`` (or any sub-module) is in training mode.

    Example::

        >>> import mabn, torch
        >>> model = torch.nn.Sequential(mabn.CenConv2d(3, 8, 3), mabn.MABN2d(8)).eval()
        >>> plain = mabn.to_batchnorm(model)
        >>> [type(m).__name__ for m in plain]
        ['Conv2d', 'BatchNorm2d']
        >>> fused = torch.nn.utils.fusion.fuse_conv_bn_eval(plain[0], plain[1])
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(fused(x), model(x), atol=1e-6)
        True
    """
    check_eval(model, "to_batchnorm")
    return revert_model(copy.deepcopy(model), centered_weights=True)
