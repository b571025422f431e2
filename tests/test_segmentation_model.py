"""FPN segmentation models: shapes at any size, norms from the factory, training, complete folding, ONNX export."""

import doctest
import functools
import importlib

import onnx
import pytest
import torch
from conftest import calibrate, rel_error, run_onnx
from torch import nn

import mabn
from mabn import models

# The module (``mabn.fold`` is the function).
fold_module = importlib.import_module("mabn.fold")

F64 = torch.float64
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    mabn.StreamNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
SMALL_NORMS = 9 + 3 + 2 + 1  # encoder (stem, 2 per block, 2 shortcuts), laterals, upsampling, head


def _norms(model):
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def _small(norm="bn", conv=None, **kwargs):
    return models.fpn_resnet_small(norm_layer=norm, conv_layer=conv, width=8, **kwargs)


@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(96, 96), (97, 45), (33, 128), (20, 21), (1, 1)])
def test_output_has_the_input_size(height, width, stem_stride):
    model = _small(stem_stride=stem_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, height, width))
    assert out.shape == (2, 11, height, width)
    assert torch.isfinite(out).all()


def test_imagenet_layouts_output_the_input_size():
    model = models.fpn_resnet18(num_classes=4, in_channels=1, decoder_channels=16).eval()
    assert model.encoder.stage_strides == [4, 8, 16, 32]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 65, 100)).shape == (1, 4, 65, 100)
    big = models.fpn_resnet50()
    assert big.lateral[-1][0].in_channels == 2048 and big.classifier.out_channels == 21
    assert big.lateral[0][0].out_channels == 256 and len(big.upsample) == 3


def test_layout():
    model = models.fpn_resnet_small(width=16, depth=2)
    assert model.task == "segmentation" and models.ResNet.task == "classification"
    enc = model.encoder
    assert enc.conv1.stride == (2, 2) and enc.stage_strides == [2, 4, 8] and enc.stage_channels == [16, 32, 64]
    assert isinstance(enc.fc, nn.Identity)  # no parameters without gradients (DDP would complain)
    assert [m[0].in_channels for m in model.lateral] == [16, 32, 64]
    assert all(m[0].out_channels == 32 for m in model.lateral)  # decoder_channels = 2 * width
    up = model.upsample[0][0]
    assert type(up) is nn.ConvTranspose2d and up.kernel_size == (2, 2) and up.stride == (2, 2)
    assert model.head[0].kernel_size == (3, 3) and model.classifier.bias is not None
    assert models.fpn_resnet_small(stem_stride=1).encoder.conv1.stride == (1, 1)
    assert models.fpn_resnet_small(decoder_channels=24).head[0].out_channels == 24


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
def test_every_norm_comes_from_the_factory(norm, cls):
    model = _small(norm)
    norms = _norms(model)
    assert len(norms) == SMALL_NORMS
    assert all(type(m) is cls for m in norms)
    big = models.fpn_resnet18(norm_layer=norm, decoder_channels=32)
    assert len(_norms(big)) == 20 + 4 + 3 + 1 and all(type(m) is cls for m in _norms(big))


def test_norm_kwargs_reach_every_norm():
    model = _small("mabn", norm_batch_size=2, window=4)
    norms = _norms(model)
    assert len(norms) == SMALL_NORMS and all(m.norm_batch_size == 2 and m.window == 4 for m in norms)
    gn = _small("gn", num_groups=4)
    assert all(m.num_groups == 4 for m in _norms(gn))


