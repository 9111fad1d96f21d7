"""Fake (meta) kernels for ``torch.ops.longmoe.*`` so ``torch.compile`` can trace through them.

An op missing from the loaded extension (a ``longmoe._C`` built from older sources than this package) is
reported in one warning instead of breaking ``import longmoe``; calling it would fail anyway.
"""

from __future__ import annotations

import warnings

import torch

_missing: list[str] = []


def _fake(name: str):
    def register(fn):
        if hasattr(torch.ops.longmoe, name):
            torch.library.register_fake(f"longmoe::{name}")(fn)
        else:
            _missing.append(name)
        return fn

    return register


@_fake("flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, block_mask, block_size, causal, softmax_scale, out_dtype=None):
    b, sq, hq, _ = q.shape
    out = torch.empty_like(q, dtype=out_dtype or q.dtype, memory_format=torch.contiguous_format)
    return out, q.new_empty((b, hq, sq), dtype=torch.float32)


@_fake("flash_attn_bwd")
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, block_mask, block_size, causal, softmax_scale, delta=None, grad_dtype=None
):
    like = lambda t: torch.empty_like(t, dtype=grad_dtype or t.dtype, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v)


@_fake("moe_dispatch_map")
def _moe_dispatch_map_fake(expert_ids, num_experts):
    # The number of kept slots (rows) is data-dependent: an unbacked symbolic size.
    rows = torch.library.get_ctx().new_dynamic_size()
    return (
        expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
        expert_ids.new_empty((rows,), dtype=torch.int64),
        expert_ids.new_empty((num_experts,), dtype=torch.int64),
    )


@_fake("moe_permute")
def _moe_permute_fake(x, src_slot, topk, probs):
    return x.new_empty((src_slot.shape[0], x.shape[1]))


@_fake("moe_unpermute")
def _moe_unpermute_fake(y, row_map, probs):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@_fake("moe_unpermute_probs_grad")
def _moe_unpermute_probs_grad_fake(dout, y, row_map):
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    return y.new_empty(tuple(row_map.shape), dtype=acc)


@_fake("xattn_block_scores")
def _xattn_block_scores_fake(q, k, stride, block_size, causal, q_offset, softmax_scale=None):
    nqb, nkb = -(-q.shape[1] // block_size), -(-k.shape[1] // block_size)
    return q.new_empty((q.shape[0], q.shape[2], nqb, nkb), dtype=torch.float32)


if _missing:
    warnings.warn(
        f"longmoe._C lacks the ops {_missing}: it was built from older sources than this package; rebuild with "
        "`pip install --no-build-isolation -e .` (or `make venv`)",
        RuntimeWarning,
        stacklevel=2,
    )
