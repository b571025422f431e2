"""create_norm_layer: names, classes, partials, dimensionality and errors."""

import dataclasses
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mabn
from mabn.factory import NORMS, canonical_name, default_num_groups

SHAPES = {1: (4, 6, 5), 2: (4, 6, 5, 5), 3: (4, 6, 3, 4, 4)}

EXPECTED = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "brn": (mabn.BatchRenorm1d, mabn.BatchRenorm2d, mabn.BatchRenorm3d),
    "mabn": (mabn.MABN1d, mabn.MABN2d, mabn.MABN3d),
    "in": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "gn": (nn.GroupNorm,) * 3,
    "ln": (nn.GroupNorm,) * 3,
    "frozen_bn": (mabn.FrozenBatchNorm1d, mabn.FrozenBatchNorm2d, mabn.FrozenBatchNorm3d),
}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_names_build_the_right_class_and_run(name, dim):
    layer = mabn.create_norm_layer(name, 6, dim=dim)
    assert type(layer) is EXPECTED[name][dim - 1]
    x = torch.randn(SHAPES[dim])
    assert layer(x).shape == x.shape


def test_default_dim_is_2():
    assert type(mabn.create_norm_layer("mabn", 4)) is mabn.MABN2d
    assert type(mabn.create_norm_layer("bn", 4)) is nn.BatchNorm2d


@pytest.mark.parametrize("preset", sorted(mabn.PRESETS))
@pytest.mark.parametrize("dim", [1, 3])
def test_every_preset_name(preset, dim):
    layer = mabn.create_norm_layer(preset, 6, dim=dim, norm_batch_size=2)
    assert layer.num_features == 6
    assert layer.config == dataclasses.replace(mabn.PRESETS[preset], norm_batch_size=2)
    x = torch.randn(SHAPES[dim])
    assert layer(x).shape == x.shape


def test_bn_with_norm_batch_size_is_ghost_bn():
    assert type(mabn.create_norm_layer("bn", 4, norm_batch_size=2)) is mabn.GhostBatchNorm2d
    assert type(mabn.create_norm_layer("bn", 4, norm_batch_size=None)) is nn.BatchNorm2d
    assert type(mabn.create_norm_layer("bn", 4, accumulate=2)) is mabn.GhostBatchNorm2d
    assert type(mabn.create_norm_layer("bn", 4, accumulate=1)) is nn.BatchNorm2d


def test_names_are_case_insensitive_and_accept_dashes():
    assert type(mabn.create_norm_layer("MABN", 4)) is mabn.MABN2d
    assert type(mabn.create_norm_layer("Frozen-BN", 4)) is mabn.FrozenBatchNorm2d


def test_one_table_of_names():
    # Every preset is a name of the factory, of the converter and of the command line, under its own key.
    batch = [name for name, norm in NORMS.items() if norm.kind == "batch"]
    assert batch == list(mabn.PRESETS)
    assert mabn.NORM_NAMES == tuple(NORMS)
    for name in batch:
        for dim in (1, 2, 3):
            layer = mabn.create_norm_layer(name, 4, dim=dim, norm_batch_size=2)
            assert type(layer) is NORMS[name].classes[dim - 1] and layer.config == dataclasses.replace(
                mabn.PRESETS[name], norm_batch_size=2
            )
    # Only "bn" has torch's twin, and only while no option of the engine is on.
    assert [name for name, norm in NORMS.items() if norm.torch_classes] == ["bn"]
    assert [m.__name__ for m in NORMS["bn"].torch_classes] == ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def test_the_former_name_ghost_bn_is_bn():
    assert canonical_name("Ghost-BN") == "bn" and "ghost_bn" not in mabn.NORM_NAMES
    assert type(mabn.create_norm_layer("ghost_bn", 4)) is nn.BatchNorm2d
    assert type(mabn.create_norm_layer("ghost_bn", 4, norm_batch_size=2)) is mabn.GhostBatchNorm2d
    model = mabn.convert_model(nn.Sequential(nn.BatchNorm2d(4)), "ghost_bn", norm_batch_size=2)
    assert type(model[0]) is mabn.GhostBatchNorm2d and model[0].norm_batch_size == 2


