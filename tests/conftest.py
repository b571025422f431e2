import pytest
import torch


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
def fashion_mnist_dir():
    """The Fashion-MNIST directory; tests that need the real data skip, saying how to install it."""
    from mabn.apps.data import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (bash scripts/setup.sh installs it)")
    return FASHION_MNIST_DIR
