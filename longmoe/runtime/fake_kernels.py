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


@torch.library.register_fake("longmoe::moe_dispatch_map")
def _moe_dispatch_map_fake(expert_ids, num_experts):
    # The number of kept slots (rows) is data-dependent: an unbacked symbolic size.
    rows = torch.library.get_ctx().new_dynamic_size()
    return (
        expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
        expert_ids.new_empty((rows,), dtype=torch.int64),
        expert_ids.new_empty((num_experts,), dtype=torch.int64),
    )


@torch.library.register_fake("longmoe::moe_permute")
def _moe_permute_fake(x, src_slot, topk, probs):
    return x.new_empty((src_slot.shape[0], x.shape[1]))


@torch.library.register_fake("longmoe::moe_unpermute")
def _moe_unpermute_fake(y, row_map, probs):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.register_fake("longmoe::moe_unpermute_probs_grad")
def _moe_unpermute_probs_grad_fake(dout, y, row_map):
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    return y.new_empty(tuple(row_map.shape), dtype=acc)
