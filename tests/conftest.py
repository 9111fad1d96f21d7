"""Shared test setup.

Triton kernels only run on this project's CPU machines through the interpreter, and ``triton.jit`` reads
TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test imports one. On a
machine with CUDA the same tests run the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
