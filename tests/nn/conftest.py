import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run tiny models (often in float64), where a second OpenMP thread only adds
    synchronisation: on a busy 2-core machine a float64 GEMV then takes milliseconds, not microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
