"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tests' tensors are small: on a 2-core machine torch's thread pool only adds contention
    (measured 20-70x slower with other work on the cores), so every module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
