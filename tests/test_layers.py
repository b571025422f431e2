"""Behaviour users hit: eval mode, no_grad, accumulation, low precision, layouts, compile, errors."""

import copy
import dataclasses
import doctest
import importlib

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.testing import assert_close

import mabn
from mabn.kernels import use_paths

F64 = torch.float64
LAYERS_2D = [mabn.MABN2d, mabn.GhostBatchNorm2d, mabn.BatchRenorm2d]


def _trained(cls, steps=5, **kwargs):
    layer = cls(4, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    for _ in range(steps):
        layer(torch.randn(4, 4, 3, 3) * 2 + 0.5).sum().backward()
    return layer


@pytest.mark.parametrize("cls", LAYERS_2D)
def test_eval_is_per_channel_affine(cls):
    layer = _trained(cls).eval()
    x = torch.randn(3, 4, 5, 5)
    mean = layer.running_mean if layer.running_mean is not None else torch.zeros(4)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    expected = (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    before = snapshot(layer)
    assert_close(layer(x), expected)
    assert_unchanged(layer, before)  # eval never touches the statistics


def test_mabn_seeds_and_defaults():
    layer = mabn.MABN2d(8)
    assert layer.momentum == 0.02 and layer.window == 16 and layer.r_max == 5.0 and layer.eps == 1e-5
    assert layer.warmup_iters == 100 and layer.renorm_warmup_iters == 1000
    assert (
        torch.equal(layer.running_var, torch.ones(8))
        and not layer.running_mean.any()
        and "running_mean" not in layer.state_dict()
    )
    assert mabn.GhostBatchNorm2d(8).momentum == 0.1
    brn = mabn.BatchRenorm2d(8)
    assert (brn.r_max, brn.d_max, brn.momentum) == (3.0, 5.0, 0.1)


def test_no_grad_training_forward_leaves_backward_window_alone():
    layer = _trained(mabn.MABN2d, norm_batch_size=2, window=4, warmup_iters=2)
    backward_state = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("backward")}
    with torch.no_grad():  # e.g. a teacher network in training mode
        layer(torch.randn(4, 4, 3, 3))
    for k, v in backward_state.items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert layer.num_batches_tracked.item() == 6 and layer.backward_calls.item() == 5


@pytest.mark.parametrize("preset", ["mabn", "bn", "bn_ema_sma"])
def test_gradient_accumulation_over_calls(preset):
    # Two calls of 2 samples stream the same groups, in the same order, as one call of 4 with B = 2.
    kw = dict(
        dataclasses.asdict(mabn.PRESETS[preset]), norm_batch_size=2, window=3, warmup_iters=0, renorm_warmup_iters=10**6
    )
    one = mabn.GeneralBatchNorm2d(3, **kw, dtype=F64)
    two = copy.deepcopy(one)
    for _ in range(3):
        x = torch.randn(4, 3, 4, 4, dtype=F64)
        dy = torch.randn_like(x)
        xa = x.clone().requires_grad_()
        one(xa).backward(dy)
        xb = x.clone().requires_grad_()
        for half in (slice(0, 2), slice(2, 4)):
            two(xb[half]).backward(dy[half])
        assert_close(xa.grad, xb.grad)
    assert_close(one.weight.grad, two.weight.grad)
    assert_close(one.bias.grad, two.bias.grad)
    if hasattr(one, "backward_window"):  # the backward stream saw the same groups in the same order
        assert_close(one.backward_window, two.backward_window)
    if hasattr(one, "forward_window"):
        assert_close(one.forward_window, two.forward_window)


@pytest.mark.parametrize("cls", LAYERS_2D)
def test_bf16_autocast_statistics_in_fp32(cls):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    ref_layer = cls(4, norm_batch_size=2)
    layer = copy.deepcopy(ref_layer)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = layer(h)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.running_var.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    # The statistics are those of the bf16 activations computed in float32.
    y_ref = ref_layer(h.detach().float())
    assert_close(layer.running_var, ref_layer.running_var, rtol=1e-6, atol=1e-6)
    assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_half_input_and_grads():
    layer = mabn.MABN2d(4, norm_batch_size=2, warmup_iters=0)
    x = (torch.randn(4, 4, 5, 5) * 100).half().requires_grad_()  # x^2 overflows fp16, not fp32
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and x.grad.dtype == torch.float16
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize("cls", LAYERS_2D + [mabn.MABN3d])
def test_channels_last_matches_contiguous(cls):
    dims = 5 if cls is mabn.MABN3d else 4
    fmt = torch.channels_last_3d if dims == 5 else torch.channels_last
    a = _trained(cls, steps=0, norm_batch_size=2)
    b = copy.deepcopy(a)
    shape = (4, 4, 3, 5, 5) if dims == 5 else (4, 4, 5, 5)
    for _ in range(3):
        x = torch.randn(*shape)
        dy = torch.randn(*shape)
        xa = x.clone().requires_grad_()
        xb = x.contiguous(memory_format=fmt).requires_grad_()
        ya, yb = a(xa), b(xb)
        assert yb.is_contiguous(memory_format=fmt)
        ya.backward(dy)
        yb.backward(dy.contiguous(memory_format=fmt))
        assert_close(ya, yb)
        assert_close(xa.grad, xb.grad)
    for k, v in a.state_dict().items():
        assert_close(b.state_dict()[k], v)


def test_norm_batch_size_one_uncentered_and_centered():
    layer = mabn.MABN1d(5, norm_batch_size=1, warmup_iters=0)
    x = torch.randn(3, 5, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # Centered with one value per channel and group has no variance: a clear error.
    ghost = mabn.GhostBatchNorm1d(5, norm_batch_size=1)
    before = snapshot(ghost)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ghost(torch.randn(3, 5))
    assert_unchanged(ghost, before)
    # ... but with spatial positions a group of one sample is fine.
    mabn.GhostBatchNorm1d(5, norm_batch_size=1)(torch.randn(3, 5, 4))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_no_host_read_on_the_device_path(monkeypatch, groups, channels_last):
    # What every device but the CPU runs (and torch.compile traces): no value is read on the host.
    # (On the CPU the counters are read on the host, a memory read there, not a synchronization.)
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, __original=original, __name=name, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with use_paths(cpu_specific=False):
        for preset in ("mabn", "brn", "bn", "bn_ema_sma"):
            kw = dict(norm_batch_size=4 // groups, warmup_iters=2, renorm_warmup_iters=2)
            layer = mabn.GeneralBatchNorm2d.from_preset(preset, 4, **kw)
            for _ in range(4):
                x = torch.randn(4, 4, 3, 3).contiguous(memory_format=fmt).requires_grad_()
                layer(x).sum().backward()
    assert calls == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_norm",
    [
        lambda: mabn.MABN2d(8, norm_batch_size=2, window=3, warmup_iters=2, renorm_warmup_iters=3),
        lambda: mabn.MABN2d(8, window=3, warmup_iters=2, renorm_warmup_iters=3),
        lambda: mabn.GhostBatchNorm2d(8, norm_batch_size=2),
    ],
    ids=["mabn-groups", "mabn-whole-batch", "ghost-bn"],
)
def test_torch_compile_fullgraph_matches_eager(make_norm):
    torch._dynamo.reset()

    def block():
        return nn.Sequential(mabn.CenConv2d(3, 8, 3, padding=1, bias=False), make_norm(), nn.ReLU())

    eager = block()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for _ in range(6):
        x = torch.randn(4, 3, 6, 6)
        eager.zero_grad()
        compiled_module.zero_grad()
        ye, yc = eager(x), compiled(x)
        ye.square().sum().backward()
        yc.square().sum().backward()
        assert_close(ye, yc, rtol=1e-5, atol=1e-5)
        assert_close(eager[0].weight.grad, compiled_module[0].weight.grad, rtol=1e-4, atol=1e-4)
    for k, v in eager.state_dict().items():
        assert_close(compiled_module.state_dict()[k], v, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mabn", "brn", "bn"])
def test_torch_compile_compiles_once_across_the_warm_ups_and_sizes(preset):
    # No guard on the layer's counters, caches or settings: the warm-ups, a full window and other input
    # sizes (dynamic) reuse the first graph. (Another number of groups is another table: a new graph.)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 8, window=2, warmup_iters=2, renorm_warmup_iters=3)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for step in range(6):
        x = torch.randn(2 + step % 3, 8, 5 + step % 2, 7, requires_grad=True)
        compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        ({"window": 0}, ValueError, "window must be >= 1, got 0"),
        ({"window": 2.5}, TypeError, "window must be an int"),
        ({"r_max": 0.5}, ValueError, "r_max must be >= 1, got 0.5"),
        ({"momentum": 1.5}, ValueError, "momentum must be in [0, 1], got 1.5"),
        ({"momentum": -0.1}, ValueError, "momentum must be in [0, 1], got -0.1"),
        ({"eps": 0.0}, ValueError, "eps must be > 0, got 0.0"),
        ({"eps": -1e-5}, ValueError, "eps must be > 0"),
        ({"norm_batch_size": 0}, ValueError, "norm_batch_size must be >= 1, got 0"),
        ({"warmup_iters": -1}, ValueError, "warmup_iters must be >= 0, got -1"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a float"),
    ],
)
def test_invalid_constructor_values(kwargs, exc, fragment):
    with pytest.raises(exc) as info:
        mabn.MABN2d(4, **kwargs)
    assert fragment in str(info.value)


def test_invalid_num_features():
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        mabn.MABN2d(0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        mabn.GhostBatchNorm2d(4.0)


def test_general_rejects_unknown_modes():
    with pytest.raises(ValueError, match="forward_stats must be one of"):
        mabn.GeneralBatchNorm2d(4, forward_stats="ema")
    with pytest.raises(ValueError, match="unknown preset 'foo'; known presets: bn, bn_ema_sma, brn"):
        mabn.GeneralBatchNorm2d.from_preset("foo", 4)


def test_setting_invalid_attribute_leaves_layer_unchanged():
    layer = mabn.MABN2d(4)
    with pytest.raises(ValueError, match="momentum must be in"):
        layer.momentum = 2.0
    assert layer.momentum == 0.02
    layer.momentum = 0.05
    assert layer.config.momentum == 0.05
    with pytest.raises(AttributeError, match="window"):
        layer.window = 8


@pytest.mark.parametrize("cls", LAYERS_2D + [mabn.MABN1d])
@pytest.mark.parametrize(
    "make_input,exc,fragment",
    [
        (lambda c: torch.randn(4, c), ValueError, "expects 4-D input (N, C, H, W), got 2-D input"),
        (lambda c: torch.randn(4, c + 1, 3, 3), ValueError, "expected 4 channels (num_features), got input with C=5"),
        (lambda c: torch.randn(3, c, 3, 3), ValueError, "N=3 is not divisible by norm_batch_size B=2"),
        (lambda c: torch.randn(0, c, 3, 3), ValueError, "empty batch (N=0)"),
        (lambda c: torch.randint(0, 3, (4, c, 3, 3)), TypeError, "floating point"),
    ],
)
def test_bad_input_changes_nothing(cls, make_input, exc, fragment):
    layer = _trained(cls, steps=0, norm_batch_size=2) if cls is not mabn.MABN1d else mabn.MABN1d(4, norm_batch_size=2)
    x = make_input(4)
    if cls is mabn.MABN1d:
        x = x.flatten(2) if x.dim() == 4 else x.unsqueeze(-1).unsqueeze(-1)  # 3-D is valid for 1-d, 5-D is not
    before = snapshot(layer)
    params = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(exc) as info:
        layer(x)
    if not (cls is mabn.MABN1d and fragment.startswith("expects")):
        assert fragment in str(info.value)
    assert_unchanged(layer, before)
    assert all(torch.equal(a, b) for a, b in zip(params, layer.parameters()))


@pytest.mark.parametrize("norm_batch_size", [None, 2])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_input_dtype_other_than_the_layer_dtype(input_dtype, norm_batch_size):
    layer = mabn.MABN2d(3, dtype=F64, norm_batch_size=norm_batch_size)
    x = torch.randn(4, 3, 5, 5).to(input_dtype).requires_grad_()
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == input_dtype and x.grad.dtype == input_dtype
    assert layer.num_batches_tracked.item() == 1 and layer.running_var.dtype == F64


@pytest.mark.parametrize("cls", LAYERS_2D)
def test_non_finite_input_skips_the_statistics_update(cls):
    layer = _trained(cls, steps=3, norm_batch_size=2)
    before = snapshot(layer)
    x = torch.randn(4, 4, 3, 3)
    x[1, 2, 0, 0] = float("inf")
    x.requires_grad_()
    y = layer(x)
    assert not torch.isfinite(y).all()  # the output is what BatchNorm would give
    y.sum().backward()
    assert_unchanged(layer, before)  # but no buffer (window, counter, EMA) moved
    layer(torch.randn(4, 4, 3, 3)).sum().backward()
    assert layer.num_batches_tracked.item() == before.state["num_batches_tracked"].item() + 1


# --------------------------------------------------------------------------------- module API


def test_repr_reset_and_version():
    layer = _trained(mabn.MABN2d, norm_batch_size=2)
    text = repr(layer)
    assert text.startswith("MABN2d(4, eps=1e-05, momentum=0.02") and "window=16" in text and "r_max=5.0" in text
    assert "GhostBatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, norm_batch_size=None)" == repr(
        mabn.GhostBatchNorm2d(4)
    )
    assert mabn.MABN2d._version == 2
    assert layer.state_dict()._metadata[""]["version"] == 2
    layer.reset_running_stats()
    assert torch.equal(layer.running_var, torch.ones(4)) and layer.num_batches_tracked.item() == 0
    assert not layer.forward_window.any() and layer.backward_calls.item() == 0
    assert not torch.equal(layer.weight, torch.ones(4))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))


def test_affine_false_and_device_dtype():
    layer = mabn.MABN2d(3, affine=False, dtype=F64, device="cpu")
    assert layer.weight is None and layer.running_var.dtype == F64
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("momentum", [0.3, None])
def test_ghost_bn_running_statistics_follow_torch_batchnorm(momentum):
    torch.manual_seed(0)
    ours, ref = mabn.GhostBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    for step in range(4):
        x = torch.randn(8, 3, 4, 4) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 4 and ours.momentum == momentum


def test_momentum_none_is_the_cumulative_average_of_the_second_moment():
    layer = mabn.MABN2d(2, momentum=None, warmup_iters=10, renorm_warmup_iters=10)
    xs = [torch.randn(4, 2, 3, 3) * (k + 1) for k in range(3)]
    for x in xs:
        layer(x)
    expected = torch.stack([x.square().mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(layer.running_var, expected)
    assert "momentum=None" in repr(layer)
    back = mabn.revert_model(nn.Sequential(mabn.GhostBatchNorm2d(2, momentum=None)))
    assert back[0].momentum is None


def test_ghost_bn_loads_torch_batchnorm_checkpoint_both_ways():
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(8, 4, 3, 3))
    ghost = mabn.GhostBatchNorm2d(4)
    ghost.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ghost.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize(
    "module",
    [
        "modules",
        "conv",
        "config",
        "functional",
        "factory",
        "models.resnet",
        "models.build",
        "convert",
        "fold",
        "export",
        "monitor",
        "recompute",
        "kernels",
        "frozen",
        "adapters",
        "recalibrate",
        "models.segmentation",
        "conv",
        "_stream",
    ],
)
def test_docstring_examples_run(module):
    module = importlib.import_module(f"mabn.{module}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
