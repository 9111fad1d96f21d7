"""Small models defined in the package, built from longmoe modules (used by benchmarks, examples and tests).

- :mod:`longmoe.models.byte_moe_lm`: a byte-level Llama/Mixtral-style MoE causal LM (``ByteMoELM``),
  trained here on the standard library's sources, exportable as a Hugging Face Mixtral checkpoint.

Submodules are imported on use, so ``python -m longmoe.models.byte_moe_lm`` runs without a double import.
"""

from __future__ import annotations

__all__ = ["ByteMoEConfig", "ByteMoELM"]


def __getattr__(name: str):
    if name in __all__:
        from longmoe.models import byte_moe_lm

        return getattr(byte_moe_lm, name)
    raise AttributeError(f"module 'longmoe.models' has no attribute {name!r}")
