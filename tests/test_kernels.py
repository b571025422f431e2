"""Every kernel path against a float64 reference, on every device present; operation counts independent of G."""

from __future__ import annotations

import collections

import pytest
import torch
from reference import NaiveNorm
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import mabn
from mabn import kernels
from mabn.kernels import KERNELS, choose_paths, site, use_paths

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances of statistics computed in float32 from inputs of each dtype (relative to the reference).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def _input(n, device, dtype, channels_last=False, offset=100.0):
    """Channels with very different scales around a large mean (the case that breaks naive one-pass formulas)."""
    x = torch.randn(n, 3, 7, 5, dtype=torch.float64) * torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(
        1, 3, 1, 1
    )
    x = (x + offset).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _grouped64(x, groups):
    return x.double().unflatten(0, (groups, x.shape[0] // groups))


MOMENT_CASES = [("native", 1), ("per_sample", 1), ("per_sample", 4), ("native_loop", 4), ("grouped", 1), ("grouped", 4)]


# The per-sample path is taken for contiguous input only (the dispatch never picks it otherwise).
MOMENT_LAYOUTS = [
    pytest.param(
        path, groups, channels_last, id=f"{path}-{groups}-{'channels_last' if channels_last else 'contiguous'}"
    )
    for path, groups in MOMENT_CASES
    for channels_last in (False, True)
    if not (path == "per_sample" and channels_last)
]


@pytest.mark.parametrize(("path", "groups", "channels_last"), MOMENT_LAYOUTS)
def test_moments(device, dtype, path, groups, channels_last):
    x = _input(8, device, dtype, channels_last)
    stat = kernels.stat_dtype(dtype)
    moments = KERNELS["moments"][path](x, groups, stat)
    mean, var = moments[:, 0], moments[:, 1]
    ref = _grouped64(x, groups)
    assert moments.dtype == stat
    assert mean.shape == var.shape == (groups, 3)
    assert_close(mean.double(), ref.mean(dim=(1, 3, 4)), **TOL[dtype])
    # Variance relative to the spread of each channel (the mean is 100x larger than some spreads).
    assert_close(var.double(), ref.var(dim=(1, 3, 4), unbiased=False), rtol=TOL[dtype]["rtol"] * 1e2, atol=1e-6)


SECOND_MOMENT_CASES = [
    ("spatial", 1),
    ("spatial", 4),
    ("native", 1),
    ("native_loop", 4),
    ("grouped", 1),
    ("grouped", 4),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("path", "groups"), SECOND_MOMENT_CASES)
def test_second_moment(device, dtype, path, groups, channels_last):
    x = _input(8, device, dtype, channels_last, offset=1.0)
    got = KERNELS["second_moment"][path](x, groups, kernels.stat_dtype(dtype))
    ref = _grouped64(x, groups).square().mean(dim=(1, 3, 4))
    assert got.shape == (groups, 1, 3) and got.dtype == kernels.stat_dtype(dtype)
    got = got[:, 0]
    assert_close(got.double(), ref, rtol=TOL[dtype]["rtol"] * 10, atol=1e-6)


GRAD_CASES = [("native", 1), ("chunked", 1), ("chunked", 2), ("native_loop", 4), ("grouped", 1), ("grouped", 4)]


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "uncentered"])
@pytest.mark.parametrize(("path", "groups"), GRAD_CASES)
def test_grad_sums(device, dtype, path, groups, centered):
    x = _input(8, device, dtype, offset=0.5)
    dy = torch.randn(x.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    stat = kernels.stat_dtype(dtype)
    mean = torch.randn(groups, 3, dtype=stat, device=device) if centered else None
    invstd = torch.rand(groups, 3, dtype=stat, device=device) + 0.5
    sum_dy, sum_dy_xhat = KERNELS["grad_sums"][path](dy, x, mean, invstd, groups)
    dyg, xg = _grouped64(dy, groups), _grouped64(x, groups)
    center = mean.double().view(groups, 1, 3, 1, 1) if centered else 0.0
    ref_dy = dyg.sum(dim=(1, 3, 4))
    ref_xhat = (dyg * (xg - center)).sum(dim=(1, 3, 4)) * invstd.double()
    tol = dict(rtol=TOL[dtype]["rtol"] * 10, atol=1e-4 if dtype != torch.float64 else 1e-10)
    assert_close(sum_dy.double(), ref_dy, **tol)
    assert_close(sum_dy_xhat.double(), ref_xhat, **tol)


def _path(job, x, groups, **flags):
    return getattr(choose_paths(site(x, groups, **flags)), job)


def test_the_dispatch_picks_each_path_where_it_should():
    big = torch.randn(4, 8, 64, 64)  # 32768 elements per sample: per-sample passes on CPU
    small = torch.randn(4, 8, 4, 4)
    cl = big.contiguous(memory_format=torch.channels_last)
    assert _path("moments", big, 2) == "per_sample" and _path("moments", small, 2) == "per_sample"
    assert _path("moments", cl, 2) == "native_loop" and _path("moments", cl, 1) == "native"
    assert _path("second_moment", big, 2) == "spatial" and _path("second_moment", cl, 1) == "native"
    assert _path("second_moment", cl, 2) == "native_loop"
    assert _path("grad_sums", big, 2) == "chunked" and _path("grad_sums", small, 2) == "native_loop"
    assert _path("grad_sums", small, 1) == "native" and _path("normalize", small, 2) == "grouped"
    assert _path("grad_input", small, 1) == "fused" and _path("grad_input", small, 2) == "two_pass"
    assert _path("grad_input", big, 1) == "two_pass" and _path("grad_input", cl, 1) == "fused"
    large_cl = torch.empty(4, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 2^20 values
    assert _path("normalize", large_cl, 1) == "grouped" and _path("normalize", cl, 1) == "native"
    many = torch.empty(8, 64, 16, 16)  # 8 samples of 16384 values on small maps: per-sample reduction
    assert _path("grad_input", many, 1) == "two_pass" and _path("grad_input", many[:4], 1) == "fused"
    # BatchNorm's own kernels, for the calls that compute BatchNorm (CPU eager for the forward).
    assert _path("normalize", small, 1, native_train=True) == "native_train"
    assert _path("grad_input", small, 1, native_backward=True) == "native"
    assert _path("control", small, 1) == "host"
    with use_paths(cpu_specific=False):
        assert _path("moments", big, 2) == "grouped" and _path("second_moment", cl, 2) == "grouped"
        assert _path("grad_sums", big, 2) == "grouped" and _path("moments", big, 1) == "native"
        assert _path("normalize", small, 1, native_train=True) == "native"  # GPU: statistics, then normalize
        assert _path("grad_input", small, 1, native_backward=True) == "native"
        assert _path("control", small, 1) == "device"
    with use_paths(moments="grouped"):
        assert _path("moments", small, 1) == "grouped"
    with use_paths(normalize="native_train"):  # forced where BatchNorm's kernel does not compute the call
        assert _path("normalize", small, 1) == "native"
    assert _path("moments", small, 1) == "per_sample"  # restored
    with pytest.raises(ValueError, match="unknown kernel path"):
        with use_paths(moments="fast"):
            pass


def test_the_table_has_a_row_for_every_call_and_a_kernel_for_every_path():
    # The last row of every job holds for any call, and every path a row names is implemented.
    from mabn.kernels import RULES, STRATEGIES, Site

    anything = Site(False, False, "other", 3, 6, 10, 5, False, False, False, 4)
    for job, rows in RULES.items():
        assert rows[-1][1](anything), job
        known = set(KERNELS.get(job, {})) | set(STRATEGIES.get(job, ()))
        assert {path for path, _ in rows} <= known, job


# The whole layer under each set of paths, against the naive float64 reference of tests/reference.py.
PATH_SETS = {
    "default": {},
    "generic": dict(cpu_specific=False),
    "per_sample+chunked": dict(moments="per_sample", grad_sums="chunked", grad_input="two_pass"),
    "loops": dict(moments="native_loop", second_moment="native_loop", grad_sums="native_loop"),
    "grouped": dict(
        moments="grouped", second_moment="grouped", grad_sums="grouped", normalize="grouped", grad_input="two_pass"
    ),
}


@pytest.mark.parametrize("paths", list(PATH_SETS), ids=list(PATH_SETS))
@pytest.mark.parametrize("preset", ["mabn", "bn", "brn", "bn_ema_sma"])
@pytest.mark.parametrize("groups", [1, 3])
def test_layer_under_each_path_matches_the_reference(paths, preset, groups):
    config = mabn.PRESETS[preset]
    kw = dict(norm_batch_size=2, window=4, warmup_iters=3, renorm_warmup_iters=5, r_max=1.5, d_max=0.5)
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 3, **kw, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    ref = NaiveNorm(3, **{k: getattr(config, k) for k in ("centered", "forward_stats", "renorm", "backward_stats")},
                    momentum=config.momentum, **kw)  # fmt: skip
    with use_paths(**PATH_SETS[paths]):
        for step in range(8):
            x = (torch.randn(2 * groups, 3, 5, 4, dtype=torch.float64) * (1 + step % 3) + 0.3).requires_grad_()
            dy = torch.randn_like(x)
            y = layer(x)
            y.backward(dy)
            y_ref, saved = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach())
            dx_ref, dgamma_ref, _ = ref.backward(dy, saved, layer.weight.detach())
            assert_close(y, y_ref)
            assert_close(x.grad, dx_ref)
            assert_close(layer.weight.grad, dgamma_ref)
            assert_close(layer.running_var, ref.running_var)
            layer.zero_grad()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_half_precision_layer_matches_float32(half, groups):
    # Half activations, float32 statistics: the same numbers as the float32 layer on the rounded input.
    layer32 = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=1, renorm_warmup_iters=1)
    layer16 = mabn.MABN2d(3, norm_batch_size=2, warmup_iters=1, renorm_warmup_iters=1).to(half)
    assert layer16.running_var.dtype == torch.float32 and layer16.weight.dtype == half
    for _ in range(3):
        x = torch.randn(2 * groups, 3, 6, 6).to(half)
        y16 = layer16(x.requires_grad_())
        y32 = layer32(x.float())
        assert y16.dtype == half
        assert_close(y16.float(), y32.to(half).float(), rtol=1e-2, atol=1e-2)
        y16.float().sum().backward()
    assert_close(layer16.running_var, layer32.running_var, rtol=1e-3, atol=1e-4)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_call(preset: str, groups: int) -> int:
    layer = mabn.GeneralBatchNorm2d.from_preset(preset, 4, norm_batch_size=2, warmup_iters=1, renorm_warmup_iters=1)
    for _ in range(2):  # past the warm-ups
        layer(torch.randn(2 * groups, 4, 5, 5, requires_grad=True)).sum().backward()
    x = torch.randn(2 * groups, 4, 5, 5, requires_grad=True)
    dy = torch.randn_like(x)
    with _CountOps() as mode:
        layer(x).backward(dy)
    return sum(mode.counts.values())


@pytest.mark.parametrize("preset", ["mabn", "bn", "brn", "bn_ema_sma"])
def test_operations_per_call_do_not_grow_with_the_number_of_groups(preset):
    # What a GPU pays per kernel launch: with the CPU-specific paths off, G = 4 and G = 16 run the same ops.
    with use_paths(cpu_specific=False):
        one, four, sixteen = (_ops_per_call(preset, g) for g in (1, 4, 16))
    assert four == sixteen, (one, four, sixteen)
    assert one <= four + 4, (one, four)
    # The composed CPU-specific loops do grow with G (one native call per group): the switch removes them.
    with use_paths(step="composed"):
        loops = _ops_per_call(preset, 16) if preset.startswith("bn") else None
    assert loops is None or loops > sixteen
    # The fused CPU step: one native call per direction, whatever G.
    with use_paths(step="fused"):
        assert _ops_per_call(preset, 1) == _ops_per_call(preset, 16) < one
