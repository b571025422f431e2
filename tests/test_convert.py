"""convert_model / revert_model: coverage, carried state, round trips, errors."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mabn
from mabn import models

F64 = torch.float64


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics in every BatchNorm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(37)


def _bn_model(dtype=torch.float32) -> nn.Module:
    model = models.resnet_small(depth=1, width=4, in_channels=3).to(dtype)
    _randomize_bn(model)
    # Mixed state that must survive: a frozen parameter and a sub-module in eval mode.
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.layer2.eval()
    return model


def _types(model):
    return [type(m) for m in model.modules()]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]


@pytest.mark.parametrize(
    ("norm", "cls"),
    [("mabn", mabn.MABN2d), (mabn.GhostBatchNorm2d, mabn.GhostBatchNorm2d), ("brn", mabn.BatchRenorm2d),
     ("uncentered", mabn.GeneralBatchNorm2d), ("gn", nn.GroupNorm), (mabn.MABN2d, mabn.MABN2d)],
)  # fmt: skip
def test_every_norm_is_replaced(norm, cls):
    model = _bn_model()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = mabn.convert_model(model, norm, conv="centralized")
    assert out is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(type(m) is cls for m in model.modules()) == n_bn
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert type(model.fc) is mabn.CenLinear and type(model.conv1) is mabn.CenConv2d


def test_parameters_device_dtype_training_requires_grad_are_kept():
    model = _bn_model(F64)
    params = {name: p for name, p in model.named_parameters()}
    training = {name: m.training for name, m in model.named_modules()}
    mabn.convert_model(model, "mabn", conv="centralized", norm_batch_size=2)
    for name, p in model.named_parameters():
        assert p is params[name], name  # same Parameter objects: an existing optimizer keeps working
    assert {name: m.training for name, m in model.named_modules()} == training
    assert not model.layer1[0].bn1.weight.requires_grad
    assert all(t.dtype == F64 for t in model.state_dict().values() if t.is_floating_point())
    assert model.layer2[0].bn1.norm_batch_size == 2


def test_mabn_running_var_is_seeded_with_the_second_moment():
    model = _bn_model()
    expected = {n: (m.running_var + m.running_mean**2).clone() for n, m in model.named_modules()
                if isinstance(m, nn.BatchNorm2d)}  # fmt: skip
    mabn.convert_model(model, "mabn")
    for name, m in model.named_modules():
        if name in expected:
            assert isinstance(m, mabn.MABN2d) and not m.running_mean.any() and "running_mean" not in m.state_dict()
            assert_close(m.running_var, expected[name], rtol=0, atol=0)
            assert m.num_batches_tracked.item() == 0  # a fresh stream: warm-ups start again
            assert m.momentum == 0.02


def test_carried_hyper_parameters():
    bn = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, affine=False))
    ghost = mabn.convert_model(copy.deepcopy(bn), "bn", norm_batch_size=2)[0]
    assert (ghost.eps, ghost.momentum, ghost.affine, ghost.norm_batch_size) == (1e-3, 0.3, False, 2)
    m = mabn.convert_model(copy.deepcopy(bn), "mabn")[0]
    assert (m.eps, m.momentum, m.affine) == (1e-3, 0.02, False)  # momentum of another form is not carried
    m = mabn.convert_model(copy.deepcopy(bn), "mabn", eps=1e-4, momentum=0.05)[0]
    assert (m.eps, m.momentum) == (1e-4, 0.05)
    # norm_batch_size carries over between layers of this package.
    brn = mabn.convert_model(nn.Sequential(mabn.MABN2d(4, norm_batch_size=2)), "brn")[0]
    assert type(brn) is mabn.BatchRenorm2d and brn.norm_batch_size == 2 and brn.momentum == 0.1


@pytest.mark.parametrize(
    ("norm", "kwargs"),
    [(mabn.GhostBatchNorm2d, {}), ("bn", {"norm_batch_size": 2}), ("brn", {"norm_batch_size": 2}), ("bn", {})],
)  # fmt: skip
def test_bn_model_round_trip_is_exact(norm, kwargs):
    model = _bn_model()
    reference = copy.deepcopy(model)
    types = _types(model)
    back = mabn.revert_model(mabn.convert_model(model, norm, conv="centralized", **kwargs))
    assert _types(back) == types
    _assert_same_state(back, reference)
    assert back.layer1[0].bn1.momentum == 0.1 and back.layer1[0].bn1.eps == 1e-5
    x = torch.randn(2, 3, 8, 8)
    back.eval(), reference.eval()
    assert torch.equal(back(x), reference(x))


def test_bn_model_round_trip_through_mabn():
    model = _bn_model()
    reference = copy.deepcopy(model)
    back = mabn.revert_model(mabn.convert_model(model, "mabn", conv="centralized", norm_batch_size=2))
    assert _types(back) == _types(reference)
    ref_state = reference.state_dict()
    for key, value in back.state_dict().items():
        if key.endswith("running_mean"):
            assert torch.equal(value, torch.zeros_like(value))
        elif key.endswith("running_var"):
            mean = ref_state[key.replace("running_var", "running_mean")]
            assert_close(value, ref_state[key] + mean**2, rtol=0, atol=0)
        elif key.endswith("num_batches_tracked"):
            assert value.item() == 0
        else:  # every parameter, raw conv weights included
            assert torch.equal(value, ref_state[key]), key


def test_centered_eval_maps_are_unchanged_by_conversion():
    model = _bn_model(F64).eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    expected = model(x)
    converted = mabn.convert_model(model, mabn.GhostBatchNorm2d)
    assert_close(converted(x), expected, rtol=1e-12, atol=1e-12)


def test_revert_keeps_the_eval_map_of_mabn():
    model = models.resnet_small(norm_layer="mabn", width=4, norm_batch_size=2).double()
    model(torch.randn(4, 1, 12, 12, dtype=F64))  # one training step: non-trivial running_var
    model.eval()
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    expected = model(x)
    back = mabn.revert_model(model)
    assert not any(isinstance(m, mabn.MABN2d) for m in back.modules())
    assert_close(back(x), expected, rtol=1e-12, atol=1e-12)


def test_revert_with_centralized_weights_keeps_the_function():
    model = models.resnet_small(conv_layer="centralized", width=4).eval()
    x = torch.randn(2, 1, 12, 12)
    expected = model(x)
    raw = mabn.revert_model(copy.deepcopy(model))
    assert not torch.allclose(raw(x), expected)  # raw weights: centralization dropped
    baked = mabn.revert_model(copy.deepcopy(model), centralized_weights=True)
    assert type(baked.conv1) is nn.Conv2d and type(baked.fc) is nn.Linear
    assert_close(baked(x), expected)


def test_same_stream_carries_windows_and_counters():
    layer = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=2, window=4)
    for _ in range(3):
        layer(torch.randn(4, 3, 5, 5)).sum().backward()
    new = mabn.convert_model(nn.Sequential(copy.deepcopy(layer)), "mabn", norm_batch_size=1)[0]
    assert (new.norm_batch_size, new.window, new.warmup_iters) == (1, 4, 2)
    for name in ("running_var", "num_batches_tracked", "forward_window", "forward_steps", "backward_window",
                 "backward_steps", "backward_calls"):  # fmt: skip
        assert torch.equal(getattr(new, name), getattr(layer, name)), name


def test_call_count_carries_over_unless_a_window_must_refill():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    model(torch.randn(4, 2, 3, 3))
    for norm, count in [(mabn.GhostBatchNorm2d, 1), ("brn", 1), ("bn_ema_sma", 0), ("mabn", 0), ("uncentered", 0)]:
        assert mabn.convert_model(copy.deepcopy(model), norm)[1].num_batches_tracked.item() == count, norm


def test_settings_of_the_same_kind_of_layer_carry_over():
    layer = mabn.MABN2d(3, window=4, r_max=2.0, warmup_iters=7, renorm_warmup_iters=9, momentum=0.05)
    new = mabn.convert_model(layer, "mabn", norm_batch_size=2, r_max=3.0)
    assert (new.window, new.r_max, new.warmup_iters, new.renorm_warmup_iters) == (4, 3.0, 7, 9)
    assert (new.momentum, new.norm_batch_size) == (0.05, 2)
    other = mabn.convert_model(copy.deepcopy(layer), "brn")  # another kind: its own defaults
    assert (other.r_max, other.momentum) == (3.0, 0.1)


def test_settings_go_to_the_layers_that_take_them_each_built_once():
    built = []

    class CountingMABN(mabn.MABN2d):
        def __init__(self, *args, **kwargs):
            built.append(sorted(kwargs))
            super().__init__(*args, **kwargs)

    general = mabn.GeneralBatchNorm2d(3, window=4, r_max=2.0, d_max=1.0, eps=1e-3, norm_batch_size=2)
    new = mabn.convert_model(nn.Sequential(general), CountingMABN)[0]
    # MABN's structure: its settings carry over, except d_max, which MABN does not take.
    assert len(built) == 1 and "d_max" not in built[0]
    assert (new.window, new.r_max, new.eps, new.norm_batch_size) == (4, 2.0, 1e-3, 2)
    # A callable of one's own gets the keywords given and nothing else.
    calls = []

    def make(channels, **kwargs):
        calls.append(kwargs)
        return nn.GroupNorm(1, channels, **kwargs)

    mabn.convert_model(nn.Sequential(nn.BatchNorm2d(3, eps=1e-3)), make, eps=1e-4)
    assert calls == [{"eps": 1e-4}]


@pytest.mark.parametrize("dim", [1, 3])
def test_other_dimensionalities(dim):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim]
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dim]
    model = nn.Sequential(conv(2, 4, 3), bn(4), nn.Flatten(), nn.LazyLinear(3) if False else nn.Identity())
    mabn.convert_model(model, "mabn", conv="centralized")
    assert type(model[0]) is mabn.CENTRALIZED[conv]
    assert type(model[1]) is {1: mabn.MABN1d, 3: mabn.MABN3d}[dim]
    mabn.revert_model(model)
    assert type(model[0]) is conv and type(model[1]) is bn


def test_sync_batchnorm():
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.SyncBatchNorm(4))
    assert type(mabn.convert_model(copy.deepcopy(model), "mabn")[1]) is mabn.MABN2d
    converted = mabn.convert_model(model, "mabn", dim=3)[1]
    assert type(converted) is mabn.MABN3d
    converted.eval()
    assert converted(torch.randn(2, 4, 2, 3, 3)).shape == (2, 4, 2, 3, 3)


def test_root_module_and_shared_modules():
    root = mabn.convert_model(nn.BatchNorm2d(4), "mabn")
    assert type(root) is mabn.MABN2d
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    mabn.convert_model(model, "mabn")
    assert type(model[0]) is mabn.MABN2d and model[0] is model[2]


def test_custom_subclasses_of_convs_are_left_alone():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(2, 2, 1), nn.Conv2d(2, 2, 1))
    mabn.convert_model(model, conv="centralized")
    assert type(model[0]) is MyConv and type(model[1]) is mabn.CenConv2d


def test_converted_model_trains():
    model = _bn_model()
    mabn.convert_model(model, "mabn", conv="centralized", norm_batch_size=2)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    assert model.layer1[0].bn1.weight.grad is None  # frozen stays frozen
    assert model.layer1[0].bn2.weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"norm": "batchnorm"}, ValueError, "unknown norm layer 'batchnorm'"),
        ({"conv": "cen"}, ValueError, "conv must be one of"),
        ({"norm": 3}, TypeError, "norm must be a name"),
        ({"norm": "gn", "momentum": 0.1}, TypeError, "momentum"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs, exc, match):
    model = _bn_model()
    reference = copy.deepcopy(model)
    with pytest.raises(exc, match=match):
        mabn.convert_model(model, conv=kwargs.pop("conv", None), **kwargs)
    assert _types(model) == _types(reference)
    _assert_same_state(model, reference)


def test_batchnorm_without_running_stats_is_refused_atomically():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        mabn.convert_model(model, "mabn", conv="centralized")
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm2d]


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mabn.convert_model([nn.BatchNorm2d(3)])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mabn.revert_model(None)


def test_cumulative_momentum_carries_over_only_with_its_count():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.BatchNorm2d(2, momentum=None))
    for _ in range(5):
        bn(torch.randn(8, 2, 3, 3) * 3)
    ghost = mabn.convert_model(copy.deepcopy(bn), "bn", norm_batch_size=2)[0]
    assert ghost.momentum is None and int(ghost.num_batches_tracked) == 5  # the count came along
    # A layer with windows restarts its count: a cumulative average would forget the copied
    # statistics at its first update, so it takes the preset's momentum instead.
    windowed = mabn.convert_model(copy.deepcopy(bn), "bn_ema_sma")[0]
    assert int(windowed.num_batches_tracked) == 0 and windowed.momentum == 0.1
    before = windowed.running_var.clone()
    windowed(torch.randn(8, 2, 3, 3))
    assert (windowed.running_var - before).abs().max() < 0.2 * before.abs().max()
