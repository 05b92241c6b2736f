"""Shared fixtures: tiny architectures and small inputs keep the whole suite to minutes on 2 cores."""
import os
import sys
import warnings

# Triton kernels (davit_mm.ops' CUDA depth-wise convolution) run in Triton's interpreter on CPU
# tensors. It must be on before Triton is first imported: Triton's own library functions are
# built for the interpreter or for the GPU compiler at that import.
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import REPO, TINY_ARCH  # noqa: E402

if REPO not in sys.path:  # the checkout, not whatever davit_mm an environment may hold
    sys.path.insert(0, REPO)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs of the real tools (tens of seconds)')
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    # At most 2 threads, and the cores shared among pytest-xdist's workers (tools/run_tests.sh).
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)) // workers)))


@pytest.fixture
def tiny_arch():
    return dict(TINY_ARCH)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
