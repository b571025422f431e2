"""fold and to_batchnorm: equivalence, what folds and what stays, copies, torch fusion tools."""

import copy
import importlib
import logging

import pytest
import torch
from conftest import assert_unchanged, calibrate, rel_error, snapshot
from torch import nn
from torch.testing import assert_close

import mabn
from mabn import models

F64 = torch.float64
fold_module = importlib.import_module("mabn.fold")  # the module (mabn.fold is the function)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _assert_plain(model: nn.Module) -> None:
    """Nothing of this package and no foldable norm left (only the norms that cannot fold)."""
    for name, m in model.named_modules():
        assert not type(m).__module__.startswith("mabn.modules"), name
        assert not type(m).__module__.startswith("mabn.conv"), name
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), name


SIZE = 96  # large enough that the last stage has 3x3 positions and its statistics are well estimated


@pytest.fixture(scope="module")
def resnet50_wc():
    """ResNet-50 with MABN and weight centralization in float64, non-trivial affine and running statistics."""
    torch.manual_seed(0)
    model = models.resnet50(num_classes=10, norm_layer="mabn", conv_layer="centralized").double()
    return calibrate(model, torch.randn(8, 3, SIZE, SIZE, dtype=F64))


def _check_resnet50_folded(folded, report):
    assert report.traced and report.unfolded == [] and len(report.folded) == 53
    _assert_plain(folded)
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == 53
    assert all(type(m) is nn.Conv2d and m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))


def test_resnet50_folds_exactly_in_float64(resnet50_wc):
    snap = snapshot(resnet50_wc)
    folded, report = mabn.fold(resnet50_wc, return_report=True)
    assert_unchanged(resnet50_wc, snap)
    _check_resnet50_folded(folded, report)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=F64)
    with torch.no_grad():
        expected, got = resnet50_wc(x), folded(x)
    assert expected.abs().max() > 1e-3
    assert rel_error(got, expected) <= 1e-10


def test_resnet50_folds_in_float32(resnet50_wc):
    # Centralized kernels on non-negative (post-ReLU) inputs cancel their common mode, so float32
    # rounding is amplified: the float32 model itself is a few 1e-5 from the exact (float64) result.
    model = copy.deepcopy(resnet50_wc).float()
    folded, report = mabn.fold(model, return_report=True)
    _check_resnet50_folded(folded, report)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=F64)
    with torch.no_grad():
        exact, unfolded, got = resnet50_wc(x), model(x.float()), folded(x.float())
    assert rel_error(got, unfolded) <= 1e-4
    assert rel_error(got.double(), exact) <= 1e-4


@pytest.mark.parametrize("conv", [None, "centralized"])
@pytest.mark.parametrize(
    "norm", ["bn", mabn.GhostBatchNorm2d, "brn", "mabn", "uncentered", "uncentered_ema", "bn_ema_sma"]
)
def test_every_member_of_the_family_folds(norm, conv):
    model = models.resnet_small(norm_layer=norm, conv_layer=conv, width=8, in_channels=3).double()
    calibrate(model, torch.randn(4, 3, 16, 16, dtype=F64))
    folded, report = mabn.fold(model, return_report=True)
    assert len(report.folded) == 9 and report.unfolded == []
    _assert_plain(folded)
    x = torch.randn(3, 3, 16, 16, dtype=F64)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Sequential(mabn.CenConv1d(3, 4, 3, bias=True), mabn.MABN1d(4), nn.ReLU()), (4, 3, 9)),
        (lambda: nn.Sequential(nn.Conv3d(3, 4, 3, stride=2, bias=True), nn.BatchNorm3d(4)), (4, 3, 5, 5, 5)),
        (lambda: nn.Sequential(mabn.CenConv3d(3, 4, 1), mabn.GhostBatchNorm3d(4)), (4, 3, 3, 3, 3)),
        (
            lambda: nn.Sequential(
                nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect"), mabn.BatchRenorm2d(6)
            ),
            (4, 4, 7, 7),
        ),
        (lambda: nn.Sequential(mabn.CenConv2d(4, 6, 3, groups=2, stride=2), mabn.MABN2d(6)), (4, 4, 7, 7)),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), (4, 3, 7, 7)),
        (lambda: nn.Sequential(nn.Flatten(), mabn.CenLinear(12, 5), mabn.MABN1d(5)), (4, 3, 2, 2)),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)), (4, 3, 2, 2)),
    ],
)
def test_layers_of_every_kind(make, shape):
    model = make().double()
    x = torch.randn(shape, dtype=F64)
    calibrate(model, x)
    # example_input: Linear + 1-D norm folds only when the shapes prove it equivalent.
    folded, report = mabn.fold(model, example_input=x, return_report=True)
    assert len(report.folded) == 1 and report.unfolded == []
    _assert_plain(folded)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


