"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test with one torch thread (bit-stable numbers whatever the machine's cores), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
