"""BatchNorm conventions and the tools built on them: torch.fx, feature extractors, FX quantization,
state-dict loading, track_running_stats, TorchScript."""

import copy
import warnings

import pytest
import torch
from conftest import state_copy
from torch import fx, nn
from torch.testing import assert_close

import mabn
from mabn import models


def _mabn_net() -> nn.Module:
    return models.resnet_small(norm_layer="mabn", width=4, depth=1, norm_batch_size=2)


def _frozen_net() -> nn.Module:
    model = models.resnet_small(width=4, depth=1)
    return mabn.convert_model(model, "frozen_bn")


def _centralized_net() -> nn.Module:
    return models.resnet_small(norm_layer="mabn", conv_layer="centralized", width=4, depth=1, norm_batch_size=2)


@pytest.mark.parametrize("make", [_mabn_net, _frozen_net, _centralized_net])
@pytest.mark.parametrize("training", [True, False])
def test_symbolic_trace_keeps_the_layers_as_calls_and_trains_like_the_original(make, training):
    model = make().train(training)
    twin = copy.deepcopy(model)
    traced = fx.symbolic_trace(twin)
    norms = {n for n, m in model.named_modules() if isinstance(m, (mabn.StreamNorm, mabn.FrozenBatchNorm2d))}
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert norms and norms <= called  # each layer is one call_module node of the graph
    for step in range(3):
        x = torch.randn(4, 1, 12, 12) * 2 + 1
        expected, got = model(x), traced(x)
        assert torch.equal(got, expected), step
        if training:
            expected.square().mean().backward()
            got.square().mean().backward()
    # The graph calls the same layer objects: their buffers advanced exactly as the original's did.
    assert traced.get_submodule("bn1") is twin.bn1
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    if training and make is not _frozen_net:
        assert twin.bn1.num_batches_tracked.item() == 3 and twin.bn1.forward_window.abs().sum() > 0


def test_feature_extractor_of_a_converted_torchvision_model():
    import torchvision
    from torchvision.models import feature_extraction

    model = mabn.convert_model(torchvision.models.resnet18(num_classes=10), "mabn", norm_batch_size=2)
    nodes = feature_extraction.get_graph_node_names(model)[1]
    assert "layer1.0.bn1" in nodes and "layer4.1.bn2" in nodes
    reference = copy.deepcopy(model)
    seen = []  # a downsample norm: the others are followed by in-place ReLUs, which change their outputs later
    reference.layer2[0].downsample[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    extractor = feature_extraction.create_feature_extractor(model, {"layer2.0.downsample.1": "bn", "layer4": "deep"})
    x = torch.randn(4, 3, 32, 32)
    features = extractor(x)  # in training mode: the layers normalize and update their statistics
    reference(x)
    assert features["deep"].shape == (4, 512, 1, 1)
    assert_close(features["bn"], seen[0])
    assert torch.equal(model.layer2[0].bn1.forward_window, reference.layer2[0].bn1.forward_window)


def test_fx_post_training_quantization_after_fold():
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    torch.manual_seed(0)
    model = models.resnet_small(norm_layer="mabn", conv_layer="centralized", width=8, depth=1, norm_batch_size=2)
    for _ in range(3):  # non-trivial statistics
        model(torch.randn(8, 1, 12, 12) * 2 + 1).sum().backward()
    folded = mabn.fold(model.eval())
    example = torch.randn(1, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        prepared = quantize_fx.prepare_fx(copy.deepcopy(folded), get_default_qconfig_mapping("fbgemm"), (example,))
        for _ in range(8):
            prepared(torch.randn(4, 1, 12, 12) * 2 + 1)
        quantized = quantize_fx.convert_fx(prepared)
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds)  # quantized convolutions, nothing of mabn
    assert not any(k.startswith("mabn") for k in kinds)
    x = torch.randn(8, 1, 12, 12) * 2 + 1
    with torch.no_grad():
        expected = folded(x)
        error = ((quantized(x) - expected).abs().max() / expected.abs().max()).item()
    assert error < 0.1


def _trained_bn_model() -> nn.Module:
    model = models.resnet_small(width=4, depth=1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 1, 12, 12) * 2 + 1)
    return model


