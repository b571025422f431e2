"""What every norm layer of this package shares with the others, whatever its math.

* **FX leaf calls.** ``torch.fx`` tracers hand a layer a ``Proxy`` instead of a Tensor. The
  statistics engine cannot run on one (it updates buffers and branches on the step count), so a
  layer that receives a Proxy records itself as one ``call_module`` node: the traced graph calls the
  real layer, which trains and updates its buffers exactly as in the original model.
* **Post-norm modules.** A layer converted from a norm+activation layer (timm's ``BatchNormAct2d``)
  keeps that layer's dropout and activation as child modules of the same names, and applies them
  after the normalization, in order (``layer.post_norm == ("drop", "act")``).
* **Loading state dicts.** A load either copies every entry of a layer or none
  (:func:`load_all_or_nothing`).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, fx, nn

__all__ = [
    "is_proxy",
    "leaf_call",
    "run_post_norm",
    "set_post_norm",
    "post_norm_modules",
    "check_track_running_stats",
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


def check_track_running_stats(module: nn.Module, value: object) -> None:
    """The setter of ``track_running_stats``: these layers always keep and use running statistics."""
    if value is not True:
        raise ValueError(
            f"{type(module).__name__} always keeps running statistics: track_running_stats cannot be set to {value!r} "
            "(for batch statistics in evaluation too, use a GroupNorm/LayerNorm, or keep the layer in training mode)"
        )


def _user_strict() -> bool:
    """The ``strict`` argument of the ``Module.load_state_dict`` call this load runs in (True outside one).

    torch passes ``strict=True`` to every layer's ``_load_from_state_dict`` and applies the user's
    choice only when the whole load is done, so the layer reads it from that call.
    """
    target = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is target:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return True


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
    The rules, the same for every layer of this package:

    * every entry present with the right shape: load;
    * an entry of the wrong shape: refuse the whole layer (an error, as torch reports it);
    * entries missing or unexpected under ``load_state_dict(strict=True)``: refuse the whole layer
      and report them (torch then raises), so a refused layer is left exactly as it was;
    * under ``strict=False``: the present entries load, the missing and unexpected ones are
      reported, as torch's own layers do.
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
    if shapes:
        missing.extend(prefix + k for k in lacking)
        unexpected.extend(prefix + k for k in extra)
        errors.append(
            f"{type(module).__name__} {prefix.rstrip('.')}: state dict refused, nothing loaded: "
            f"size mismatch {', '.join(shapes)}"
        )
        return False
    if not _user_strict():
        # torch copies what is there and reports the missing and unexpected entries itself.
        return True
    missing.extend(prefix + k for k in lacking)
    unexpected.extend(prefix + k for k in extra)
    if extra:
        errors.append(
            f"{type(module).__name__} {prefix.rstrip('.')}: state dict refused, nothing loaded: "
            f"unexpected {', '.join(extra)} (the state dict of another kind of norm layer: convert the model with "
            "mabn.convert_model, or load with strict=False to take the entries that fit)"
        )
    return False
