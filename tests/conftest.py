"""Shared test setup.

Triton kernels only run on this project's CPU machines through the interpreter, and ``triton.jit`` reads
TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test imports one. On a
machine with CUDA the same tests run the compiled kernels on the GPU.

Measured topologies and kernel profiles go to a cache directory of this test session (spawned ranks
inherit it), not the user's ~/.cache/longmoe: a run's tests share what they measure, runs do not.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LONGMOE_CACHE_DIR"] = tempfile.mkdtemp(prefix="longmoe-test-cache-")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
