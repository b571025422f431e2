"""The norm adapters: which layers the converters know, what they keep, and what they refuse."""

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.testing import assert_close

import mabn
from mabn.adapters import find_norm_adapter, norm_adapters


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters in every BatchNorm, then evaluation mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class BatchNormPReLU(nn.BatchNorm2d):
    """A norm+activation layer as timm writes them: BatchNorm, then dropout, then a (learnable) activation."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.PReLU(num_features, init=0.1)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class SwishBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: unknown unless registered."""

    def forward(self, x):
        y = super().forward(x)
        return y * torch.sigmoid(y)


class PlainSubclass(nn.BatchNorm2d):
    """A BatchNorm2d subclass without its own forward: the converters treat it as a BatchNorm2d."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-3)
        self.tag = "mine"


@pytest.fixture
def norm_prelu_registered():
    mabn.register_norm_adapter(BatchNormPReLU, post_norm=("drop", "act"))
    yield
    mabn.unregister_norm_adapter(BatchNormPReLU)


def _net(norm_cls) -> nn.Module:
    return _randomize(nn.Sequential(nn.Conv2d(3, 6, 3), norm_cls(6), nn.Conv2d(6, 4, 1), norm_cls(4)))


def test_unknown_subclass_with_its_own_forward_is_refused_and_nothing_changes():
    model = _net(SwishBatchNorm)
    model[0] = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))  # a known layer before it
    _randomize(model)
    before = snapshot(model)
    pattern = r"cannot convert 1 \(test_adapters.SwishBatchNorm\).*register_norm_adapter\(SwishBatchNorm"
    with pytest.raises(ValueError, match=pattern):
        mabn.convert_model(model, "mabn", norm_batch_size=2, preserve="function")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"cannot recalibrate 1 \(test_adapters.SwishBatchNorm\)"):
        mabn.recalibrate(model, [torch.randn(2, 3, 8, 8)])
    assert_unchanged(model, before)
    # fold leaves it where it is (no silent change) and reports why.
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0.0", "0.1")]
    assert ("1", "SwishBatchNorm") in [(n, c) for n, c, _ in report.unfolded]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_subclass_without_forward_is_its_base_class_and_comes_back():
    model = _net(PlainSubclass)
    assert find_norm_adapter(model[1]) is norm_adapters()["torch.nn.modules.batchnorm.BatchNorm2d"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        mabn.convert_model(model, "mabn", norm_batch_size=2, preserve="function")
        assert type(model[1]) is mabn.MABN2d and model[1].eps == 1e-3
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        back = mabn.revert_model(model)
    assert type(back[1]) is PlainSubclass and back[1].tag == "mine" and back[1].eps == 1e-3
    with torch.no_grad():
        assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
    PlainSubclass(6).load_state_dict(back[1].state_dict(), strict=True)


def test_a_norm_act_layer_keeps_its_activation_trains_folds_and_comes_back(norm_prelu_registered):
    model = _net(BatchNormPReLU)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    act = model[1].act
    # The original folds too: the activation stays after the folded convolution.
    folded = mabn.fold(model)
    assert type(folded[1]) is nn.Sequential and type(folded[1].act) is nn.PReLU
    with torch.no_grad():
        assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    mabn.convert_model(model, "mabn", norm_batch_size=2, preserve="function")
    layer = model[1]
    assert type(layer) is mabn.MABN2d and layer.post_norm == ("drop", "act") and layer.act is act
    assert "1.act.weight" in model.state_dict()  # the same keys as the original layer's
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # It trains: the activation's parameter learns with the rest.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    assert act.weight.grad is not None and act.weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
    # It folds into the convolution, and the activation stays (never an Identity in its place).
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [("0", "1"), ("2", "3")] and report.unfolded == []
    assert type(folded[1]) is nn.Sequential and list(folded[1]._modules) == ["drop", "act"]
    assert type(folded[1].act) is nn.PReLU
    with torch.no_grad():
        assert_close(folded(x), trained, atol=1e-5, rtol=1e-5)
    # It reverts to the original class, whose state dict loads strictly into a fresh model.
    back = mabn.revert_model(copy.deepcopy(model))
    assert type(back[1]) is BatchNormPReLU and back[1].act is not None
    with torch.no_grad():
        assert_close(back(x), trained, atol=1e-5, rtol=1e-5)
    _net(BatchNormPReLU).load_state_dict(back.state_dict(), strict=True)


def test_a_norm_act_layer_into_layers_that_cannot_hold_the_activation(norm_prelu_registered):
    model = _net(BatchNormPReLU)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    # torch's BatchNorm cannot apply an activation: "bn" gives the same math as ghost BN over the batch.
    bn = mabn.convert_model(copy.deepcopy(model), "bn", preserve="function")
    assert type(bn[1]) is mabn.GhostBatchNorm2d and bn[1].norm_batch_size is None and bn[1].post_norm
    with torch.no_grad():
        assert_close(bn(x), expected, atol=1e-5, rtol=1e-5)
    # A frozen layer of this package keeps it too.
    frozen = mabn.convert_model(copy.deepcopy(model), "frozen_bn")
    assert type(frozen[1]) is mabn.FrozenBatchNorm2d and frozen[1].post_norm == ("drop", "act")
    with torch.no_grad():
        assert_close(frozen(x), expected, atol=1e-5, rtol=1e-5)
    assert type(mabn.revert_model(frozen)[1]) is BatchNormPReLU
    # GroupNorm cannot: refused, naming the layer, and nothing changes.
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"cannot convert 1 \(BatchNormPReLU\(6\)\) to GroupNorm: it applies drop, act"
    ):
        mabn.convert_model(model, "gn")
    assert_unchanged(model, before)


def test_kind_keep_leaves_the_layers_as_they_are():
    model = _net(SwishBatchNorm)
    mabn.register_norm_adapter(SwishBatchNorm, kind="keep")
    try:
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            expected = model(x)
        mabn.convert_model(model, "mabn")
        assert type(model[1]) is SwishBatchNorm
        folded, report = mabn.fold(model, return_report=True)
        assert [reason for _, _, reason in report.unfolded][0] == "registered with kind='keep': left as it is"
        with torch.no_grad():
            assert_close(folded(x), expected)
    finally:
        mabn.unregister_norm_adapter(SwishBatchNorm)


class StateBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass without its own forward that holds more state than a BatchNorm."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_buffer("scale_history", torch.zeros(3))


def test_state_a_converted_layer_would_lose_is_refused():
    model = _net(StateBatchNorm)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot convert 1 \(StateBatchNorm\(6\)\): it holds scale_history"):
        mabn.convert_model(model, "mabn")
    assert_unchanged(model, before)


def test_detectron2_frozen_batchnorm_is_known_by_name_and_structure():
    # detectron2 is not installed here: a stand-in with the same module path, buffers and attributes.
    class FrozenBatchNorm2d(nn.Module):
        _version = 3

        def __init__(self, num_features, eps=1e-5):
            super().__init__()
            self.num_features, self.eps = num_features, eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features) - eps)

        def forward(self, x):
            stats = (self.running_mean, self.running_var, self.weight, self.bias)
            return nn.functional.batch_norm(x, *stats, training=False, eps=self.eps)

    FrozenBatchNorm2d.__module__, FrozenBatchNorm2d.__qualname__ = "detectron2.layers.batch_norm", "FrozenBatchNorm2d"
    stand_in = FrozenBatchNorm2d(6)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(stand_in, name).normal_()
        stand_in.running_var.uniform_(0.5, 2)
    assert mabn.is_frozen_batch_norm(stand_in)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), stand_in).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        folded = mabn.fold(model)
        assert [type(m) for m in folded] == [nn.Conv2d, nn.Identity]
        assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
        converted = mabn.convert_model(copy.deepcopy(model), "mabn", norm_batch_size=2, preserve="function")
        assert type(converted[1]) is mabn.MABN2d and converted[1].weight.requires_grad
        assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
        back = mabn.revert_model(converted)
        assert type(back[1]) is FrozenBatchNorm2d and back[1].num_features == 6 and not list(back[1].parameters())
        assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
    # The same name with another structure is refused, not guessed.
    del stand_in._buffers["running_mean"]
    with pytest.raises(ValueError, match=r"no buffer running_mean \(registered as kind='frozen'\)"):
        mabn.convert_model(nn.Sequential(stand_in), "mabn")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"kind": "frozen_bn"}, ValueError, "kind must be one of 'batch_norm', 'frozen', 'keep', got 'frozen_bn'"),
        ({"post_norm": "act"}, TypeError, "post_norm must be a tuple of child names"),
        ({"post_norm": ("act.0",)}, ValueError, "post_norm names must be identifiers"),
        ({"dim": 4}, ValueError, "dim must be 1, 2, 3 or None, got 4"),
        ({"rebuild": "BatchNormPReLU"}, TypeError, "rebuild must be callable"),
    ],
)
def test_register_bad_arguments(kwargs, exc, match):
    before = norm_adapters()
    with pytest.raises(exc, match=match):
        mabn.register_norm_adapter(BatchNormPReLU, **kwargs)
    assert norm_adapters() == before
    with pytest.raises(TypeError, match="cls must be a class"):
        mabn.register_norm_adapter(3)
    with pytest.raises(ValueError, match="no norm adapter is registered for test_adapters.SwishBatchNorm"):
        mabn.unregister_norm_adapter(SwishBatchNorm)


def test_a_custom_rebuild_builds_the_original():
    calls = []

    def rebuild(values, post_norm):
        calls.append((type(values), sorted(post_norm)))
        new = BatchNormPReLU(values.num_features)
        new.load_state_dict(values.state_dict(), strict=False)
        new.act = post_norm["act"]
        return new

    mabn.register_norm_adapter(BatchNormPReLU, post_norm=("drop", "act"), rebuild=rebuild)
    try:
        model = _net(BatchNormPReLU)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            expected = model(x)
            back = mabn.revert_model(mabn.convert_model(model, "mabn", preserve="function"))
            assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
        assert calls == [(nn.BatchNorm2d, ["act", "drop"])] * 2 and type(back[3]) is BatchNormPReLU
    finally:
        mabn.unregister_norm_adapter(BatchNormPReLU)


def test_lazy_batchnorm_must_be_initialized_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="not initialized yet; run one forward first"):
        mabn.convert_model(model, "mabn")
    model(torch.randn(2, 3, 6, 6))
    assert type(mabn.convert_model(model, "mabn")[1]) is mabn.MABN2d
