"""Re-estimate the running statistics of a trained model exactly, over many batches (PreciseBN-style).

An exponential moving average of batch statistics weighs the last batches most and lags behind the
weights; at 1-2 samples per batch it is also noisy. :func:`recalibrate` replaces it by the
population statistics of each layer's input over the given batches, with the weights fixed.
:func:`update_bn` is the same for stochastic weight averaging, with the signature of
:func:`torch.optim.swa_utils.update_bn` (which only sees torch's BatchNorms).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int
from .adapters import check_layout, find_norm_adapter, looks_like_norm, unknown_norm_error
from .modules import StreamNorm

__all__ = ["recalibrate", "update_bn"]


class _Moments:
    """Per-channel float64 sums of one layer's inputs: count, sum and sum of squares about a shift."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.sum_sq: Tensor | None = None

    def add(self, x: Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        if self.shift is None:
            # Sums about the first batch's mean: no cancellation when the mean is large.
            self.shift = flat.mean(1)
            self.sum = torch.zeros_like(self.shift)
            self.sum_sq = torch.zeros_like(self.shift)
        centered = flat - self.shift[:, None]
        self.sum += centered.sum(1)
        self.sum_sq += centered.square().sum(1)
        self.count += flat.shape[1]

    def mean(self) -> Tensor:
        return self.shift + self.sum / self.count

    def variance(self) -> Tensor:
        """Unbiased variance over every sample and position (as BatchNorm's running_var)."""
        centered_mean = self.sum / self.count
        return (self.sum_sq - self.count * centered_mean.square()) / max(self.count - 1, 1)

    def second_moment(self) -> Tensor:
        centered_mean = self.sum / self.count
        return self.sum_sq / self.count + 2 * self.shift * centered_mean + self.shift.square()


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> layer of every norm layer with running statistics to re-estimate.

    This package's layers and every BatchNorm the adapters know (torch's, timm's ``BatchNormAct2d``,
    ...): each normalizes its input, so the input is what its statistics are taken over. Frozen
    layers are fixed by definition; a layer of an unknown class that looks like a BatchNorm is
    refused, as its statistics may mean something else.
    """
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, StreamNorm):
            layers[name] = m
            continue
        adapter = find_norm_adapter(m)
        if adapter is None:
            why = looks_like_norm(m)
            if why is not None:
                raise unknown_norm_error(name, m, why, "recalibrate")
        elif adapter.kind == "batch_norm" and getattr(m, "track_running_stats", False):
            check_layout(name, m, adapter)
            layers[name] = m
    return layers


def _input(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"batches must yield Tensors or (input, target) pairs, got {type(batch).__name__}")


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: int | torch.device | str | None = None,
) -> nn.Module:
    r"""Set the running statistics of every normalization layer to their population values over ``batches``.

    The model runs in training mode (each layer normalizes as in training, so every layer sees the
    inputs it saw in training) without gradients, and every layer of this package and every
    BatchNorm with running statistics that :mod:`mabn.adapters` knows (torch's, timm's
    ``BatchNormAct2d``, ...) records its input. Frozen BatchNorms keep their statistics. Then each layer gets, over all N samples
    and positions of all batches (float64 sums about a shift, so exact up to rounding):

    * centered layers (BatchNorm, ghost BN, BRN, ...): ``running_mean`` = the mean and
      ``running_var`` = the unbiased variance;
    * uncentered layers (MABN): ``running_var`` = the second moment :math:`E[x^2]`.

    Everything else each layer holds (moving-average windows, ``num_batches_tracked``, the
    accumulation state) is restored to what it was, so later training continues exactly as it
    would have; ``.training`` flags are restored too. On an error (a bad batch, non-finite
    statistics) the model is left as it was.

    Args:
        model: the model (changed in place).
        batches: an iterable of input Tensors or of ``(input, target, ...)`` tuples, e.g. a
            ``DataLoader``.
        num_batches: use at most this many batches. Default: all.
        device: move each input there first. Default: leave it.

    Returns:
        ``model``.

    Raises:
        ValueError: no layer to recalibrate, no batch, a bad ``num_batches``, non-finite statistics, or
            a layer that looks like a BatchNorm of an unknown class (the error names the layer).
        TypeError: a batch that is neither a Tensor nor a tuple starting with one.

    Example::

        >>> import torch, mabn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), mabn.MABN2d(4, norm_batch_size=2))
        >>> data = [torch.randn(2, 3, 8, 8) for _ in range(10)]
        >>> _ = mabn.recalibrate(model, data)
        >>> x = torch.cat([model[0](b) for b in data])
        >>> torch.allclose(model[1].running_var, x.square().mean((0, 2, 3)), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if num_batches is not None:
        check_int("num_batches", num_batches, 1)
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no normalization layer with running statistics to recalibrate")
    moments = {name: _Moments() for name in layers}
    saved = {name: {k: v.clone() for k, v in m._buffers.items() if v is not None} for name, m in layers.items()}
    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(_recorder(moments[name])) for name, m in layers.items()]
    try:
        model.train()
        seen = 0
        for batch in itertools.islice(batches, num_batches):
            x = _input(batch)
            model(x.to(device) if device is not None else x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate needs at least one batch, got none")
        new = {name: _population(name, m, moments[name]) for name, m in layers.items()}
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
        _restore(layers, saved)
    for name, m in layers.items():
        for key, value in new[name].items():
            getattr(m, key).copy_(value)
    return model


def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: int | torch.device | str | None = None,
) -> None:
    """Recompute the running statistics of every norm layer of ``model`` over ``loader``: SWA's last step.

    A drop-in for :func:`torch.optim.swa_utils.update_bn`, which looks for torch's ``_BatchNorm``
    only and leaves this package's layers with the statistics of the weights before averaging. Here
    every layer with running statistics is updated: this package's (MABN, ghost BN, BRN, ...),
    torch's BatchNorms and every BatchNorm :mod:`mabn.adapters` knows (timm's ``BatchNormAct2d``,
    ...); frozen BatchNorms keep theirs. It is :func:`recalibrate` over the whole loader: the old
    running statistics are discarded and replaced by their population values over all samples of the
    loader (for the uncentered layers, MABN, the second moment). Works on a
    :class:`torch.optim.swa_utils.AveragedModel` as on the model itself.

    Differences from torch's function, each deliberate:

    * the statistics weigh every sample equally (torch averages per-batch statistics, equal weight
      per batch): the same mean, and the variance of the whole population, not the mean of batch
      variances;
    * ``num_batches_tracked`` and the moving-average windows are kept, so training can continue
      from the averaged model with its warm-ups where they were (torch resets the counter);
    * every module's ``.training`` flag is restored (torch sets the model's recursively);
    * a loader with no batch is an error (torch leaves the reset statistics, mean 0 and variance 1).

    Args:
        loader: the data to compute the statistics on, e.g. the training ``DataLoader``: an iterable
            of input Tensors or of tuples/lists whose first element is the input.
        model: the model (changed in place), e.g. an ``AveragedModel``. A model without a layer
            with running statistics is left as it is, as torch's function does.
        device: move each input there first. Default: leave it.

    Returns:
        None, as torch's function.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (e.g. the arguments swapped), ``loader`` is not
            iterable, or a batch is neither a Tensor nor a tuple/list starting with one.
        ValueError: an empty loader, non-finite statistics, or a layer that looks like a BatchNorm of an
            unknown class (named). On an error the model is left as it was.

    Example::

        >>> import torch, mabn
        >>> from torch.optim.swa_utils import AveragedModel
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), mabn.MABN2d(4, norm_batch_size=2))
        >>> swa = AveragedModel(model)
        >>> loader = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(5)]
        >>> mabn.update_bn(loader, swa)
        >>> x = torch.cat([swa.module[0](b[0]) for b in loader])
        >>> torch.allclose(swa.module[1].running_var, x.square().mean((0, 2, 3)), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        swapped = " (the loader comes first: update_bn(loader, model))" if isinstance(loader, nn.Module) else ""
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}{swapped}")
    if isinstance(loader, (Tensor, nn.Module)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"loader must be an iterable of batches (e.g. a DataLoader or a list of Tensors), got {type(loader).__name__}"
        )
    if not _layers(model):
        return  # nothing with running statistics (GroupNorm, LayerNorm, ...): as torch's update_bn
    recalibrate(model, loader, device=device)


def _recorder(moments: _Moments) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        moments.add(inputs[0])

    return hook


def _population(name: str, layer: nn.Module, moments: _Moments) -> dict[str, Tensor]:
    if moments.count == 0:
        raise ValueError(f"layer {name} was not called by the model: nothing to recalibrate it with")
    centered = not isinstance(layer, StreamNorm) or layer.config.centered
    values = {"running_var": moments.variance() if centered else moments.second_moment()}
    if centered:
        values["running_mean"] = moments.mean()
    for key, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"recalibrating {name}: the {key} over the batches is not finite")
        values[key] = value.to(getattr(layer, key).dtype)
    return values


def _restore(layers: dict[str, nn.Module], saved: dict[str, dict[str, Tensor]]) -> None:
    for name, m in layers.items():
        for key, value in saved[name].items():
            m._buffers[key].copy_(value)
