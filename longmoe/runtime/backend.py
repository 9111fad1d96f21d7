"""Backend registry: which implementation of an op runs for given tensors.

Three backends exist for every op:

* ``native``    C++ CPU kernels (``torch.ops.longmoe.*``), the default for CPU tensors;
* ``triton``    Triton kernels, the default for CUDA tensors (on CPU only under ``TRITON_INTERPRET=1``);
* ``reference`` pure PyTorch, always available, what tests compare against.

The choice follows the tensors' device. ``LONGMOE_BACKEND=reference|native|triton`` or the
``use_backend(...)`` context manager forces one; an explicit ``backend=`` argument wins over both.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

import torch

from longmoe.runtime.native import native_available

__all__ = ["Backend", "BACKENDS", "select_backend", "use_backend", "triton_available", "triton_interpreting"]

Backend = Literal["reference", "native", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "native", "triton")
_forced: list[str] = []


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (GPU path, or CPU under the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (nested blocks: innermost wins)."""
    _check_name(name, "use_backend(name)")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _check_name(name: str, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what}={name!r} is not a backend; expected one of {BACKENDS}")


def select_backend(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs an op on ``tensors`` (all on one device; checked by the caller).

    Order: explicit ``backend`` argument, then ``use_backend``, then ``LONGMOE_BACKEND``, then the
    device default (CPU -> native if built else reference; CUDA -> triton if installed else reference).
    A forced backend that cannot run raises instead of silently falling back.
    """
    name = backend or (_forced[-1] if _forced else None) or os.environ.get("LONGMOE_BACKEND") or None
    device = tensors[0].device.type if tensors else "cpu"
    if name is None:
        if device == "cpu":
            return "native" if native_available() else "reference"
        if device == "cuda":
            return "triton" if triton_available() else "reference"
        return "reference"
    _check_name(name, "backend")
    if name == "native":
        if device != "cpu":
            raise ValueError(f"backend='native' runs CPU tensors only; got tensors on {device}")
        if not native_available():
            raise RuntimeError(
                "backend='native' requested but longmoe._C is not built (see the warning above)"
            )
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but the triton package is not installed")
        if device == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
    return name
