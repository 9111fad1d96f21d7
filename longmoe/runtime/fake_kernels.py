"""Fake (meta) kernels for ``torch.ops.longmoe.*`` so ``torch.compile`` can trace through them."""

from __future__ import annotations

import torch


@torch.library.register_fake("longmoe::flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, block_mask, block_size, causal, softmax_scale, out_dtype=None):
    b, sq, hq, _ = q.shape
    out = torch.empty_like(q, dtype=out_dtype or q.dtype, memory_format=torch.contiguous_format)
    return out, q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.register_fake("longmoe::flash_attn_bwd")
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, block_mask, block_size, causal, softmax_scale, delta=None, grad_dtype=None
):
    like = lambda t: torch.empty_like(t, dtype=grad_dtype or t.dtype, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v)