def test_kwargs_reach_the_layer():
    layer = mabn.create_norm_layer("mabn", 4, eps=1e-3, momentum=0.05, window=4, norm_batch_size=2, dtype=torch.float64)
    assert (layer.eps, layer.momentum, layer.window, layer.norm_batch_size) == (1e-3, 0.05, 4, 2)
    assert layer.running_var.dtype == torch.float64
    bn = mabn.create_norm_layer("bn", 4, momentum=0.3, affine=False)
    assert bn.momentum == 0.3 and bn.weight is None


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (256, 32), (48, 24), (16, 16), (7, 7), (33, 11)])
def test_group_norm_default_groups_divide_channels(channels, groups):
    assert default_num_groups(channels) == groups
    layer = mabn.create_norm_layer("gn", channels)
    assert layer.num_groups == groups and channels % layer.num_groups == 0


def test_group_norm_explicit_groups():
    assert mabn.create_norm_layer("gn", 64, num_groups=8).num_groups == 8
    with pytest.raises(ValueError, match="num_groups=5 does not divide num_features=64"):
        mabn.create_norm_layer("gn", 64, num_groups=5)


def test_ln_is_layer_norm_over_c_h_w():
    layer = mabn.create_norm_layer("ln", 6)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(6) + 0.5)
        layer.bias.copy_(torch.randn(6))
    x = torch.randn(3, 6, 4, 5)
    expected = nn.functional.layer_norm(x, (6, 4, 5), eps=layer.eps) * layer.weight.view(6, 1, 1) + layer.bias.view(
        6, 1, 1
    )
    assert_close(layer(x), expected)


def test_in_is_affine_by_default():
    assert mabn.create_norm_layer("in", 6).affine
    assert not mabn.create_norm_layer("in", 6, affine=False).affine


@pytest.mark.parametrize(
    ("cls", "dim", "expected"),
    [
        (mabn.MABN2d, 1, mabn.MABN1d),
        (mabn.MABN2d, 3, mabn.MABN3d),
        (nn.BatchNorm2d, 1, nn.BatchNorm1d),
        (mabn.GeneralBatchNorm1d, 2, mabn.GeneralBatchNorm2d),
        (mabn.BatchRenorm3d, None, mabn.BatchRenorm3d),
    ],
)
def test_class_dim_picks_the_sibling(cls, dim, expected):
    kwargs = {} if dim is None else {"dim": dim}
    assert type(mabn.create_norm_layer(cls, 4, **kwargs)) is expected


def test_class_group_norm_gets_num_groups():
    layer = mabn.create_norm_layer(nn.GroupNorm, 48)
    assert (layer.num_groups, layer.num_channels) == (24, 48)
    assert mabn.create_norm_layer(nn.GroupNorm, 48, num_groups=4).num_groups == 4


def test_partial_keywords_are_overridden_by_kwargs():
    norm = functools.partial(mabn.MABN2d, window=8, norm_batch_size=2)
    layer = mabn.create_norm_layer(norm, 4, norm_batch_size=4, dim=1)
    assert type(layer) is mabn.MABN1d
    assert (layer.window, layer.norm_batch_size) == (8, 4)
    gn = mabn.create_norm_layer(functools.partial(nn.GroupNorm, 2), 4)
    assert (gn.num_groups, gn.num_channels) == (2, 4)


def test_plain_callable():
    layer = mabn.create_norm_layer(lambda c, **kw: nn.LayerNorm(c, **kw), 4, eps=1e-3)
    assert isinstance(layer, nn.LayerNorm) and layer.eps == 1e-3


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown norm layer 'batchnorm'") as info:
        mabn.create_norm_layer("batchnorm", 4)
    for name in ("bn", "brn", "mabn", "frozen_bn", "gn", "ln", "in", *mabn.PRESETS):
        assert name in str(info.value)


@pytest.mark.parametrize("dim", [0, 4, -1])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match=f"dim must be 1, 2 or 3, got {dim}"):
        mabn.create_norm_layer("bn", 4, dim=dim)


def test_bad_arguments():
    with pytest.raises(TypeError, match="norm must be a name"):
        mabn.create_norm_layer(3, 4)
    with pytest.raises(TypeError, match="num_features must be an int"):
        mabn.create_norm_layer("bn", 4.0)
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        mabn.create_norm_layer("bn", 0)
    with pytest.raises(TypeError, match=r"create_norm_layer\('gn', 4\)"):
        mabn.create_norm_layer("gn", 4, norm_batch_size=2)
    with pytest.raises(TypeError, match="not an nn.Module"):
        mabn.create_norm_layer(lambda c: c, 4)
