"""Loader for the native CPU extension ``longmoe._C`` (C++ kernels registered as ``torch.ops.longmoe.*``)."""

from __future__ import annotations

import functools
import os
import warnings

__all__ = ["load_native", "native_available", "native_build_info", "register_fake"]

_FAKES: dict[str, object] = {}


def register_fake(name: str):
    """Decorator: ``fn`` is the fake (meta) kernel of ``torch.ops.longmoe.<name>``, so ``torch.compile``
    can trace the op. Each op module registers its own, beside its entry point; they are attached when the
    extension loads (:func:`load_native`). An op missing from the loaded extension (a ``longmoe._C`` built
    from older sources) is reported in one warning instead of breaking ``import longmoe``."""

    def register(fn):
        _FAKES[name] = fn
        if load_native.cache_info().currsize and load_native() is not None:  # already loaded: attach now
            _attach({name: fn})
        return fn

    return register


def _attach(fakes: dict) -> None:
    import torch  # noqa: PLC0415

    missing = []
    for name, fn in fakes.items():
        if hasattr(torch.ops.longmoe, name):
            torch.library.register_fake(f"longmoe::{name}")(fn)
        else:
            missing.append(name)
    if missing:
        warnings.warn(
            f"longmoe._C lacks the ops {missing}: it was built from older sources than this package; rebuild "
            "with `pip install --no-build-isolation -e .` (or `make venv`)",
            RuntimeWarning,
            stacklevel=3,
        )


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
    _attach(_FAKES)  # the op modules' fake kernels, registered before the library was loaded
    return _C


def native_available() -> bool:
    """True when ``torch.ops.longmoe.*`` C++ kernels are loaded."""
    return load_native() is not None


def native_build_info() -> dict:
    """Compiler flags and BLAS the extension was built with (empty dict when not built)."""
    mod = load_native()
    return dict(mod.build_info()) if mod is not None else {}
