"""What every norm layer of this package shares with the others, whatever its math.

* **FX leaf calls.** ``torch.fx`` tracers hand a layer a ``Proxy`` instead of a Tensor. The
  statistics engine cannot run on one (it updates buffers and branches on the step count), so a
  layer that receives a Proxy records itself as one ``call_module`` node: the traced graph calls the
  real layer, which trains and updates its buffers exactly as in the original model.
* **Post-norm modules.** A layer converted from a norm+activation layer (timm's ``BatchNormAct2d``)
  keeps that layer's dropout and activation as child modules of the same names, and applies them
  after the normalization, in order (``layer.post_norm == ("drop", "act")``).
* **Loading state dicts.** A load either copies every entry of a layer or none, under
  ``strict=True`` and ``strict=False`` alike (:func:`load_all_or_nothing`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = [
    "is_proxy",
    "leaf_call",
    "run_post_norm",
    "set_post_norm",
    "post_norm_modules",
    "NormLayer",
    "check_track_running_stats",
    "check_input_dim",
    "load_all_or_nothing",
]


def is_proxy(value: Any) -> bool:
    """True for the placeholder values of a ``torch.fx`` trace."""
    return isinstance(value, fx.Proxy)


def leaf_call(module: nn.Module, proxy: fx.Proxy) -> fx.Proxy:
    """Record ``module(proxy)`` as one ``call_module`` node of the trace ``proxy`` belongs to."""
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (proxy,), {})


def run_post_norm(module: nn.Module, output: Tensor) -> Tensor:
    """Apply the post-norm modules of ``module`` (its ``post_norm`` names, in order) to ``output``."""
    for name in module.post_norm:
        output = module._modules[name](output)
    return output


def post_norm_modules(module: nn.Module) -> dict[str, nn.Module]:
    """name -> module of the post-norm modules of a layer of this package (empty for most layers)."""
    return {name: module._modules[name] for name in getattr(module, "post_norm", ())}


def set_post_norm(module: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Make ``modules`` (name -> module, in application order) the post-norm modules of ``module``."""
    for name in getattr(module, "post_norm", ()):
        del module._modules[name]
    for name, child in modules.items():
        if name in module.__dict__ or name in module._parameters or name in module._buffers:
            raise ValueError(
                f"{type(module).__name__} cannot keep a post-norm module named {name!r}: the name is taken"
            )
        module._modules[name] = child
    module.post_norm = tuple(modules)


class NormLayer:
    """What every norm layer of this package shares (a mixin before ``nn.Module``).

    A subclass declares the input dimensionalities it takes (``_input_dims``, empty: any (N, C, *))
    and how its messages say so (``_input_shape``); it may bring an older or foreign state dict to
    its layout (``_prepare_load``) and act once its entries are loaded (``_loaded``).
    """

    # TorchScript reads the input ranks as constants (the frozen layers script); the property is Python's.
    __constants__ = ["_input_dims", "_input_shape"]
    __jit_unused_properties__ = ["track_running_stats"]
    _input_dims: tuple[int, ...] = ()
    _input_shape = "(N, C, *)"
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

    def _check_input_dim(self, input: Tensor) -> None:
        name = "norm layer"  # scripted: TorchScript does not know the class's name
        if not torch.jit.is_scripting():
            name = type(self).__name__
        check_input_dim(name, input.dim(), list(self._input_dims), self._input_shape)

    def _prepare_load(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
        """Bring this layer's entries of ``state_dict`` to the current layout, in place (nothing by default)."""

    def _loaded(self) -> None:
        """Called once this layer's entries are loaded (nothing by default)."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._prepare_load(state_dict, prefix, local_metadata)
        # All of this layer's keys or none (see load_all_or_nothing): a refused load copies nothing.
        if not load_all_or_nothing(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs):
            return
        errors = len(error_msgs)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) == errors:
            self._loaded()


def check_track_running_stats(module: object, value: object) -> None:
    """The setter of ``track_running_stats``: these layers always keep and use running statistics."""
    if value is not True:
        raise ValueError(
            f"{type(module).__name__} always keeps running statistics: track_running_stats cannot be set to {value!r} "
            "(for batch statistics in evaluation too, use a GroupNorm/LayerNorm, or keep the layer in training mode)"
        )


def check_input_dim(name: str, dim: int, dims: list[int], shape: str) -> None:
    """The one check, and wording, of an input's number of dimensions (``dims`` empty: any).

    Plain enough for TorchScript, which compiles it into the frozen layers' scripted forward.
    """
    if len(dims) > 0 and dim not in dims:
        expected = " or ".join([f"{d}-D" for d in dims])
        raise ValueError(f"{name} expects {expected} input {shape}, got {dim}-D input")


def load_all_or_nothing(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
) -> bool:
    """Check the entries of ``module``'s own parameters and buffers before anything is copied.

    Returns whether torch may copy them (the caller then runs ``nn.Module._load_from_state_dict``).
    The rules, the same for every layer of this package and under ``strict=True`` and
    ``strict=False`` alike (torch tells a layer neither: it passes ``strict=True`` to every
    ``_load_from_state_dict`` and applies the caller's choice once the whole load is done):

    * every entry present with the right shape: load;
    * none present (a layer the checkpoint does not hold): nothing to load, the entries reported
      missing, as torch does;
    * an entry of the wrong shape: refuse the whole layer, an error (the load raises);
    * some entries missing or unexpected (a partial state dict, or another kind of norm layer's):
      refuse the whole layer, report them and warn. ``strict=True`` then raises, ``strict=False``
      returns them; the layer is left exactly as it was either way.
    """
    expected = {name: t for name, t in module._parameters.items() if t is not None}
    expected.update(
        (n, t) for n, t in module._buffers.items() if t is not None and n not in module._non_persistent_buffers_set
    )
    present = {k[len(prefix) :] for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix) :]}
    lacking = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    shapes = [
        f"{name}: {tuple(state_dict[prefix + name].shape)} instead of {tuple(t.shape)}"
        for name, t in expected.items()
        if name in present
        and isinstance(state_dict[prefix + name], Tensor)
        and state_dict[prefix + name].shape != t.shape
    ]
    if not (lacking or extra or shapes):
        return True
    missing.extend(prefix + k for k in lacking)
    unexpected.extend(prefix + k for k in extra)
    where = " ".join(part for part in (type(module).__name__, prefix.rstrip(".")) if part)
    refused = f"{where}: state dict refused, nothing loaded"
    if shapes:
        errors.append(f"{refused}: size mismatch {', '.join(shapes)}")
    elif present:
        keys = [f"{what} {', '.join(names)}" for what, names in (("missing", lacking), ("unexpected", extra)) if names]
        hint = (
            " (the state dict of another kind of norm layer: load it into the model it was saved from, then "
            "convert that with mabn.convert_model)"
            if extra
            else ""
        )
        warnings.warn(f"{refused}: {'; '.join(keys)}{hint}", stacklevel=2)
    return False
