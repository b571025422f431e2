"""Stochastic weight averaging and EMA with this package's layers: mabn.update_bn, AveragedModel, ModelEmaV3."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.testing import assert_close

import mabn

STATS = ("running_mean", "running_var")


def _model(torch_bn: bool = False) -> nn.Sequential:
    """conv -> MABN -> ReLU -> conv -> ghost BN (or torch's BatchNorm2d) -> pool -> linear."""
    second = nn.BatchNorm2d(6) if torch_bn else mabn.GhostBatchNorm2d(6, norm_batch_size=2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        mabn.MABN2d(4, norm_batch_size=2, warmup_iters=2),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        second,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _loader(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 9, 9, generator=g) * 2 + 0.5, torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _swa(torch_bn: bool = False) -> AveragedModel:
    """An AveragedModel of a model trained a few SGD steps, its statistics those of the last weights."""
    torch.manual_seed(0)
    model = _model(torch_bn)
    swa = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _loader(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        swa.update_parameters(model)
    return swa


@torch.no_grad()
def _population(model: nn.Sequential, loader: list) -> dict[int, dict[str, torch.Tensor]]:
    """The population statistics of each norm layer's input, by running a copy of the layers in
    training mode batch after batch, as the model trains (float64 sums)."""
    net = copy.deepcopy(model).train()
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i, m in enumerate(net) if mabn.is_norm_layer(m)}
    for x, *_ in loader:
        for i, layer in enumerate(net):
            if i in inputs:
                inputs[i].append(x.double())
            x = layer(x)
    stats = {}
    for i, xs in inputs.items():
        x = torch.cat(xs).transpose(0, 1).flatten(1)
        layer = model[i]
        if isinstance(layer, mabn.StreamNorm) and not layer.config.centered:
            stats[i] = {"running_var": x.square().mean(1).float()}
        else:
            stats[i] = {"running_mean": x.mean(1).float(), "running_var": x.var(1, unbiased=True).float()}
    return stats


def _others(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer but the running statistics (windows, counters)."""
    return {k: v.clone() for k, v in model.named_buffers() if k.rsplit(".", 1)[-1] not in STATS}


def test_torch_update_bn_does_not_see_the_layers():
    # What mabn.update_bn is for: torch's function looks for _BatchNorm and changes nothing here.
    swa = _swa()
    before = snapshot(swa)
    torch_update_bn(_loader(), swa)
    assert_unchanged(swa, before)


@pytest.mark.parametrize("torch_bn", [False, True], ids=["mabn-only", "mixed"])
@pytest.mark.parametrize("form", ["tuple", "list", "tensor"])
def test_update_bn_sets_the_population_statistics(torch_bn, form):
    swa = _swa(torch_bn)
    loader = _loader()
    batches = {"tuple": loader, "list": [list(b) for b in loader], "tensor": [b[0] for b in loader]}[form]
    expected = _population(swa.module, loader)
    others = _others(swa)
    assert mabn.update_bn(batches, swa) is None
    assert len(expected) == 2
    for i, stats in expected.items():
        for key, value in stats.items():
            assert_close(getattr(swa.module[i], key), value, msg=f"layer {i} {key}")
    if torch_bn:
        assert isinstance(swa.module[4], nn.BatchNorm2d)
    # Windows and counters are kept: training continues from the averaged model where it was.
    for key, value in others.items():
        assert torch.equal(dict(swa.named_buffers())[key], value), key


def test_update_bn_replaces_stale_statistics():
    # The statistics before averaging are those of the last weights (an EMA); afterwards they are the
    # averaged weights' own, whatever they were before.
    a, b = _swa(), _swa()
    with torch.no_grad():
        for m in b.module.modules():
            if isinstance(m, mabn.StreamNorm):
                m.running_var.mul_(7.0).add_(3.0)
    mabn.update_bn(_loader(), a)
    mabn.update_bn(_loader(), b)
    for key, value in a.state_dict().items():
        assert_close(b.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("training", [True, False])
def test_update_bn_restores_every_training_flag(training):
    swa = _swa()
    swa.train(training)
    swa.module[1].train(not training)  # one layer in the other mode, kept as it was
    flags = [m.training for m in swa.modules()]
    mabn.update_bn(_loader(), swa, device="cpu")
    assert [m.training for m in swa.modules()] == flags


def test_update_bn_on_a_model_without_running_statistics_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), mabn.FrozenBatchNorm2d(4))
    before = snapshot(model)
    assert mabn.update_bn(_loader(), model) is None  # as torch's update_bn: nothing to update
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "args,error,message",
    [
        (lambda swa: (swa, _loader()), TypeError, r"model must be an nn.Module, got list \(the loader comes first"),
        (lambda swa: (3, swa), TypeError, "loader must be an iterable of batches .* got int"),
        (lambda swa: (torch.randn(4, 3, 9, 9), swa), TypeError, "loader must be .* got Tensor"),
        (lambda swa: ([{"x": torch.randn(4, 3, 9, 9)}], swa), TypeError, "got dict"),
        (lambda swa: ([("x", torch.randn(4, 3, 9, 9))], swa), TypeError, "got tuple"),
        (lambda swa: ([], swa), ValueError, "at least one batch, got none"),
        (lambda swa: ([torch.full((4, 3, 9, 9), float("nan"))], swa), ValueError, "is not finite"),
    ],
)
def test_bad_arguments_are_clear_errors_and_change_nothing(args, error, message):
    swa = _swa()
    before = snapshot(swa)
    with pytest.raises(error, match=message):
        mabn.update_bn(*args(swa))
    assert_unchanged(swa, before)


def test_model_ema_v3_averages_every_buffer_and_update_bn_recomputes_its_statistics():
    # timm's EMA lerps every floating state entry (running statistics and windows) and copies the
    # counters: nothing in the layers is special to it.
    model = _model()
    ema = ModelEmaV3(model, decay=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _loader(4):
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        ema.update(model)
        current = model.state_dict()
        for key, value in ema.module.state_dict().items():
            expected = before[key].lerp(current[key], 0.25) if value.is_floating_point() else current[key]
            assert_close(value, expected, msg=key)
    expected = _population(ema.module, _loader())
    mabn.update_bn(_loader(), ema.module)
    for i, stats in expected.items():
        for key, value in stats.items():
            assert_close(getattr(ema.module[i], key), value, msg=f"layer {i} {key}")
    assert not ema.module.training and torch.isfinite(ema.module(_loader(1)[0][0])).all()
