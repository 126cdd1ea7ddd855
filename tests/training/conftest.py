"""One intra-op thread for the tiny models here: on a busy 2-core machine, two threads waiting
for each other make every small op several times slower than one thread alone."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
