import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

# Tests are small; two threads match the CI machine and keep xdist workers from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)

# Without a GPU, Triton kernels (chapter 09) run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
