"""Loader for the native CPU extension ``longmoe._C`` (C++ kernels registered as ``torch.ops.longmoe.*``)."""

from __future__ import annotations

import functools
import os
import warnings

__all__ = ["load_native", "native_available", "native_build_info"]


@functools.cache
def load_native():
    """Import ``longmoe._C`` once; return the module, or None (with one warning) when it is missing.

    ``LONGMOE_SKIP_NATIVE=1`` at build time produces a package without the extension; then every op
    falls back to the pure-PyTorch reference backend.
    """
    try:
        from longmoe import _C  # noqa: PLC0415  (loading registers torch.ops.longmoe.*)
    except ImportError as exc:
        reason = (
            "built with LONGMOE_SKIP_NATIVE=1" if os.environ.get("LONGMOE_SKIP_NATIVE") == "1" else str(exc)
        )
        warnings.warn(
            f"longmoe: native CPU extension longmoe._C is not available ({reason}); CPU ops use the "
            "pure-PyTorch reference backend, which is correct but slow. Rebuild with "
            "`pip install --no-build-isolation -e .` to get the C++ kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    from longmoe.runtime import fake_kernels  # noqa: F401,PLC0415  (fake kernels for torch.compile)

    return _C


def native_available() -> bool:
    """True when ``torch.ops.longmoe.*`` C++ kernels are loaded."""
    return load_native() is not None


def native_build_info() -> dict:
    """Compiler flags and BLAS the extension was built with (empty dict when not built)."""
    mod = load_native()
    return dict(mod.build_info()) if mod is not None else {}
