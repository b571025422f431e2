"""ResNets: layout, sizes, norm and conv choice, initialization, build_model."""

import functools
import math

import pytest
import torch
from torch import nn

import mabn
from mabn import models

# Parameter counts of the standard ImageNet ResNets (He et al. 2016, 1000 classes).
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


@pytest.mark.parametrize("arch", list(PARAMS))
def test_imagenet_resnets_size_and_shape(arch):
    model = getattr(models, arch)()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    small = getattr(models, arch)(num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_resnet50_layout():
    model = models.resnet50()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    block = model.layer2[0]
    assert isinstance(block, models.Bottleneck)
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)  # stride on the 3x3
    assert block.downsample[0].stride == (2, 2)
    assert model.fc.in_features == 2048
    keys = set(model.state_dict())
    assert {"bn1.running_mean", "layer1.0.downsample.1.weight", "layer4.2.bn3.bias", "fc.weight"} <= keys


@pytest.mark.parametrize(("depth", "width"), [(1, 16), (2, 8), (3, 16)])
@pytest.mark.parametrize("size", [28, 32])
def test_resnet_small(depth, width, size):
    model = models.resnet_small(depth=depth, width=width)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not hasattr(model, "layer4")
    for i, w in enumerate([width, 2 * width, 4 * width]):
        stage = getattr(model, f"layer{i + 1}")
        assert len(stage) == depth and all(isinstance(b, models.BasicBlock) for b in stage)
        assert stage[-1].conv2.out_channels == w
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10)


def _norms(model):
    return [
        m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("bn1", "bn2", "bn3") or name.endswith("downsample.1")
    ]


@pytest.mark.parametrize(
    ("norm", "cls"),
    [
        ("bn", nn.BatchNorm2d),
        ("mabn", mabn.MABN2d),
        ("gn", nn.GroupNorm),
        ("brn", mabn.BatchRenorm2d),
        (mabn.GhostBatchNorm2d, mabn.GhostBatchNorm2d),
        (functools.partial(mabn.MABN2d, window=4), mabn.MABN2d),
    ],
)
def test_norm_layer_goes_through_the_factory(norm, cls):
    model = models.resnet_small(norm_layer=norm, depth=2)
    norms = _norms(model)
    assert len(norms) == 1 + 3 * 2 * 2 + 2  # stem, two per block, two projection shortcuts
    assert all(type(m) is cls for m in norms)


def test_norm_kwargs_reach_every_norm():
    model = models.resnet18(norm_layer="mabn", norm_batch_size=2, window=4)
    norms = [m for m in model.modules() if isinstance(m, mabn.MABN2d)]
    assert len(norms) == 20
    assert all(m.norm_batch_size == 2 and m.window == 4 for m in norms)


def test_centralized_convs():
    model = models.resnet_small(conv_layer="centralized", depth=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 12 + 2
    assert all(type(m) is mabn.CenConv2d for m in convs)
    assert type(model.fc) is mabn.CenLinear
    plain = models.resnet_small(depth=2)
    assert all(type(m) is nn.Conv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert type(plain.fc) is nn.Linear


def test_he_initialization():
    torch.manual_seed(0)
    model = models.resnet50()
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.02
    assert abs(conv.weight.mean().item()) < 0.05 * expected


@pytest.mark.parametrize("norm", ["bn", "mabn", "gn"])
def test_zero_init_residual(norm):
    default = models.resnet_small(norm_layer=norm, depth=2)
    assert all((b.bn2.weight == 1).all() for s in (default.layer1, default.layer2) for b in s)
    zeroed = models.resnet50(norm_layer=norm, zero_init_residual=True)
    blocks = [m for m in zeroed.modules() if isinstance(m, models.Bottleneck)]
    assert len(blocks) == 16
    assert all((b.bn3.weight == 0).all() and (b.bn2.weight == 1).all() for b in blocks)
    # With every residual branch zeroed, a block maps x to relu(shortcut(x)).
    block = blocks[1].eval()
    x = torch.randn(1, 256, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_mabn_model_trains_at_norm_batch_two():
    model = models.resnet_small(norm_layer="mabn", conv_layer="centralized", norm_batch_size=2)
    out = model(torch.randn(4, 1, 28, 28))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_build_model_matches_the_builder():
    cfg = {
        "arch": "resnet_small",
        "num_classes": 5,
        "in_channels": 3,
        "norm": "mabn",
        "norm_kwargs": {"norm_batch_size": 2, "window": 4},
        "conv": "centralized",
        "depth": 2,
        "width": 8,
    }
    torch.manual_seed(1)
    built = models.build_model(cfg)
    torch.manual_seed(1)
    direct = models.resnet_small(
        5, 3, depth=2, width=8, norm_layer="mabn", conv_layer="centralized", norm_batch_size=2, window=4
    )
    a, b = built.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(built.layer1[0].conv1) is mabn.CenConv2d and built.layer1[0].bn1.window == 4


def test_build_model_defaults():
    model = models.build_model({"arch": "resnet18"})
    assert model.fc.out_features == 1000 and type(model.bn1) is nn.BatchNorm2d
    assert models.build_model({"arch": "resnet50", "zero_init_residual": True}).layer1[0].bn3.weight.sum() == 0


@pytest.mark.parametrize(
    ("cfg", "exc", "match"),
    [
        ({"arch": "vgg"}, ValueError, "unknown arch 'vgg'"),
        ({}, ValueError, "unknown arch None"),
        ({"arch": "resnet18", "depth": 2}, ValueError, "does not take: depth"),
        ({"arch": "resnet_small", "widht": 2}, ValueError, "does not take: widht"),
        ({"arch": "resnet_small", "norm": "xx"}, ValueError, "unknown norm layer 'xx'"),
        ({"arch": "resnet_small", "conv": "xx"}, ValueError, "conv must be one of"),
        ({"arch": "resnet_small", "norm_kwargs": [1]}, TypeError, "norm_kwargs"),
        ({"arch": "resnet_small", "depth": 0}, ValueError, "depth must be >= 1, got 0"),
        ([("arch", "resnet18")], TypeError, "model_config must be a dict"),
    ],
)
def test_build_model_errors(cfg, exc, match):
    with pytest.raises(exc, match=match):
        models.build_model(cfg)
