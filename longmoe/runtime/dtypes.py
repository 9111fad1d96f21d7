"""The one accumulation-dtype rule: sums, softmax statistics and gradients accumulate in fp32, or in fp64
when the inputs are fp64 (so fp64 oracles and fp64 users keep their precision)."""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """``torch.float64`` if any of ``dtypes`` is fp64, else ``torch.float32``."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
