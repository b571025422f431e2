"""The layers' defaults are their presets': what they build, what they take, and what their docs say."""

import ast
import dataclasses
import inspect
import re

import pytest

import mabn
from mabn.config import FROM_PRESET

FAMILIES = {
    "mabn": (mabn.MABN1d, mabn.MABN2d, mabn.MABN3d),
    "bn": (mabn.GhostBatchNorm1d, mabn.GhostBatchNorm2d, mabn.GhostBatchNorm3d),
    "brn": (mabn.BatchRenorm1d, mabn.BatchRenorm2d, mabn.BatchRenorm3d),
    "general": (mabn.GeneralBatchNorm1d, mabn.GeneralBatchNorm2d, mabn.GeneralBatchNorm3d),
}
# Each family's preset: GeneralBatchNorm*d builds MABN unless told otherwise.
PRESET = {"mabn": "mabn", "bn": "bn", "brn": "brn", "general": "mabn"}
CLASSES = [(cls, PRESET[family]) for family, classes in FAMILIES.items() for cls in classes]
FIELDS = [f.name for f in dataclasses.fields(mabn.NormConfig)]

# A valid value other than every preset's, per field.
OTHER = {
    "centered": True,
    "forward_stats": "batch",
    "renorm": False,
    "backward_stats": "batch",
    "eps": 1e-3,
    "momentum": 0.3,
    "norm_batch_size": 2,
    "window": 4,
    "r_max": 2.0,
    "d_max": 1.5,
    "warmup_iters": 7,
    "renorm_warmup_iters": 9,
    "accumulate": 3,
}


def _id(value):
    return value.__name__ if isinstance(value, type) else str(value)


@pytest.mark.parametrize(("cls", "preset"), CLASSES, ids=_id)
def test_default_construction_builds_the_preset(cls, preset):
    assert cls(4).config == mabn.PRESETS[preset]


@pytest.mark.parametrize(("cls", "preset"), CLASSES, ids=_id)
def test_a_given_value_overrides_exactly_its_field(cls, preset):
    for name in cls.config_keywords:
        assert getattr(mabn.PRESETS[preset], name) != OTHER[name], name  # the test's value is another
        layer = cls(4, **{name: OTHER[name]})
        assert layer.config == dataclasses.replace(mabn.PRESETS[preset], **{name: OTHER[name]}), name
    # None is a value of momentum (the cumulative average), not a value left out.
    assert cls(4, momentum=None).config == dataclasses.replace(mabn.PRESETS[preset], momentum=None)


@pytest.mark.parametrize(("cls", "preset"), CLASSES, ids=_id)
def test_each_constructor_takes_the_settings_that_act_in_its_preset(cls, preset):
    params = inspect.signature(cls).parameters
    takes = [name for name in params if name in FIELDS]
    assert set(takes) == set(cls.config_keywords)
    if cls in FAMILIES["general"]:
        assert set(takes) == set(FIELDS)
    else:
        assert set(takes) == set(mabn.PRESETS[preset].settings())
    # No default is written in a signature: every one comes from the preset.
    defaults = {name: params[name].default for name in takes}
    assert defaults == {name: FROM_PRESET if name == "momentum" else None for name in takes}


def _documented_defaults(cls: type) -> dict[str, object]:
    """name -> the value after ``Default:`` in the Args section of the class's docstring."""
    args = inspect.getdoc(cls).split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    found = {}
    for entry in re.split(r"\n(?=    \w+: )", args):
        name = entry.strip().split(":", 1)[0]
        match = re.search(r"Default: ``([^`]+)``", entry)
        if match:
            found[name] = ast.literal_eval(match.group(1))
    return found


@pytest.mark.parametrize(("cls", "preset"), CLASSES, ids=_id)
def test_documented_defaults_are_the_presets(cls, preset):
    documented = _documented_defaults(cls)
    assert set(cls.config_keywords) <= set(documented)
    for name in cls.config_keywords:
        assert documented[name] == getattr(mabn.PRESETS[preset], name), name
