"""Fixtures and helpers shared by the test files (import the helpers with ``from conftest import ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import onnxruntime
import pytest
import torch
from torch import nn

import mabn


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # The tests use small tensors, which gain nothing from intra-op threads; on a machine whose
    # cores are busy, the thread pool's synchronization makes them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST directory; tests that need the real data skip, saying how to install it."""
    from mabn.apps.data import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (bash scripts/setup.sh installs it)")
    return FASHION_MNIST_DIR


class Snapshot(NamedTuple):
    """A copy of a model's state dict, its modules' types and ``.training`` flags, and which parameter
    objects it holds (a conversion that changes nothing keeps the very same ``nn.Parameter`` objects)."""

    state: dict[str, torch.Tensor]
    modules: list[tuple[type[nn.Module], bool]]
    params: list[int]


def snapshot(model: nn.Module) -> Snapshot:
    """What :func:`assert_unchanged` compares against later."""
    return Snapshot(
        state_copy(model), [(type(m), m.training) for m in model.modules()], [id(p) for p in model.parameters()]
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    """Every state-dict entry equal (bit for bit), the same module types, ``.training`` flags and parameters."""
    after = model.state_dict()
    assert after.keys() == before.state.keys()
    for key, value in before.state.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert [(type(m), m.training) for m in model.modules()] == before.modules
    assert [id(p) for p in model.parameters()] == before.params


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every state-dict entry."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def buffer_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer, the non-persistent ones (an accumulating step's pending sums) included."""
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def run_onnx(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """The output of the ONNX model at ``path`` on ``x``, run by onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (mabn.StreamNorm, nn.modules.batchnorm._BatchNorm))]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random affine parameters, running statistics of a real batch (momentum 1), then perturbed."""
    for m in _norm_layers(model):
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
        m.momentum = 1.0
    model.train()
    model(x)
    for m in _norm_layers(model):
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
        if m.running_mean is not None:
            m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1)
    return model.eval()


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error relative to the largest output."""
    return ((got - expected).abs().max() / expected.abs().max()).item()
