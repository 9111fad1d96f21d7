"""Small models defined in the package, built from longmoe modules (used by benchmarks, examples and tests;
built from configs, no downloads).

- :mod:`longmoe.models.llama_moe`: ``LlamaMoE``, a Llama-style MoE decoder whose attention core and MoE
  layers :mod:`longmoe.parallelize` makes sequence- and expert-parallel.
- :mod:`longmoe.models.byte_moe_lm`: a byte-level Llama/Mixtral-style MoE causal LM (``ByteMoELM``),
  trained here on the standard library's sources, exportable as a Hugging Face Mixtral checkpoint (the
  slimming teacher).

Submodules are imported on use, so ``python -m longmoe.models.byte_moe_lm`` runs without a double import.
"""

from __future__ import annotations

_EXPORTS = {
    "ByteMoEConfig": "byte_moe_lm",
    "ByteMoELM": "byte_moe_lm",
    "CoreAttention": "llama_moe",
    "LlamaMoE": "llama_moe",
    "LlamaMoEConfig": "llama_moe",
    "rotary": "llama_moe",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"longmoe.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'longmoe.models' has no attribute {name!r}")
