"""Inference across ranks: a sharded KV cache, decode attention over it, and ``generate`` for Hugging Face
causal LMs (sequence-parallel prefill, TokenRing-style decoding). Needs ``transformers``."""

from longmoe.inference.cache import ShardedKVCache, balanced_owner
from longmoe.inference.decode import (
    DECODE_MERGES,
    DecodeError,
    choose_decode_merge,
    decode_bytes,
    decode_merge_time,
    merge_sends,
    sharded_decode_attention,
)
from longmoe.inference.generation import (
    SHARDED_ATTENTION_NAME,
    disable_sharded_generate,
    enable_sharded_generate,
    generate,
    register_sharded_attention,
)

__all__ = [
    "ShardedKVCache",
    "balanced_owner",
    "DecodeError",
    "decode_bytes",
    "DECODE_MERGES",
    "choose_decode_merge",
    "decode_merge_time",
    "merge_sends",
    "sharded_decode_attention",
    "generate",
    "enable_sharded_generate",
    "disable_sharded_generate",
    "register_sharded_attention",
    "SHARDED_ATTENTION_NAME",
]
