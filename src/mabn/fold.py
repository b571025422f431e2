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

A subclass of a torch convolution keeps its class: the scaled weight and the new bias go into a
copy of it. One that inherits torch's forward computes the formula by construction. One with a
forward of its own (timm's ``Conv2dSame`` pads its input first; timm's ``MixedConv2d`` applies one
convolution per channel split, and each split's norm channels fold into its own convolution) may
not: its fold is checked on random float64 inputs before it is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Literal, overload

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .adapters import check_layout, find_norm_adapter, looks_like_norm, num_channels, post_norm_of
from .conv import is_centralized
from .convert import PLAIN, carry_flags, is_norm_layer, norm_dim, retype, revert_model
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
_CONV_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Where the forward of torch's convolutions and linear layers (and of this package's centralized ones) is
# defined: a subclass whose call path comes from these modules only computes its layer of its input.
_PLAIN_FORWARD_MODULES = frozenset(
    {nn.Module.__module__, nn.Conv2d.__module__, nn.Linear.__module__, is_centralized.__module__}
)
_CALL_PATH = ("__call__", "_wrapped_call_impl", "_call_impl", "forward", "_conv_forward", "_output_padding")
# A fold checked on random float64 inputs: exact up to rounding, far below this relative difference.
_CHECK_TOL = 1e-9

# Why a foldable norm layer stays; the text before the first ":" names the case (reports count by it).
_NO_CONV = "not preceded by a convolution: nothing to fold into"
_SHARED = (
    "after a convolution, but it or the convolution is shared or called more than once: "
    "one folded layer cannot serve every call"
)
_READ_ELSEWHERE = "after a convolution whose output is also read elsewhere: that reading needs it unnormalized"
_PINNED = (
    "after a convolution, but the forward also reads its or the norm's parameters directly: "
    "folding would change that reading"
)
_MISFIT = "after a convolution it does not fit: the channels or the dimensionality differ"
_NOT_PLAIN = "after a convolution whose forward is not a plain convolution of its input"
_UNCHECKED = "after a convolution whose forward could not be checked"
_UNFOLDABLE_WEIGHT = "after a convolution whose weight cannot take the fold"
_NOT_CALLED = "never called by the model's forward in evaluation mode: nothing to fold into"


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: ``(conv name, norm name)`` of every pair folded into one convolution.
        unfolded: ``(norm name, class name, reason)`` of every normalization layer left in the model.
            The reason's text before the first ":" names the case ("statistics of each sample", "not
            preceded by a convolution", "after a convolution whose forward is not a plain convolution
            of its input", ...), the rest the layers involved (a ``Linear`` + 1-D norm pair whose
            shapes were not checked says to pass ``example_input``).
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