def test_a_batchnorm_checkpoint_loads_into_a_converted_model_layer_by_layer_all_or_nothing():
    bn_model = _trained_bn_model()
    checkpoint = bn_model.state_dict()
    model = mabn.convert_model(models.resnet_small(width=4, depth=1), "mabn", norm_batch_size=2)
    before = state_copy(model)
    with pytest.warns(UserWarning, match=r"MABN2d bn1: state dict refused, nothing loaded: missing .*forward_window"):
        result = model.load_state_dict(checkpoint, strict=False)
    # The layers that fit load (torch's convolutions); each MABN layer is left as it was (a BatchNorm's
    # variance is not MABN's second moment), its entries reported: MABN's missing, BatchNorm's unexpected.
    assert torch.equal(model.conv1.weight, checkpoint["conv1.weight"])
    for key in ("bn1.weight", "bn1.running_var", "bn1.forward_window"):
        assert torch.equal(model.state_dict()[key], before[key]), key
    assert "bn1.forward_window" in result.missing_keys and "bn1.running_mean" in result.unexpected_keys
    # strict=True: the same layers are refused, and torch raises.
    fresh = mabn.convert_model(models.resnet_small(width=4, depth=1), "mabn", norm_batch_size=2)
    untouched = {k: v.clone() for k, v in fresh.state_dict().items() if ".bn" in k or k.startswith("bn")}
    with pytest.warns(UserWarning, match="bn1: state dict refused, nothing loaded: .*unexpected running_mean"):
        with pytest.raises(RuntimeError, match='Unexpected key.*"bn1.running_mean"'):
            fresh.load_state_dict(checkpoint)
    for key, value in untouched.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # A size mismatch refuses the whole layer even non-strictly.
    bad = dict(checkpoint)
    bad["bn1.running_var"] = torch.ones(3)
    layer_before = state_copy(model.bn1)
    with pytest.raises(RuntimeError, match="size mismatch running_var"):
        model.load_state_dict(bad, strict=False)
    assert all(torch.equal(v, model.bn1.state_dict()[k]) for k, v in layer_before.items())


@pytest.mark.parametrize("layer", [mabn.MABN2d(3), mabn.GhostBatchNorm1d(3), mabn.FrozenBatchNorm2d(3)])
def test_track_running_stats_cannot_be_switched_off(layer):
    assert layer.track_running_stats is True
    layer.track_running_stats = True  # what the layer does: accepted
    with pytest.raises(
        ValueError, match=r"always keeps running statistics: track_running_stats cannot be set to False"
    ):
        layer.track_running_stats = False
    assert layer.track_running_stats is True and "track_running_stats" not in layer.__dict__


@pytest.mark.parametrize("cls,shape", [(mabn.FrozenBatchNorm1d, (4, 3, 5)), (mabn.FrozenBatchNorm2d, (4, 3, 5, 5)),
                                       (mabn.FrozenBatchNorm3d, (4, 3, 2, 5, 5))])  # fmt: skip
def test_frozen_layers_script(cls, shape):
    layer = cls(3)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2)
        layer.running_mean.normal_()
        layer.weight.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
        scripted = torch.jit.script(layer)
    x = torch.randn(*shape)
    assert_close(scripted(x), layer(x))
    with pytest.raises(Exception, match="expects"):
        scripted(torch.randn(3))
    # A frozen layer converted from a norm+activation layer applies its activation: script the fold instead.
    layer.act, layer.post_norm = nn.ReLU(), ("act",)
    with pytest.raises(TypeError, match=r"cannot be scripted: script mabn.fold\(model\)"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(layer)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: mabn.CenConv1d(3, 4, 3, padding=1), (2, 3, 7)),
        (lambda: mabn.CenConv2d(3, 4, 3, stride=2, padding_mode="reflect", padding=1), (2, 3, 7, 7)),
        (lambda: mabn.CenConv3d(3, 4, 3), (2, 3, 5, 5, 5)),
        (lambda: mabn.CenLinear(3, 4), (2, 3)),
    ],
)
def test_weight_centralized_layers_script(layer, shape):
    layer = layer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(layer)
    x = torch.randn(*shape)
    assert_close(scripted(x), layer(x))


def test_batchnorm_keyed_tools_and_what_to_use_instead():
    """What the README's list of BatchNorm-keyed tools says, checked."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4, norm_batch_size=2)).eval()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    # fuse_conv_bn_eval reads the BatchNorm attributes: exact after a plain convolution.
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    assert_close(fused(x), model(x))
    # SyncBatchNorm.convert_sync_batchnorm looks for torch's BatchNorm classes only: it leaves mabn layers
    # alone; syncing is the process_group argument of mabn.convert_model (or of the layer).
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))[1]) is mabn.MABN2d
    assert not isinstance(model[1], nn.modules.batchnorm._BatchNorm)  # so mmcv's is_norm says False
    assert mabn.is_norm_layer(model[1])  # mabn's test, for every layer the converters know
