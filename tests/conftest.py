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
