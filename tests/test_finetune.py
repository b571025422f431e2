"""Fine-tuning pretrained BatchNorm models: function-preserving conversion, frozen BN, recalibration."""

import copy
import warnings

import pytest
import torch
from conftest import assert_unchanged, snapshot, state_copy
from torch import nn

import mabn
from mabn.models import resnet_small


def _pretrained(seed: int = 0, norm: str = "bn") -> nn.Module:
    """A small BN ResNet with non-trivial running statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = resnet_small(num_classes=10, in_channels=1, depth=1, width=8, norm_layer=norm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(4):
            model(torch.randn(16, 1, 12, 12) * 3 + 2)  # a non-zero mean in every layer
    return model.eval()


@pytest.mark.parametrize("norm", ["mabn", "uncentered", "uncentered_ema", "brn", "bn"])
def test_preserve_function_keeps_the_eval_output(norm):
    model = _pretrained()
    x = torch.randn(8, 1, 12, 12) * 3 + 2
    with torch.no_grad():
        expected = model(x)
        converted = mabn.convert_model(copy.deepcopy(model), norm, norm_batch_size=2, preserve="function")
        assert converted.bn1.running_var.abs().sum() > 0
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)


def test_preserve_function_formulas_and_default_seeding_differ():
    model = _pretrained()
    bn = model.bn1
    kept = mabn.convert_model(copy.deepcopy(model), "mabn", preserve="function").bn1
    torch.testing.assert_close(kept.running_var, bn.running_var)
    beta = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(kept.bias.detach(), beta.detach())
    stats = mabn.convert_model(copy.deepcopy(model), "mabn").bn1
    torch.testing.assert_close(stats.running_var, bn.running_var + bn.running_mean**2)
    torch.testing.assert_close(stats.bias.detach(), bn.bias.detach())
    x = torch.randn(4, 1, 12, 12) * 3 + 2
    with torch.no_grad():
        default = mabn.convert_model(copy.deepcopy(model), "mabn")
        assert (default(x) - model(x)).abs().max() > 1e-2  # the statistics seeding changes the function


def test_preserve_function_float64_is_exact():
    model = _pretrained().double()
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64) * 3 + 2
    with torch.no_grad():
        expected = model(x)
        converted = mabn.convert_model(copy.deepcopy(model), "mabn", preserve="function")
        torch.testing.assert_close(converted(x), expected, atol=1e-12, rtol=1e-12)


def _bad_models():
    training = _pretrained().train()
    untracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    nonfinite = _pretrained()
    nonfinite.layer2[0].bn1.running_var[1] = float("inf")
    return [
        (training, "bn1 (BatchNorm2d(8)) is in training mode"),
        (untracked, "1 (BatchNorm2d(4)) with track_running_stats=False"),
        (nonfinite, "layer2.0.bn1 (BatchNorm2d(16)): its running statistics or parameters are not finite"),
    ]


@pytest.mark.parametrize("case", range(3))
def test_preserve_function_refuses_and_leaves_the_model(case):
    model, message = _bad_models()[case]
    before, types = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mabn.convert_model(model, "mabn", preserve="function")
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_unknown_preserve_value():
    with pytest.raises(ValueError, match="preserve must be one of 'statistics', 'function', got 'weights'"):
        mabn.convert_model(_pretrained(), "mabn", preserve="weights")


@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_preserve_function_refuses_a_per_sample_norm_and_changes_nothing(norm):
    model = _pretrained()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot keep the function of bn1 \(BatchNorm2d\(8\)\): \w+ normalizes by"):
        mabn.convert_model(model, norm, preserve="function")
    assert_unchanged(model, before)
    mabn.convert_model(model, norm)  # without the promise the conversion is the user's choice


def test_preserve_function_converts_a_fresh_affine_free_batchnorm():
    # A fresh BatchNorm without affine parameters: running mean 0, so there is no shift to keep.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        converted = mabn.convert_model(model, "mabn", preserve="function")
        assert type(converted[1]) is mabn.MABN2d and converted[1].weight is None
        torch.testing.assert_close(converted(x), expected)


def test_preserve_function_refuses_a_shift_with_nowhere_to_go_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False))
    with torch.no_grad():
        model(torch.randn(8, 1, 8, 8) * 2 + 1)  # a non-zero running mean in both
    model.eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot keep the function of 2 \(BatchNorm2d\(4\)\): it shifts its output"):
        mabn.convert_model(model, "mabn", preserve="function")
    assert_unchanged(model, before)
    # A centered target keeps the mean itself: no bias needed.
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        ghost = mabn.convert_model(copy.deepcopy(model), mabn.GhostBatchNorm2d, preserve="function")
        torch.testing.assert_close(ghost(x), expected)


def test_preserve_function_takes_another_eps_into_account():
    model = _pretrained()
    x = torch.randn(4, 1, 12, 12) * 3 + 2
    with torch.no_grad():
        expected = model(x)
        converted = mabn.convert_model(copy.deepcopy(model), "mabn", eps=1e-3, preserve="function")
        assert converted.bn1.eps == 1e-3
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot keep the function of bn1 .*eps=10.0 exceeds"):
        mabn.convert_model(model, "mabn", eps=10.0, preserve="function")
    assert_unchanged(model, before)


def test_frozen_bn_loads_a_batchnorm_state_dict_and_a_refused_load_changes_nothing():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(12)
    frozen = mabn.FrozenBatchNorm2d(4)
    result = frozen.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision's does
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    # Refused loads leave every buffer as it was: a wrong shape, a missing entry, a foreign one.
    before = state_copy(frozen)
    wrong_shape = {**bn.state_dict(), "running_var": torch.ones(5), "weight": torch.zeros(4)}
    missing = {k: torch.zeros_like(v) for k, v in bn.state_dict().items() if k != "running_mean"}
    foreign = {**{k: torch.zeros_like(v) for k, v in bn.state_dict().items()}, "forward_window": torch.zeros(1)}
    for bad, message in [(wrong_shape, "size mismatch running_var"), (missing, "Missing key"),
                         (foreign, "Unexpected key")]:  # fmt: skip
        with pytest.raises(RuntimeError, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the refusals of missing and foreign entries also warn
            frozen.load_state_dict(bad)
        for key, value in before.items():
            assert torch.equal(frozen.state_dict()[key], value), (message, key)


# ---- frozen BatchNorm ---------------------------------------------------------------------------


class ForeignFrozenBN(nn.Module):
    """A frozen BN as other libraries write it (buffers only, its own class)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.eps = 1e-5

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


