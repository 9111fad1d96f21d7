"""Small models built from configs, for the examples, tests and benchmarks (no downloads)."""

from longmoe.models.llama_moe import CoreAttention, LlamaMoE, LlamaMoEConfig, rotary

__all__ = ["CoreAttention", "LlamaMoE", "LlamaMoEConfig", "rotary"]
