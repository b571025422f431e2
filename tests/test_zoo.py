"""A slice of the zoo (benchmarks/zoo.py): one model per kind of norm layer the converters handle.

Each row converts a real torchvision or timm model with non-trivial statistics
(``convert_model(model.eval(), "mabn", norm_batch_size=2, preserve="function")``) and checks that it
computes the same, trains one finite step at 2 samples per group, folds to the same outputs with
nothing of mabn left, and reverts to the original classes, whose state dict loads strictly into a
new model of the same name (timm: ``timm.create_model``). The whole zoo is ``python benchmarks/zoo.py``.
"""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = sys.modules["zoo"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

CLS = "classification"
SLICE = [
    pytest.param(zoo.Arch("torchvision", CLS, "resnet18"), {"BatchNorm2d"}, id="torchvision-resnet18"),
    pytest.param(zoo.Arch("torchvision", CLS, "mobilenet_v3_small"), {"BatchNorm2d"}, id="torchvision-mobilenet"),
    pytest.param(zoo.Arch("torchvision", CLS, "resnet18", variant="sync"), {"SyncBatchNorm"}, id="torch-syncbn"),
    pytest.param(
        zoo.Arch("torchvision", CLS, "resnet18", variant="frozen"), {"FrozenBatchNorm2d"}, id="torchvision-frozen"
    ),
    pytest.param(zoo.Arch("timm", CLS, "mobilenetv3_small_050"), {"BatchNormAct2d"}, id="timm-bnact"),
    pytest.param(
        zoo.Arch("timm", CLS, "mobilenetv3_small_050", variant="sync"), {"SyncBatchNormAct"}, id="timm-syncbnact"
    ),
    pytest.param(
        zoo.Arch("timm", CLS, "mobilenetv3_small_050", variant="frozen"),
        {"FrozenBatchNormAct2d"},
        id="timm-frozen",
    ),
    pytest.param(
        zoo.Arch("torchvision", "detection", "fasterrcnn_mobilenet_v3_large_320_fpn"),
        {"FrozenBatchNorm2d"},
        id="torchvision-detection-frozen-backbone",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        zoo.Arch("torchvision", "segmentation", "lraspp_mobilenet_v3_large"),
        {"BatchNorm2d"},
        id="torchvision-segmentation",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        zoo.Arch("timm", CLS, "efficientnet_b0"), {"BatchNormAct2d"}, id="timm-efficientnet", marks=pytest.mark.slow
    ),
    pytest.param(
        zoo.Arch("torchvision", "video", "mc3_18"), {"BatchNorm3d"}, id="torchvision-video", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("arch", "classes"), SLICE)
def test_zoo_row_passes(arch, classes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = zoo.check(arch, onnx=False)
    assert row.status == "pass", row
    assert classes <= set(row.norms), row.norms  # the kind of layer this row is about
    assert row.converted == sum(row.norms.values())
    assert row.kept <= zoo.TOL_KEPT and row.fold <= zoo.TOL_FOLD and row.revert <= zoo.TOL_REVERT
    assert row.revert_note == "strict load ok" and row.train.startswith("ok")
    # Every norm layer of these models directly follows a convolution of its own, and folds.
    assert row.folded == row.converted and row.left == {}, row.left


@pytest.mark.slow
def test_zoo_row_exports_to_onnx():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = zoo.check(zoo.Arch("timm", CLS, "mobilenetv3_small_050"))
    assert row.status == "pass" and row.onnx <= zoo.TOL_ONNX, row


def test_zoo_refuses_an_unknown_batchnorm_subclass():
    # timm's SplitBatchNorm2d is a BatchNorm2d with its own forward (auxiliary BatchNorms per split).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = zoo.check(zoo.Arch("timm", CLS, "resnet18", variant="splitbn"), onnx=False)
    assert row.status == "refused" and "SplitBatchNorm2d" in row.note and "register_norm_adapter" in row.note


def test_zoo_report_counts_every_row():
    rows = [
        zoo.Row("torchvision/a", "torchvision", CLS, converted=3, kept=0.0, train="ok (loss 1)", fold=0.0,
                revert=0.0, revert_note="strict load ok", onnx=0.0, status="pass"),
        zoo.Row("timm/b", "timm", CLS, status="refused", note="cannot convert x"),
        zoo.Row("timm/c", "timm", CLS, status="no BatchNorm", note="nothing to convert"),
    ]  # fmt: skip
    line = zoo.summary(rows)
    assert line.startswith("**3 architectures** (1 torchvision, 2 timm), 2 with BatchNorm: 1 converted")
    assert "1 refused deliberately, 0 failed; 1 without BatchNorm" in line


def test_zoo_report_counts_fold_coverage_by_case():
    rows = [
        zoo.Row("torchvision/a", "torchvision", CLS, converted=5, fold=0.0, folded=4,
                left={"not preceded by a convolution: nothing to fold into": 1}),
        zoo.Row("timm/b", "timm", CLS, converted=4, fold=0.0, folded=2, left={
            "statistics of each sample: not an affine map, cannot fold": 3,
            "after a convolution whose forward is not a plain convolution of its input: conv (X) folded, ...": 1,
            "after a convolution whose forward is not a plain convolution of its input: conv2 (Y) folded, ...": 1,
        }),
        zoo.Row("timm/c", "timm", CLS, status="no BatchNorm", note="nothing to convert"),
    ]  # fmt: skip
    line = zoo.fold_coverage(rows)
    assert line.startswith("Fold coverage: 6 of the 12 norm layers of the 2 folded models (50.0 %) folded")
    assert "the other 6 stay in place" in line
    assert "statistics of each sample x3" in line and "not preceded by a convolution" in line
    assert "after a convolution whose forward is not a plain convolution of its input x2" in line
    assert line in zoo.totals(rows)


def test_timm_families():
    assert zoo.timm_family("resnet10t", "timm.models.resnet") == "resnet/resnet"
    assert zoo.timm_family("tf_mixnet_s", "timm.models.efficientnet") == "efficientnet/mixnet"
    listed = zoo.timm_archs()
    assert len(listed) >= 100 and len({a.family for a in listed}) == len(listed)