@pytest.mark.parametrize("dim,shape", [(1, (4, 6)), (1, (4, 6, 5)), (2, (4, 6, 3, 3)), (3, (4, 6, 2, 3, 3))])
def test_frozen_bn_is_the_eval_map_of_bn_in_both_modes(dim, shape):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    frozen = mabn.convert_model(copy.deepcopy(bn), "frozen_bn")
    assert type(frozen).__name__ == f"FrozenBatchNorm{dim}d" and not list(frozen.parameters())
    x = torch.randn(*shape, requires_grad=True)
    frozen.train()
    before = state_copy(frozen)
    y = frozen(x)
    y.sum().backward()
    torch.testing.assert_close(y, bn(x))
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())  # nothing updated


@pytest.fixture
def foreign_frozen_registered():
    """ForeignFrozenBN registered as a frozen BatchNorm for the test, and forgotten afterwards."""
    mabn.register_norm_adapter(ForeignFrozenBN, kind="frozen", dim=2)
    yield
    mabn.unregister_norm_adapter(ForeignFrozenBN)


def _with_foreign_frozen(frozen: nn.Module) -> nn.Module:
    """Swap every mabn.FrozenBatchNorm2d of ``frozen`` for the foreign class with the same buffers."""
    for name, m in list(frozen.named_modules()):
        if isinstance(m, mabn.FrozenBatchNorm2d):
            foreign = ForeignFrozenBN(m.num_features)
            foreign.load_state_dict(m.state_dict())
            parent, _, leaf = name.rpartition(".")
            frozen.get_submodule(parent)._modules[leaf] = foreign.eval()
    return frozen


def test_unregistered_foreign_frozen_bn_is_refused_and_nothing_changes():
    model = _with_foreign_frozen(mabn.convert_model(_pretrained(), "frozen_bn"))
    before, types = state_copy(model), [type(m) for m in model.modules()]
    for call in (
        lambda: mabn.convert_model(model, "mabn", norm_batch_size=2),
        lambda: mabn.recalibrate(model, [torch.randn(2, 1, 12, 12)]),
    ):
        with pytest.raises(ValueError, match=r"bn1 \(test_finetune.ForeignFrozenBN\).*register_norm_adapter"):
            call()
        assert [type(m) for m in model.modules()] == types
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # fold leaves what it does not know in place, and says so.
    folded, report = mabn.fold(model, return_report=True)
    assert report.folded == [] and "of an unknown class" in report.unfolded[0][2]


@pytest.mark.parametrize("frozen_cls", [mabn.FrozenBatchNorm2d, ForeignFrozenBN])
def test_frozen_round_trip_through_any_layer(frozen_cls, foreign_frozen_registered):
    model = _pretrained()
    x = torch.randn(4, 1, 12, 12) * 3 + 2
    with torch.no_grad():
        expected = model(x)
    frozen = mabn.convert_model(copy.deepcopy(model), "frozen_bn")
    if frozen_cls is ForeignFrozenBN:
        frozen = _with_foreign_frozen(frozen)
    norms = [m for m in frozen.modules() if type(m).__name__.endswith(("BatchNorm2d", "FrozenBN"))]
    assert norms and all(type(m) is frozen_cls and mabn.is_frozen_batch_norm(m) for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected)
        back = mabn.convert_model(copy.deepcopy(frozen), "bn").eval()
        assert isinstance(back.bn1, nn.BatchNorm2d) and back.bn1.weight.requires_grad
        torch.testing.assert_close(back(x), expected)
        kept = mabn.convert_model(copy.deepcopy(frozen), "mabn", norm_batch_size=2, preserve="function").eval()
        torch.testing.assert_close(kept(x), expected, atol=1e-5, rtol=1e-5)
        reverted = mabn.revert_model(kept)  # the classes the model had before: BN frozen by mabn, or the foreign one
        assert type(reverted.bn1) is (nn.BatchNorm2d if frozen_cls is mabn.FrozenBatchNorm2d else ForeignFrozenBN)
        torch.testing.assert_close(reverted(x), expected, atol=1e-5, rtol=1e-5)
        folded = mabn.fold(copy.deepcopy(frozen))
        assert not any(mabn.is_frozen_batch_norm(m) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_frozen_bn_bad_input():
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        mabn.FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d expects 4-D input \(N, C, H, W\), got 3-D input"):
        mabn.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="FrozenBatchNorm2d takes a Tensor, got list"):
        mabn.FrozenBatchNorm2d(3)([1, 2])
    assert mabn.create_norm_layer("frozen_bn", 4, dim=3).__class__ is mabn.FrozenBatchNorm3d