def test_refuses_training_mode():
    model = models.resnet_small()
    with pytest.raises(ValueError, match="evaluation mode"):
        mabn.fold(model)
    model.eval()
    model.layer2[0].bn1.train()
    with pytest.raises(ValueError, match=r"in training mode: layer2\.0\.bn1"):
        mabn.fold(model)
    with pytest.raises(TypeError, match="nn.Module"):
        mabn.fold("model")


def test_result_is_an_independent_copy():
    model = calibrate(models.resnet_small(norm_layer="mabn", conv_layer="centralized"), torch.randn(4, 1, 12, 12))
    folded = mabn.fold(model)
    model_ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not model_ptrs & {p.data_ptr() for p in folded.parameters()}
    assert type(folded) is models.ResNet and not folded.training


@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_norms_that_cannot_fold_are_reported(norm, caplog):
    model = models.resnet_small(norm_layer=norm, conv_layer="centralized", width=8).eval()
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [] and len(report.unfolded) == 9
    assert all("cannot fold" in reason for _, _, reason in report.unfolded)
    assert {name for name, _, _ in report.unfolded} >= {"bn1", "layer1.0.bn1", "layer3.0.downsample.1"}
    _assert_plain(folded)  # the centralization is baked in even so
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-5
    with caplog.at_level(logging.WARNING, logger="mabn.fold"):
        mabn.fold(model)
    assert "9 norm layers could not fold" in caplog.text and "layer1.0.bn1" in caplog.text


def test_norm_not_after_a_conv_stays_as_batchnorm():
    model = nn.Sequential(mabn.MABN2d(3), nn.Conv2d(3, 4, 1), mabn.MABN2d(4), nn.ReLU(), mabn.MABN2d(4)).double()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("1", "2")]
    assert [(name, cls) for name, cls, _ in report.unfolded] == [("0", "BatchNorm2d"), ("4", "BatchNorm2d")]
    assert "not preceded by a convolution" in report.unfolded[0][2]
    assert [type(m) for m in folded] == [nn.BatchNorm2d, nn.Conv2d, nn.Identity, nn.ReLU, nn.BatchNorm2d]
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


class _ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is needed unnormalized too


class _ReadsNormWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), mabn.MABN2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)