def test_conv_layer_applies_to_encoder_and_decoder():
    model = _small("mabn", "centralized")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 + 3 + 1 + 1  # encoder, laterals, head, classifier
    assert all(type(m) is mabn.CenConv2d for m in convs)
    # Transposed convolutions stay plain (mabn has no weight-centralized transposed conv).
    assert all(type(m) is nn.ConvTranspose2d for m in model.modules() if isinstance(m, nn.ConvTranspose2d))
    assert all(type(m) is nn.Conv2d for m in _small().modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("batch", [1, 2])
def test_mabn_trains_at_tiny_batches(batch):
    # Warm-ups of 1 call: the later steps use the moving averages (SMA forward and backward).
    model = _small("mabn", "centralized", norm_batch_size=batch, warmup_iters=1, renorm_warmup_iters=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randint(0, 11, (batch, 48, 40))
    for _ in range(3):
        optimizer.zero_grad()
        out = model(torch.randn(batch, 1, 48, 40))
        assert out.shape == (batch, 11, 48, 40)
        loss = nn.functional.cross_entropy(out, target)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    assert all(int(m.num_batches_tracked) == 3 for m in _norms(model))


def test_zero_init_residual_reaches_the_encoder():
    model = _small("mabn", zero_init_residual=True)
    blocks = [m for m in model.encoder.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 3 and all((b.bn2.weight == 0).all() for b in blocks)
    assert all((m[1].weight == 1).all() for m in model.lateral)


@pytest.mark.parametrize(
    ("norm", "conv"),
    [("bn", None), ("mabn", "centralized"), ("brn", None), (mabn.GhostBatchNorm2d, None), ("mabn", None)],
)
def test_every_norm_folds_exactly(norm, conv):
    model = _small(norm, conv).double()
    calibrate(model, torch.randn(4, 1, 40, 44, dtype=F64))
    folded, report = mabn.fold(model, return_report=True)
    assert report.traced and report.unfolded == [] and len(report.folded) == SMALL_NORMS
    assert ("upsample.0.0", "upsample.0.1") in report.folded and ("head.0", "head.1") in report.folded
    assert not _norms(folded)
    assert all(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in folded.modules() if hasattr(m, "weight"))
    x = torch.randn(3, 1, 45, 38, dtype=F64)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1e-4
        assert rel_error(folded(x), expected) <= 1e-12


def test_imagenet_layout_folds_exactly():
    model = models.fpn_resnet18(num_classes=5, norm_layer="mabn", conv_layer="centralized", decoder_channels=16)
    model = calibrate(model.double(), torch.randn(2, 3, 64, 64, dtype=F64))
    folded, report = mabn.fold(model, return_report=True)
    assert report.unfolded == [] and len(report.folded) == 28
    x = torch.randn(1, 3, 70, 50, dtype=F64)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


def test_structural_fallback_folds_the_whole_model(monkeypatch):
    def untraceable(*args):
        raise RuntimeError("pretend torch.fx cannot trace this model")

    monkeypatch.setattr(fold_module, "_pairs_from_trace", untraceable)
    model = calibrate(_small("mabn", "centralized").double(), torch.randn(4, 1, 32, 32, dtype=F64))
    folded, report = mabn.fold(model, return_report=True)
    assert not report.traced and "pretend" in report.trace_error
    assert report.unfolded == [] and len(report.folded) == SMALL_NORMS
    x = torch.randn(2, 1, 33, 31, dtype=F64)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-12


def test_group_norm_stays_and_is_reported():
    model = _small("gn", "centralized").eval()
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [] and len(report.unfolded) == SMALL_NORMS
    assert all(cls == "GroupNorm" and "cannot fold" in reason for _, cls, reason in report.unfolded)
    x = torch.randn(2, 1, 30, 30)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-5


def test_onnx_export_with_dynamic_batch_height_and_width(tmp_path):
    model = _small("mabn", "centralized", norm_batch_size=2)
    calibrate(model, torch.randn(4, 1, 64, 64))
    nn.init.normal_(model.classifier.weight)  # outputs of order 1, so the tolerance means something
    model.eval()
    folded = mabn.fold(model)
    # A square example: the exporter pads it so that height and width get symbols of their own.
    path = mabn.export_model(folded, tmp_path / "seg.onnx", input_shape=(2, 1, 64, 64), dynamic_spatial=True)
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    for shape in [(1, 1, 64, 64), (2, 1, 96, 80), (3, 1, 128, 128), (1, 1, 37, 53)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(path, x)
        assert got.shape == expected.shape == (shape[0], 11, *shape[2:])
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_dynamic_spatial_needs_spatial_dims(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match=r"dynamic_spatial needs an input with dims after \(N, C\).*\(2, 3\)"):
        mabn.export_model(model, tmp_path / "m.onnx", input_shape=(2, 3), dynamic_spatial=True)
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_example_sizes():
    from mabn.export import _dynamic

    example, shapes = _dynamic(torch.ones(1, 3, 2, 2), dynamic_batch=True, dynamic_spatial=True)
    assert example.shape == (2, 3, 3, 4) and example[:, :, :2, :2].eq(1).all() and example.sum() == 2 * 3 * 4
    assert [d.__name__ for d in shapes[0].values()] == ["batch", "height", "width"]
    example, shapes = _dynamic(torch.ones(4, 3, 1, 9, 9), dynamic_batch=False, dynamic_spatial=True)
    assert example.shape == (4, 3, 2, 9, 10) and list(shapes[0]) == [2, 3, 4]
    example, shapes = _dynamic(torch.ones(1, 3, 8), dynamic_batch=False, dynamic_spatial=False)
    assert example.shape == (1, 3, 8) and shapes is None


def test_build_model_round_trip():
    cfg = {
        "arch": "fpn_resnet_small",
        "num_classes": 11,
        "in_channels": 1,
        "norm": "mabn",
        "norm_kwargs": {"norm_batch_size": 2, "window": 4},
        "conv": "centralized",
        "depth": 2,
        "width": 8,
        "decoder_channels": 24,
    }
    assert {"fpn_resnet_small", "fpn_resnet18", "fpn_resnet50"} <= set(models.ARCHS)
    torch.manual_seed(1)
    built = models.build_model(cfg)
    torch.manual_seed(1)
    direct = models.fpn_resnet_small(
        11, 1, 2, 8, "mabn", "centralized", decoder_channels=24, norm_batch_size=2, window=4
    )
    a, b = built.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(built) is models.SegmentationFPN and built.task == "segmentation"
    assert type(built.head[1]) is mabn.MABN2d and built.head[1].window == 4
    # A checkpoint's state dict loads into a model built from its configuration.
    again = models.build_model(cfg)
    again.load_state_dict(built.state_dict())
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), built.eval()(x))
    assert type(models.build_model({"arch": "fpn_resnet18", "num_classes": 3}).encoder.bn1) is nn.BatchNorm2d


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"arch": "fpn_resnet18", "depth": 2}, "does not take: depth"),
        ({"arch": "fpn_resnet_small", "decoder_channels": 0}, "decoder_channels must be >= 1, got 0"),
        ({"arch": "fpn_resnet_small", "stem_stride": 4}, "stem_stride must be 1 or 2, got 4"),
        ({"arch": "fpn_resnet_small", "width": 0}, "width must be >= 1, got 0"),
        ({"arch": "fpn_resnet_small", "num_classes": 0}, "num_classes must be >= 1, got 0"),
    ],
)
def test_bad_options(cfg, match):
    with pytest.raises(ValueError, match=match):
        models.build_model(cfg)


