"""Small models defined in the package, built from longmoe modules (used by benchmarks, examples and tests).

- :mod:`longmoe.models.byte_moe_lm`: a byte-level Llama/Mixtral-style MoE causal LM (``ByteMoELM``),
  trained here on the standard library's sources, exportable as a Hugging Face Mixtral checkpoint.
"""

from longmoe.models.byte_moe_lm import ByteMoEConfig, ByteMoELM

__all__ = ["ByteMoEConfig", "ByteMoELM"]
