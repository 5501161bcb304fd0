"""Shared settings for the torch tests: tiny models and one intra-op thread for every module
(the tensors are small; OpenMP spinning on a shared 2-core machine costs more than it saves)."""

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