def _shared_conv():
    conv = nn.Conv2d(3, 3, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU(), conv, nn.BatchNorm2d(3))


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_ReadTwice, "output is also read elsewhere"),
        (_ReadsNormWeight, "reads its or the norm's parameters directly"),
        (_shared_conv, "shared or called more than once"),
    ],
)
def test_unsafe_pairs_are_not_folded(make, why):
    model = make().double()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [] and report.unfolded
    assert all(why in reason for _, _, reason in report.unfolded)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(mabn.CenConv2d(3, 8, 3, padding=1), mabn.MABN2d(8), nn.ReLU())
        self.block = models.BasicBlock(8, 8, 1, None, lambda c: mabn.MABN2d(c), mabn.CenConv2d)
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # data flow unknown without a trace

    def forward(self, x):
        x = self.block(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.bn(self.conv(x))
        return -x


def test_untraceable_model_falls_back_to_the_structure():
    model = _Untraceable().double()
    calibrate(model, torch.randn(4, 3, 6, 6, dtype=F64).abs())
    folded, report = mabn.fold(model, return_report=True)
    assert not report.traced and report.trace_error
    assert sorted(report.folded) == [("block.conv1", "block.bn1"), ("block.conv2", "block.bn2"), ("stem.0", "stem.1")]
    assert [name for name, _, _ in report.unfolded] == ["bn"]
    for x in (torch.randn(2, 3, 6, 6, dtype=F64).abs(), -torch.randn(2, 3, 6, 6, dtype=F64).abs() * 100):
        with torch.no_grad():
            assert rel_error(folded(x), model(x)) <= 1e-12


class _ConvBlock(nn.Module):
    """Neither an nn.Sequential nor a block of mabn.models: its pairs are known only from its trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = (
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
        )

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn2(self.conv2(y)) + y


class _ListInput(nn.Module):
    """A detection-style model: takes a list (untraceable), its parts trace."""

    def __init__(self):
        super().__init__()
        self.body = _ConvBlock()

    def forward(self, images):
        return [self.body(x[None])[0] for x in images]


def test_an_untraceable_model_is_searched_part_by_part():
    model = _ListInput().double()
    calibrate(model.body, torch.randn(4, 3, 5, 5, dtype=F64))
    model.eval()
    folded, report = mabn.fold(model, return_report=True)
    assert not report.traced and "Proxy" in report.trace_error
    assert sorted(report.folded) == [("body.conv", "body.bn"), ("body.conv2", "body.bn2")]
    images = [torch.randn(3, 5, 5, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        for got, expected in zip(folded(images), model(images)):
            assert rel_error(got, expected) <= 1e-12


def test_model_that_is_a_single_norm():
    layer = mabn.MABN2d(3).eval()
    folded, report = mabn.fold(layer, return_report=True)
    assert type(folded) is nn.BatchNorm2d and report.unfolded[0][:2] == ("", "BatchNorm2d")
    assert type(layer) is mabn.MABN2d


def test_to_batchnorm_rewrites_with_the_same_outputs():
    model = models.resnet_small(norm_layer="mabn", conv_layer="centralized", width=8).double()
    calibrate(model, torch.randn(4, 1, 12, 12, dtype=F64))
    snap = snapshot(model)
    plain = mabn.to_batchnorm(model)
    assert_unchanged(model, snap)
    assert not any(type(m).__module__.startswith("mabn.") for m in plain.modules() if m is not plain and
                   not isinstance(m, (models.BasicBlock, models.ResNet)))  # fmt: skip
    assert type(plain.bn1) is nn.BatchNorm2d and torch.equal(plain.bn1.running_mean, torch.zeros(8, dtype=F64))
    assert torch.equal(plain.bn1.running_var, model.bn1.running_var)
    assert_close(plain.conv1.weight.mean(dim=(1, 2, 3)), torch.zeros(8, dtype=F64), atol=1e-15, rtol=0)
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    with torch.no_grad():
        assert rel_error(plain(x), model(x)) <= 1e-12
    with pytest.raises(ValueError, match="to_batchnorm needs a model in evaluation mode"):
        mabn.to_batchnorm(model.train())


@pytest.mark.parametrize("norm", [mabn.MABN2d, mabn.GhostBatchNorm2d, mabn.BatchRenorm2d])
def test_fuse_conv_bn_eval_applies_after_to_batchnorm(norm):
    model = nn.Sequential(mabn.CenConv2d(3, 6, 3, bias=True), norm(6)).double()
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    calibrate(model, x)
    plain = mabn.to_batchnorm(model)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(plain[0], plain[1])
    with torch.no_grad():
        assert rel_error(fused(x), model(x)) <= 1e-12


def test_quantization_fuse_modules_applies_after_to_batchnorm():
    from torch.ao.quantization import fuse_modules

    model = models.resnet_small(norm_layer="mabn", conv_layer="centralized", width=8, depth=2)
    calibrate(model, torch.randn(4, 1, 12, 12))
    plain = mabn.to_batchnorm(model)
    groups = [["conv1", "bn1", "relu"]]
    for name, m in plain.named_modules():
        if isinstance(m, models.BasicBlock):
            groups += [[f"{name}.conv1", f"{name}.bn1"], [f"{name}.conv2", f"{name}.bn2"]]
            if m.downsample is not None:
                groups.append([f"{name}.downsample.0", f"{name}.downsample.1"])
    fused = fuse_modules(plain, groups)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert type(fused.conv1).__name__ == "ConvReLU2d"
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert rel_error(fused(x), model(x)) <= 1e-5


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    ("dim", "kwargs"),
    [
        (1, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
        (2, dict(kernel_size=3, stride=2, padding=1, output_padding=1, dilation=2)),
        (2, dict(kernel_size=(2, 3), stride=(2, 3), padding=(0, 1), output_padding=(1, 2), bias=False)),
        (3, dict(kernel_size=2, stride=2, dilation=2, output_padding=1)),
    ],
)
@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_transposed_convolutions_fold(dim, kwargs, groups, norm):
    tconv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    norm_layer = mabn.create_norm_layer(norm, 6, dim=dim)
    model = nn.Sequential(tconv(4, 6, groups=groups, **kwargs), norm_layer, nn.ReLU()).double()
    x = torch.randn(4, 4, *[5, 4, 3][:dim], dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0", "1")] and report.unfolded == []
    assert type(folded[0]) is tconv and folded[0].bias is not None and type(folded[1]) is nn.Identity
    assert (folded[0].groups, folded[0].output_padding, folded[0].dilation) == (
        groups, model[0].output_padding, model[0].dilation,
    )  # fmt: skip
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1e-3
        assert rel_error(folded(x), expected) <= 1e-12


def test_grouped_transposed_convolution_scales_each_output_channel():
    # Scale 1, 2, 3, 4 per output channel: each must land on its own column of its group's rows.
    tconv = nn.ConvTranspose2d(4, 4, 1, groups=2, bias=False).double()
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.arange(1.0, 5.0, dtype=F64))
        bn.running_var.fill_(1 - bn.eps)
    folded = mabn.fold(nn.Sequential(tconv, bn).eval())
    w, got = tconv.weight, folded[0].weight  # (in=4, out/groups=2, 1, 1)
    assert_close(got[:2, 0], w[:2, 0] * 1)
    assert_close(got[:2, 1], w[:2, 1] * 2)
    assert_close(got[2:, 0], w[2:, 0] * 3)
    assert_close(got[2:, 1], w[2:, 1] * 4)


def _linear_norm(norm):
    # out_features == C: the old folding applied the norm's channel scale to the last dim instead.
    return nn.Sequential(nn.Linear(6, 6), norm(6), nn.ReLU()).double()


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, mabn.MABN1d])
def test_linear_then_1d_norm_on_3d_input_is_not_folded(norm):
    model = _linear_norm(norm)
    x = torch.randn(4, 6, 6, dtype=F64)  # (N, C, L)
    calibrate(model, x)
    with torch.no_grad():
        expected = model(x)
    for example in (None, x):
        folded, report = mabn.fold(model, example_input=example, return_report=True)
        assert report.folded == []
        [(name, cls, reason)] = report.unfolded
        assert (name, cls) == ("1", "BatchNorm1d")
        if example is None:
            assert "pass example_input" in reason
        else:
            assert "3-D input" in reason and "cannot fold" in reason
        with torch.no_grad():
            assert rel_error(folded(x), expected) <= 1e-12


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, mabn.MABN1d])
def test_linear_then_1d_norm_on_2d_input_folds_with_example_input(norm):
    model = _linear_norm(norm)
    x = torch.randn(8, 6, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, example_input=x, return_report=True)
    assert report.folded == [("0", "1")] and report.unfolded == []
    assert type(folded[0]) is nn.Linear and type(folded[1]) is nn.Identity
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12
    # A tuple of positional inputs works too; the caller's model is never run in training mode.
    assert mabn.fold(model, example_input=(x,), return_report=True)[1].folded == [("0", "1")]
    with pytest.raises(TypeError, match="example_input must be a Tensor or a tuple.*got dict"):
        mabn.fold(model, example_input={"x": x})


class _UntraceableHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(6, 6), mabn.MABN1d(6))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the structural fallback finds the Sequential pair
            return self.head(x)
        return -x


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 6)])
def test_linear_pairs_are_checked_in_the_fallback_too(shape):
    model = _UntraceableHead().double()
    x = torch.randn(shape, dtype=F64).abs()
    calibrate(model, x)
    without = mabn.fold(model, return_report=True)[1]
    assert not without.traced and without.folded == [] and "pass example_input" in without.unfolded[0][2]
    folded, report = mabn.fold(model, example_input=x, return_report=True)
    assert report.folded == ([("head.0", "head.1")] if len(shape) == 2 else [])
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


# ---- convolution subclasses: video ResNets, timm's same-padding and mixed convolutions, user classes ----


def _assert_same_function(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 1e-3
    assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def _trained_mabn(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    """``model`` converted to MABN and trained a few SGD steps (statistics and affine parameters move), in eval mode."""
    model = mabn.convert_model(model, "mabn", norm_batch_size=2, momentum=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(shape, generator=generator) * 2 + 0.5
        loss = model(x).logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(
    ("builder", "conv_class", "norms"),
    [
        pytest.param("r3d_18", "Conv3DSimple", 20, marks=pytest.mark.slow),
        ("mc3_18", "Conv3DNoTemporal", 20),
        pytest.param("r2plus1d_18", "Conv3d", 37, marks=pytest.mark.slow),
    ],
)
def test_video_resnets_fold_every_batchnorm3d(builder, conv_class, norms):
    import torchvision

    torch.manual_seed(0)
    original = torchvision.models.get_model(builder, weights=None, num_classes=4)
    assert sum(type(m) is nn.BatchNorm3d for m in original.modules()) == norms
    model = _trained_mabn(original, (4, 3, 4, 24, 24)).double()
    stats = torch.cat([m.running_var for m in model.modules() if isinstance(m, mabn.StreamNorm)])
    assert (stats - 1).abs().max() > 0.05  # the statistics moved: the fold has something to carry
    folded, report = mabn.fold(model, return_report=True)
    assert report.traced and len(report.folded) == norms and report.unfolded == []
    _assert_plain(folded)
    # torchvision's classes stay, with the fold's bias, and no norm is left.
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv3d)]
    assert any(type(m).__name__ == conv_class for m in convs)
    assert [type(m).__name__ for m in convs] == [type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert sum(m.bias is not None for m in convs) == norms
    x = torch.randn(2, 3, 4, 24, 24, dtype=F64)
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))


TIMM_NORMS = {"tf_efficientnet_lite0": 49, "tf_mobilenetv3_small_100": 34, "mixnet_s": 49, "tf_mixnet_s": 49}


@pytest.mark.parametrize(
    ("name", "conv_class"),
    [
        ("tf_efficientnet_lite0", "Conv2dSame"),
        ("tf_mobilenetv3_small_100", "Conv2dSame"),
        ("mixnet_s", "MixedConv2d"),
        ("tf_mixnet_s", "MixedConv2d"),
    ],
)
def test_timm_same_padding_and_mixed_convolutions_fold(name, conv_class):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).double()
    calibrate(model, torch.randn(4, 3, 32, 32, dtype=F64))
    model = mabn.convert_model(model, "mabn", norm_batch_size=2, preserve="function")
    kept = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("Conv2dSame", "MixedConv2d")]
    assert conv_class in kept
    folded, report = mabn.fold(model, return_report=True)
    # Every norm of these models directly follows a convolution, and every one folds.
    assert report.traced and report.unfolded == [] and len(report.folded) == TIMM_NORMS[name]
    _assert_plain(folded)
    assert [type(m).__name__ for m in folded.modules() if type(m).__name__ in ("Conv2dSame", "MixedConv2d")] == kept
    for size in (32, 33):  # "same" padding splits an even and an odd excess differently
        x = torch.randn(2, 3, size, size, dtype=F64)
        with torch.no_grad():
            _assert_same_function(folded(x), model(x))


def test_mixed_convolution_folds_each_split_with_its_own_channels():
    from timm.layers import MixedConv2d

    # Splits of 4 and 3 output channels (kernels 3 and 5): the norm's channel c must go to the split holding c.
    mixed = MixedConv2d(6, 7, kernel_size=[3, 5], padding="same")
    model = nn.Sequential(mixed, nn.BatchNorm2d(7)).double()
    calibrate(model, torch.randn(4, 6, 9, 9, dtype=F64))
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0", "1")] and type(folded[0]) is MixedConv2d and type(folded[1]) is nn.Identity
    scale = model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
    assert_close(folded[0]["0"].weight, mixed["0"].weight * scale[:4].view(-1, 1, 1, 1))
    assert_close(folded[0]["1"].weight, mixed["1"].weight * scale[4:].view(-1, 1, 1, 1))
    x = torch.randn(2, 6, 8, 9, dtype=F64)
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))


class _PlainSubclass(nn.Conv2d):
    """Inherits torch's forward: folds without a check."""


class _PadsFirst(nn.Conv2d):
    """A forward of its own that is a convolution of a padded input: folds, checked."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (2, 0, 1, 0)))


class _AddsOne(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class _Doubles(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _NeedsTwoInputs(nn.Conv2d):
    def forward(self, x, gate):
        return super().forward(x) * gate


class _GatedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = _NeedsTwoInputs(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x, x.mean()))


def _conv_bn(conv_class):
    return nn.Sequential(conv_class(3, 4, 3, stride=2, bias=True), mabn.MABN2d(4), nn.ReLU())


@pytest.mark.parametrize(("conv_class", "checked"), [(_PlainSubclass, False), (_PadsFirst, True)])
def test_subclass_whose_forward_is_a_convolution_folds_and_keeps_its_class(conv_class, checked, monkeypatch):
    calls = []
    check = fold_module._fold_check
    monkeypatch.setattr(fold_module, "_fold_check", lambda *args: calls.append(args) or check(*args))
    model = _conv_bn(conv_class).double()
    x = torch.randn(4, 3, 9, 8, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0", "1")] and report.unfolded == []
    assert type(folded[0]) is conv_class and type(folded[1]) is nn.Identity
    assert len(calls) == int(checked)
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))


@pytest.mark.parametrize(
    ("make", "conv", "expected"),
    [
        (lambda: _conv_bn(_AddsOne), "0 (_AddsOne)", "whose forward is not a plain convolution of its input"),
        (lambda: _conv_bn(_Doubles), "0 (_Doubles)", "whose forward is not a plain convolution of its input"),
        (_GatedBlock, "conv (_NeedsTwoInputs)", "whose forward could not be checked"),
    ],
)
def test_subclass_whose_forward_is_not_a_convolution_stays_with_its_reason(make, conv, expected):
    model = make().double()
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    calibrate(model, x)
    snap = snapshot(model)
    folded, report = mabn.fold(model, return_report=True)
    assert_unchanged(model, snap)  # the check ran on copies
    assert report.folded == []
    [(name, cls, reason)] = report.unfolded
    assert cls == "BatchNorm2d" and expected in reason and conv in reason
    assert type(folded.get_submodule(name)) is nn.BatchNorm2d
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


class _Crops(nn.ConvTranspose2d):
    """A transposed convolution whose output is cropped: per channel linear, so it folds (checked)."""

    def forward(self, x):
        return super().forward(x)[..., 1:-1, 1:-1]


class _PlainTransposed(nn.ConvTranspose3d):
    pass


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (lambda: _Crops(4, 6, 3, stride=2, groups=2, output_padding=1), (4, 4, 5, 6)),
        (lambda: _PlainTransposed(4, 6, 2, stride=2, groups=2), (4, 4, 3, 2, 3)),
    ],
)
def test_transposed_convolution_subclasses_fold(conv, shape):
    layer = conv()
    model = nn.Sequential(layer, mabn.create_norm_layer("mabn", 6, dim=len(shape) - 2)).double()
    x = torch.randn(shape, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0", "1")] and report.unfolded == [] and type(folded[0]) is type(layer)
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))


class _ReversedSplit(nn.ModuleDict):
    """Looks like a channel-split convolution but concatenates its parts in reverse: the check must catch it."""

    def __init__(self):
        super().__init__({"0": nn.Conv2d(3, 4, 3, padding=1), "1": nn.Conv2d(3, 2, 1)})
        self.in_channels, self.out_channels = 6, 6

    def forward(self, x):
        a, b = x.split(3, dim=1)
        return torch.cat([self["1"](b), self["0"](a)], dim=1)


def test_split_convolution_with_another_layout_stays():
    model = nn.Sequential(_ReversedSplit(), nn.BatchNorm2d(6)).double()
    x = torch.randn(4, 6, 5, 5, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == []
    [(_, _, reason)] = report.unfolded
    assert "not a plain convolution" in reason and "_ReversedSplit" in reason
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


def test_parametrized_convolution_stays():
    class Scaled(nn.Module):
        def forward(self, w):
            return w * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Scaled())
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [] and "is parametrized" in report.unfolded[0][2]
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


class _UntraceableVideoBlock(nn.Module):
    """torchvision's (2+1)-D block inside a model that cannot be traced: found from the structure alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 5, (3, 1, 1), padding=(1, 0, 0))),
            nn.BatchNorm3d(5),
            nn.ReLU(),
        )  # fmt: skip
        self.same = nn.Sequential(_PadsFirst(5, 5, 3), mabn.MABN2d(5))
        self.adds = nn.Sequential(_AddsOne(5, 5, 1), mabn.MABN2d(5))

    def forward(self, x):
        y = self.conv(x)[:, :, 0]
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace the whole model
            return self.adds(self.same(y))
        return y


