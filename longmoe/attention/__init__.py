"""Attention core: flash attention with log-sum-exp (dense or block-sparse), the partial merge, and the
XAttention estimator with block-sparse attention."""

from longmoe.attention.flash_attention import (
    FlashAttentionFunction,
    attention_delta,
    expand_block_mask,
    flash_attention,
    flash_attention_backward,
    flash_attention_backward_ref,
    flash_attention_forward,
    flash_attention_ref,
)
from longmoe.attention.hf import register_hf_attention, set_xattention_thresholds
from longmoe.attention.merge import (
    merge_attention_partials,
    merge_attention_partials_,
    merge_attention_partials_ref,
)
from longmoe.attention.xattention import (
    XAttentionConfig,
    block_sparse_attention,
    xattention,
    xattention_estimate,
    xattention_estimate_ref,
    xattention_sdpa,
)
from longmoe.attention.xattention_calibrate import (
    calibrate_thresholds,
    load_thresholds,
    save_thresholds,
    true_block_mass,
)

__all__ = [
    "FlashAttentionFunction",
    "attention_delta",
    "expand_block_mask",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_backward_ref",
    "flash_attention_forward",
    "flash_attention_ref",
    "merge_attention_partials",
    "merge_attention_partials_",
    "merge_attention_partials_ref",
    "block_sparse_attention",
    "XAttentionConfig",
    "xattention",
    "xattention_estimate",
    "xattention_estimate_ref",
    "calibrate_thresholds",
    "load_thresholds",
    "save_thresholds",
    "true_block_mass",
    "register_hf_attention",
    "set_xattention_thresholds",
    "xattention_sdpa",
]