def test_encoder_must_be_a_resnet():
    with pytest.raises(TypeError, match="encoder must be a mabn.models.ResNet, got Sequential"):
        models.SegmentationFPN(nn.Sequential(), 3, 8)
    with pytest.raises(TypeError, match="norm_kwargs must be a dict"):
        models.SegmentationFPN(models.resnet_small(), 3, 8, norm_kwargs=[1])


def test_resnet_is_unchanged_and_exposes_its_stages():
    model = models.resnet_small(width=8).eval()
    assert model.stage_strides == [1, 2, 4] and model.stage_channels == [8, 16, 32]
    assert models.resnet50().stage_channels == [256, 512, 1024, 2048]
    assert "fc.weight" in model.state_dict() and not any("stage" in k for k in model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        stages = model.forward_stages(x)
        assert [s.shape[1:] for s in stages] == [(8, 28, 28), (16, 14, 14), (32, 7, 7)]
        assert torch.equal(model.forward_features(x), stages[-1].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="stem must be one of"):
        models.ResNet(models.BasicBlock, [1], [8], 2, 1, "tiny")


def test_docstring_examples_run():
    module = importlib.import_module("mabn.models.segmentation")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda enc: models.FeaturePyramid(enc, 0), "out_channels must be >= 1"),
        (lambda enc: models.FeaturePyramid(enc, 8, stages=[5]), "stages must be increasing indices"),
        (lambda enc: models.SegmentationFPN(enc, num_classes=0, decoder_channels=8), "num_classes must be >= 1"),
        (lambda enc: models.SegmentationFPN(enc, num_classes=3, decoder_channels=8, norm_kwargs=[1]), "norm_kwargs"),
    ],
)
def test_a_refused_decoder_leaves_the_encoder_as_it_was(build, match):
    encoder = models.resnet_small(width=4)
    before = type(encoder.fc)
    with pytest.raises((ValueError, TypeError), match=match):
        build(encoder)
    assert type(encoder.fc) is before and not isinstance(encoder.fc, nn.Identity)