@pytest.mark.parametrize("parts_trace", [True, False])
def test_untraceable_model_folds_subclasses_and_nested_sequentials(parts_trace, monkeypatch):
    if not parts_trace:  # the structure alone: nested Sequentials, subclasses in Sequentials

        def untraceable(*args):
            raise RuntimeError("no trace")

        monkeypatch.setattr(fold_module, "_pairs_from_trace", untraceable)
    model = _UntraceableVideoBlock().double()
    x = torch.randn(4, 3, 2, 7, 7, dtype=F64).abs()
    calibrate(model, x)
    folded, report = mabn.fold(model, return_report=True)
    assert not report.traced
    assert sorted(report.folded) == [("conv.0.0", "conv.0.1"), ("conv.0.3", "conv.1"), ("same.0", "same.1")]
    [(name, _, reason)] = report.unfolded
    assert name == "adds.1" and "adds.0 (_AddsOne)" in reason
    assert type(folded.same[0]) is _PadsFirst
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))


class _AuxiliaryHead(nn.Module):
    """googlenet's pattern: a head the forward calls in training mode only, and a norm it never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.aux = _ConvBlock()
        self.spare = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        if self.training:
            return y, self.aux(x)
        return y


def test_parts_the_forward_does_not_call_fold_by_their_own_trace():
    model = _AuxiliaryHead().double()
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    model.train()
    model(x)  # statistics in every norm
    model.eval()
    calibrate(model.aux, x)
    folded, report = mabn.fold(model, return_report=True)
    assert report.traced
    assert sorted(report.folded) == [("aux.conv", "aux.bn"), ("aux.conv2", "aux.bn2"), ("body.0", "body.1")]
    [(name, _, reason)] = report.unfolded
    assert name == "spare" and reason.startswith("never called by the model's forward")
    with torch.no_grad():
        _assert_same_function(folded(x), model(x))
        _assert_same_function(folded.aux(x), model.aux(x))  # the head computes what it did when called