# ---- recalibration ------------------------------------------------------------------------------


def _population(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return x.mean(1), x.var(1, unbiased=True), x.square().mean(1)


@pytest.mark.parametrize(
    "norm,kwargs",
    [("bn", {}), ("bn", {"norm_batch_size": 2}), ("mabn", {"norm_batch_size": 2}), ("brn", {"norm_batch_size": 2})],
)
def test_recalibrate_gives_the_exact_population_statistics(norm, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    layer = mabn.create_norm_layer(norm, 5, **kwargs)
    model = nn.Sequential(conv, layer)
    data = [torch.randn(4, 3, 6, 6) * 2 + 5 for _ in range(7)]
    for x in data[:3]:  # some training first: windows, counters, EMA
        model(x).square().mean().backward()
    model.eval()
    kept = {k: v.clone() for k, v in layer._buffers.items() if k not in ("running_mean", "running_var")}
    mabn.recalibrate(model, [(x, torch.zeros(4)) for x in data])
    with torch.no_grad():
        mean, var, second = _population(torch.cat([conv(x) for x in data]))
    centered = not isinstance(layer, mabn.StreamNorm) or layer.config.centered
    if centered:
        torch.testing.assert_close(layer.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(layer.running_var.double(), second, atol=1e-4, rtol=1e-5)
    assert not model.training  # modes restored
    for k, v in kept.items():  # windows and counters as they were
        assert torch.equal(layer._buffers[k], v), k


def test_recalibrate_deep_model_sees_training_mode_inputs_and_restores_modes():
    model = _pretrained()
    model.layer1.train()  # a mixed mode, restored as it was
    data = [torch.randn(8, 1, 12, 12) * 3 + 2 for _ in range(3)]
    inputs = []
    hook = model.layer3[0].bn2.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    reference = copy.deepcopy(model).train()
    mabn.recalibrate(model, data)
    hook.remove()
    assert model.layer1.training and not model.training and not model.layer2.training
    # The deepest layer's statistics are those of its training-mode inputs.
    ref_inputs = []
    h = reference.layer3[0].bn2.register_forward_pre_hook(lambda m, a: ref_inputs.append(a[0].detach()))
    with torch.no_grad():
        for x in data:
            reference(x)
    h.remove()
    mean, var, _ = _population(torch.cat(ref_inputs))
    torch.testing.assert_close(model.layer3[0].bn2.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.layer3[0].bn2.running_var.double(), var, atol=1e-4, rtol=1e-5)


def test_recalibrate_bad_input_leaves_the_model():
    model = _pretrained()
    before = state_copy(model)
    with pytest.raises(ValueError, match="has no normalization layer"):
        mabn.recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="at least one batch"):
        mabn.recalibrate(model, [])
    with pytest.raises(TypeError, match="Tensors or \\(input, target\\) pairs, got str"):
        mabn.recalibrate(model, ["x"])
    with pytest.raises(ValueError, match="num_batches must be >= 1, got 0"):
        mabn.recalibrate(model, [torch.randn(2, 1, 12, 12)], num_batches=0)
    with pytest.raises(ValueError, match="running_var over the batches is not finite"):
        mabn.recalibrate(model, [torch.full((2, 1, 12, 12), float("inf"))])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recalibrate_num_batches_limits_the_data():
    model = nn.Sequential(nn.BatchNorm1d(3))
    data = [torch.randn(4, 3) + i for i in range(5)]
    mabn.recalibrate(model, iter(data), num_batches=2)
    torch.testing.assert_close(model[0].running_mean, torch.cat(data[:2]).mean(0))


@pytest.mark.parametrize("preserve", ["statistics", "function"])
@pytest.mark.parametrize("conv", [None, "centralized"])
def test_converted_pretrained_models_train_without_nan(preserve, conv):
    model = mabn.convert_model(_pretrained(), "mabn", conv=conv, preserve=preserve, norm_batch_size=2).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(40):
        x, y = torch.randn(2, 1, 12, 12) * 3 + 2, torch.randint(0, 10, (2,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