def _conv_base(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class that ``module`` is or derives from, among those :func:`fold` folds into; else None.

    Every subclass of ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``; of the linear layers only
    ``nn.Linear`` itself and ``CenLinear`` (other subclasses, such as attention's output projection,
    are not taken for a layer whose outputs a norm may scale).
    """
    if PLAIN.get(type(module), type(module)) is nn.Linear:
        return nn.Linear
    return next((base for base in _CONV_BASES if isinstance(module, base)), None)


def _split_parts(module: nn.Module) -> list[nn.Module] | None:
    """The convolutions of a channel-split convolution (timm's ``MixedConv2d``), else None.

    Such a module has convolutions of one kind as its only children, and ``in_channels`` and
    ``out_channels`` that are the sums of theirs: it applies the i-th convolution to the i-th split
    of its input channels and concatenates the outputs in order. The structure only suggests this;
    :func:`_fold_check` confirms it numerically before a fold into it is kept.
    """
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or _plain_sequential(module):
        return None
    parts = list(module._modules.values())
    if not parts or not all(isinstance(p, nn.modules.conv._ConvNd) for p in parts):
        return None
    if len({_conv_base(p) for p in parts}) != 1:
        return None
    sums = (sum(p.in_channels for p in parts), sum(p.out_channels for p in parts))
    if (getattr(module, "in_channels", None), getattr(module, "out_channels", None)) != sums:
        return None
    return parts


def _conv_parts(module: nn.Module) -> list[nn.Module]:
    """The modules a fold into ``module`` rewrites: itself, and the convolutions of a channel split."""
    return [module, *(_split_parts(module) or ())]


def _conv_dim(module: nn.Module) -> int | None:
    """Dimensionality of a convolution or linear layer :func:`fold` can fold into, else None."""
    parts = _split_parts(module)
    base = _conv_base(parts[0] if parts else module)
    return _CONV_DIM[base] if base is not None else None


def _own_forward(module: nn.Module) -> bool:
    """True when the fold into ``module`` must be checked: its call path is not only torch's convolution.

    A channel-split convolution, an instance with its own ``forward``, or a class defining any step
    of the call (``forward``, ``_conv_forward``, ...) outside torch and this package's centralized layers.
    """
    if _split_parts(module) is not None or "forward" in module.__dict__:
        return True
    for name in _CALL_PATH:
        owner = next((cls for cls in type(module).__mro__ if name in cls.__dict__), None)
        if owner is not None and owner.__module__ not in _PLAIN_FORWARD_MODULES:
            return True
    return False


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
    return post_norm_of(module)


def _compatible(conv: nn.Module, norm: nn.Module) -> bool:
    dim = _conv_dim(conv)
    if dim is None or not _foldable_norm(norm):
        return False
    linear = _conv_base(conv) is nn.Linear
    channels = conv.out_features if linear else conv.out_channels
    if channels != num_channels(norm):
        return False
    if linear:
        return norm_dim(norm) == 1
    return norm_dim(norm) in (dim, None)  # SyncBatchNorm takes any dimensionality


class _Tracer(fx.Tracer):
    """Keeps this package's layers and every convolution as single calls, so they show up as modules in the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, StreamNorm) or is_centralized(m) or is_norm_layer(m) or looks_like_norm(m):
            return True
        # A subclass of a torch convolution, or a channel-split convolution, is one call a norm may follow
        # (traced through, it would be a functional conv that no norm can fold into).
        if isinstance(m, nn.modules.conv._ConvNd) or _split_parts(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """id -> every name of each module in the tree: a module with more than one is shared (cannot fold)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        seen.setdefault(id(m), []).append(name)
    return seen


def _unique(names: dict[int, list[str]], *modules: nn.Module) -> bool:
    return all(len(names.get(id(m), ())) == 1 for m in modules)


def _usage(module: nn.Module, graph: fx.Graph) -> tuple[dict[int, int], set[int]]:
    """(id -> calls of each module, ids of the modules whose parameters or buffers the forward reads directly)."""
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
    return calls, attrs


def _trace_verdict(
    module: nn.Module,
    node: fx.Node,
    names: dict[int, list[str]],
    usage: tuple[dict[int, int], set[int]],
    whole: bool,
) -> tuple[str | None, str | None]:
    """(the name of the conv to fold the norm called at ``node`` into, None), or (None, why not).

    The reason is None when the trace cannot tell: the norm takes other arguments, or reads the input
    of a traced part (``whole`` False), whose producer lies outside the trace.
    """
    if len(node.args) != 1 or node.kwargs:
        return None, None
    prev = node.args[0]
    if isinstance(prev, fx.Node) and prev.op == "placeholder" and not whole:
        return None, None
    if not isinstance(prev, fx.Node) or prev.op != "call_module":
        return None, _NO_CONV
    conv, norm = module.get_submodule(str(prev.target)), module.get_submodule(str(node.target))
    if _conv_dim(conv) is None:
        return None, _NO_CONV
    calls, attrs = usage
    parts = _conv_parts(conv)
    # The parts of a channel-split convolution are called inside its (leaf) call only.
    once = calls.get(id(conv)) == 1 and calls.get(id(norm)) == 1 and not any(calls.get(id(p)) for p in parts[1:])
    if not (once and _unique(names, *parts, norm)):
        return None, _SHARED
    if len(prev.users) != 1:
        return None, _READ_ELSEWHERE
    if any(id(m) in attrs for m in (*parts, norm)):
        return None, _PINNED
    if not _compatible(conv, norm):
        return None, _MISFIT
    return names[id(conv)][0], None


def _pairs_from_trace(
    module: nn.Module, names: dict[int, list[str]], whole: bool = False
) -> tuple[list[tuple[str, str]], dict[str, str], set[int]]:
    """The (conv, norm) pairs of a ``torch.fx`` trace of ``module``, why its other foldable norms stay,
    and the ids of the modules the traced forward calls or reads.

    Raises when ``module`` cannot be traced. ``names`` names every module of the whole model;
    ``whole`` says that ``module`` is the whole model (its inputs come from no convolution).
    """
    graph = _Tracer().trace(module)
    usage = _usage(module, graph)
    pairs: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        norm = module.get_submodule(str(node.target))
        if not _foldable_norm(norm):
            continue
        conv_name, why = _trace_verdict(module, node, names, usage, whole)
        norm_name = names[id(norm)][0]
        if conv_name is not None:
            pairs.append((conv_name, norm_name))
        elif why is not None:
            reasons[norm_name] = why
    calls, attrs = usage
    return pairs, reasons, set(calls) | attrs


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential``, or a subclass that does not change its forward (torchvision's Conv2dNormActivation)."""
    for cls in type(module).__mro__:
        if cls is nn.Sequential:
            return True
        if "forward" in cls.__dict__:
            return False
    return False


def _tail(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The last module that nested plain ``nn.Sequential``s apply (their output is its output), and its name.

    torchvision's ``Conv2Plus1D`` (conv, norm, ReLU, conv) is such a Sequential, followed by a norm.
    """
    while _plain_sequential(module) and module._modules:
        key, child = next(reversed(module._modules.items()))
        if child is None:
            break
        module, name = child, f"{name}.{key}"
    return module, name


def _structural_pairs(module: nn.Module, prefix: str, names: dict[int, list[str]]) -> list[tuple[str, str]]:
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
        first, norm = module._modules.get(a), module._modules.get(b)
        if first is None or norm is None:
            continue
        conv, conv_name = _tail(first, prefix + a)
        if _unique(names, first, *_conv_parts(conv), norm) and _compatible(conv, norm):
            pairs.append((conv_name, prefix + b))
    return pairs


def _search_parts(
    module: nn.Module, prefix: str, names: dict[int, list[str]], reasons: dict[str, str]
) -> list[tuple[str, str]]:
    """The pairs of a module that cannot be traced: its structural pairs, then those of each child
    (from the child's trace, or, when that fails too, from its parts). Adds the reasons the traces give."""
    pairs = _structural_pairs(module, prefix, names)
    for name, child in module.named_children():
        if child is None or not any(True for _ in child.children()):
            continue
        try:
            found, why, _ = _pairs_from_trace(child, names)
        except Exception:  # noqa: BLE001 - this part does not trace either: its parts then
            pairs += _search_parts(child, f"{prefix}{name}.", names, reasons)
            continue
        pairs += found
        reasons.update(why)
    return pairs


def _unreached_parts(model: nn.Module, covered: set[int]) -> list[tuple[str, nn.Module]]:
    """The largest sub-modules with children that a traced forward never enters and that hold a foldable
    norm (googlenet's auxiliary heads in evaluation mode). ``covered``: the modules the forward calls or
    reads, and everything inside them."""
    parts: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if child is None or id(child) in covered:
                continue
            inside = list(child.modules())
            if any(id(m) in covered for m in inside):
                visit(child, f"{prefix}{name}.")
            elif len(inside) > 1 and any(_foldable_norm(m) for m in inside):
                parts.append((prefix + name, child))

    visit(model, "")
    return parts


def _find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str], str | None]:
    """The pairs to fold, why the other foldable norms the search saw stay, and the error of tracing the model.

    The error is None when the whole model traced. A model that cannot be traced (data-dependent
    control flow, list inputs) is searched part by part: each sub-module that traces gives the pairs
    of its trace, the others their structural pairs and then their own children. The parts a traced
    forward never enters are searched the same way: their pairs hold whenever they are called.
    """
    names = _module_names(model)
    reasons: dict[str, str] = {}
    try:
        pairs, reasons, reached = _pairs_from_trace(model, names, True)  # the whole model
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: look at the parts
        pairs = _search_parts(model, "", names, reasons)
        return list(dict.fromkeys(pairs)), reasons, f"{type(exc).__name__}: {exc}"
    # What a called (leaf) module holds runs inside its call.
    covered = {id(inner) for m in model.modules() if id(m) in reached for inner in m.modules()}
    for prefix, part in _unreached_parts(model, covered):
        try:
            found, why, _ = _pairs_from_trace(part, names)
        except Exception:  # noqa: BLE001 - its parts then
            found, why = _search_parts(part, f"{prefix}.", names, reasons), {}
        pairs += found
        reasons.update(why)
    for m in model.modules():
        if m is not model and id(m) not in covered and _foldable_norm(m):
            reasons.setdefault(names[id(m)][0], _NOT_CALLED)
    return list(dict.fromkeys(pairs)), reasons, None


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
def _norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of the evaluation-mode map of a foldable norm, in float64 (at least)."""
    work = torch.promote_types(norm.running_var.dtype, torch.float64)
    scale = torch.rsqrt(norm.running_var.to(work) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(work)
    shift = -scale * norm.running_mean.to(work) if norm.running_mean is not None else torch.zeros_like(scale)
    if norm.bias is not None:
        shift = shift + norm.bias.to(work)
    return scale, shift


def _clear_hooks(module: nn.Module) -> None:
    """The norm's work is inside the folded layer now: hooks registered on the conv would see another output."""
    module._forward_hooks = type(module._forward_hooks)()
    module._forward_pre_hooks = type(module._forward_pre_hooks)()


@torch.no_grad()
def _fused_conv(conv: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    """``conv`` (of its own class, the centralized ones as torch's) computing ``conv(x) * scale + shift`` per channel."""
    weight = conv.centralized_weight() if hasattr(conv, "centralized_weight") else conv.weight
    dtype, device = weight.dtype, weight.device
    # Combine in float64 (at least), then round once to the layer's dtype.
    work = torch.promote_types(dtype, scale.dtype)
    scale, shift = scale.to(device=device, dtype=work), shift.to(device=device, dtype=work)
    if conv.bias is not None:
        shift = shift + scale * conv.bias.to(work)
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
    _clear_hooks(new)
    return new


def _fused(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """One layer computing ``norm(conv(x))`` in evaluation mode, without the norm's post-norm modules.

    A channel-split convolution stays one, each of its convolutions folded with its own channels of the norm.
    """
    scale, shift = _norm_affine(norm)
    parts = _split_parts(conv)
    if parts is None:
        return _fused_conv(conv, scale, shift)
    new = retype(conv, type(conv))  # a fresh dict of children: the caller's module keeps its own
    start = 0
    for key, part in conv._modules.items():
        end = start + part.out_channels
        new._modules[key] = carry_flags(part, _fused_conv(part, scale[start:end], shift[start:end]))
        start = end
    _clear_hooks(new)
    return new


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` without hooks (a hook of the caller's must not run, nor see the probe)."""
    probe = copy.deepcopy(module).double()
    for m in probe.modules():
        _clear_hooks(m)
    return probe


def _probe_inputs(conv: nn.Module) -> list[Tensor]:
    """Two small random float64 inputs for ``conv``: every spatial size even in one, odd in the other.

    Large enough for each kernel to fit twice its stride over (so an unpadded convolution has outputs);
    two parities because "same" padding splits an odd and an even excess differently.
    """
    convs: list[Any] = _split_parts(conv) or [conv]
    reach = max(d * (k - 1) + 1 + 2 * s for c in convs for d, k, s in zip(c.dilation, c.kernel_size, c.stride))
    dims, device = len(convs[0].kernel_size), convs[0].weight.device
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, conv.in_channels, *[size] * dims, generator=generator, dtype=torch.float64).to(device)
        for size in (reach, reach + 1)
    ]


@torch.no_grad()
def _fold_check(conv: nn.Module, norm: nn.Module, new: nn.Module, post: dict[str, nn.Module]) -> str | None:
    """None when ``new`` then ``post`` computes ``norm(conv(x))`` on random float64 inputs; else why not.

    The answer says what happened (it ``raised`` or ``folded, it computes other values``), without the
    reason's head.
    """
    try:
        reference = nn.Sequential(_probe_copy(conv), _probe_copy(norm))
        folded = nn.Sequential(_probe_copy(new), *(_probe_copy(m) for m in post.values()))
        worst = 0.0
        for x in _probe_inputs(conv):
            expected, got = reference(x), folded(x)
            if got.shape != expected.shape:
                return f"output of shape {tuple(got.shape)} instead of {tuple(expected.shape)} on a random input"
            scale = expected.abs().max().item()
            worst = max(worst, (got - expected).abs().max().item() / (scale if scale > 0 else 1.0))
    except Exception as exc:  # noqa: BLE001 - any failure: the fold cannot be vouched for
        return f"raised {type(exc).__name__} on a random input: {' '.join(str(exc).split())[:200]}"
    if not worst <= _CHECK_TOL:  # NaN included
        return f"folded, it computes other values (relative difference {worst:.1e} on random inputs)"
    return None


def _fold_pair(model: nn.Module, conv_name: str, norm_name: str) -> tuple[nn.Module, nn.Module] | str:
    """(the folded conv, what replaces the norm), or why the norm stays."""
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    what = f"{conv_name} ({type(conv).__name__})"
    parts = _conv_parts(conv)
    if any(parametrize.is_parametrized(p) for p in parts):
        # Its weight is computed from other tensors on every call: a new weight would be ignored.
        return f"{_UNFOLDABLE_WEIGHT}: {what} is parametrized (torch.nn.utils.parametrize; remove that first)"
    if any(nn.parameter.is_lazy(t) for p in parts for t in p.parameters(recurse=False)):
        return f"{_UNFOLDABLE_WEIGHT}: {what} is lazy and not initialized yet (run the model once first)"
    post = _post_norm(norm)
    new = carry_flags(conv, _fused(conv, norm))
    if _own_forward(conv):
        # Checked on a float64 fold, not on ``new``: rounding the folded weights to float32 is not the question.
        why = _fold_check(conv, norm, _fused(_probe_copy(conv), norm), post)
        if why is not None:
            head = _NOT_PLAIN if why.startswith("folded") else _UNCHECKED
            return f"{head}: {what} {why}"
    # What the norm applied after the normalization (an activation, dropout) stays in its place.
    rest = nn.Sequential(OrderedDict(post)) if post else nn.Identity()
    return new, carry_flags(norm, rest)


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
    one convolution with bias (see the module docstring for the formula): a plain ``nn.Conv*d`` /
    ``nn.ConvTranspose*d`` for those and for weight-centralized layers, the same class for any other
    subclass (torchvision's video convolutions, timm's ``Conv2dSame``, yours). The norm becomes
    ``nn.Identity``, or, when it applied modules after the normalization (an activation, dropout),
    an ``nn.Sequential`` of those modules under their names.

    A subclass that inherits torch's forward folds as it is. One with a forward of its own folds
    only when that forward is a convolution of its (possibly padded, cropped) input: the fold is
    made on a copy and run beside the original conv and norm on two small random float64 inputs
    built from the layer's channels and kernel; when they differ, or the forward cannot run on such
    an input, the pair stays and the report says why. A channel-split convolution (timm's
    ``MixedConv2d``: convolutions as its only children, its ``in_channels`` and ``out_channels``
    their sums, outputs concatenated) folds split by split, checked the same way. A parametrized
    weight (``torch.nn.utils.parametrize``) does not fold.

    ``nn.Linear`` followed by a 1-D norm folds only when that is provably the same function: the
    norm scales dim 1 and the Linear's outputs are the last dim, which agree for 2-D (N, C) inputs
    only. So these pairs fold only when ``example_input`` is given and the norm receives 2-D inputs
    in ``model(example_input)``; otherwise they stay and are reported. Convolution pairs need no
    shapes.

    "Directly followed" is read from a ``torch.fx`` trace of the model: the conv's output must feed
    the norm and nothing else, and neither module may be shared or called twice. A model that
    cannot be traced (data-dependent control flow, a detection model's list inputs) is searched part
    by part: every sub-module that traces is read from its trace, and elsewhere ``nn.Sequential``
    neighbours (a nested Sequential ending in a conv included) and the blocks of :mod:`mabn.models`
    fold (which covers every model of :mod:`mabn.models`).

    Afterwards nothing of this package is left: every remaining weight-centralized layer becomes
    the plain layer with centralized weights, and every remaining layer of this package that could not
    fold becomes the class it was converted from, or the equivalent ``nn.BatchNorm*d``
    (:func:`to_batchnorm`). Norm layers that cannot fold (GroupNorm, LayerNorm, InstanceNorm, a
    BatchNorm not after a conv, a BatchNorm-like layer of an unknown class) stay and are reported
    with their reason (its text before the first ":" names the case, the rest the layers):
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
    pairs, reasons, error = _find_pairs(model)
    if error is not None:
        report.traced, report.trace_error = False, error
    pairs, rejected = _check_linear_pairs(model, pairs, args)
    reasons.update(rejected)
    for conv_name, norm_name in pairs:
        result = _fold_pair(model, conv_name, norm_name)
        if isinstance(result, str):
            reasons[norm_name] = result
            continue
        _set(model, conv_name, result[0])
        _set(model, norm_name, result[1])
        report.folded.append((conv_name, norm_name))
    # What is left of this package becomes plain torch layers computing the same.
    model = revert_model(model, centralized_weights=True)
    for name, m in model.named_modules():
        if _left_norm(m):
            report.unfolded.append((name, type(m).__name__, reasons.get(name) or _reason(m)))
    if report.unfolded and not return_report:
        kept = ", ".join(f"{name or '<model>'!r} ({cls})" for name, cls, _ in report.unfolded[:8])
        more = f" and {len(report.unfolded) - 8} more" if len(report.unfolded) > 8 else ""
        count = len(report.unfolded)
        logger.warning("fold: %d norm layer%s could not fold and stay: %s%s", count, "s" * (count != 1), kept, more)
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
    return revert_model(copy.deepcopy(model), centralized_weights=True)
