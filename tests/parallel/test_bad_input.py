"""Sequence-parallel bad input: every case raises an error that names the argument, its value and what was
expected (single process; the cross-rank cases are in test_sequence_parallel.py's spawned test)."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention import XAttentionConfig
from longmoe.parallel import (
    AttentionShape,
    SequenceParallelAttention,
    ShardLayout,
    kv_ring_attention,
    ring_schedule,
    sequence_parallel_attention,
    sequence_parallel_sdpa,
    shard_bounds,
    shard_positions,
    shard_sequence,
    token_ring_attention,
    ulysses_attention,
    unshard_sequence,
)
from longmoe.parallelize import ParallelConfig
from longmoe.runtime import all_to_all

q = torch.randn(1, 8, 4, 16)
kv = torch.randn(1, 8, 2, 16)
qs, kvs = q.transpose(1, 2), kv.transpose(1, 2)  # SDPA layout
shape = dict(world_size=2, batch=1, seqlen_local=8, heads_q=4, heads_kv=2, head_dim=16)

CASES = {
    # (callable, exception, words the message must contain)
    "q 3-D": (lambda: token_ring_attention(q[0], kv, kv), ValueError, ["q must be", "(8, 4, 16)"]),
    "k 5-D": (lambda: kv_ring_attention(q, kv[None], kv), ValueError, ["k must be", "(1, 1, 8, 2, 16)"]),
    "k v differ": (lambda: token_ring_attention(q, kv, kv[:, :, :1]), ValueError, ["k and v", "(1, 8, 1, 16)"]),
    "seqlen differs": (lambda: token_ring_attention(q, kv[:, :6], kv[:, :6]), ValueError, ["seqlen_local", "(1, 6, 2, 16)"]),
    "head_dim differs": (lambda: kv_ring_attention(q, kv[..., :8], kv[..., :8]), ValueError, ["head_dim", "(1, 8, 2, 8)"]),
    "GQA ratio": (lambda: token_ring_attention(torch.randn(1, 8, 3, 16), kv, kv), ValueError, ["heads_q=3", "heads_kv=2"]),
    "zero kv heads": (lambda: kv_ring_attention(q, kv[:, :, :0], kv[:, :, :0]), ValueError, ["heads_kv=0"]),
    "dtype mix": (lambda: token_ring_attention(q, kv.double(), kv.double()), TypeError, ["float32", "float64"]),
    "odd zigzag": (lambda: token_ring_attention(q[:, :7], kv[:, :7], kv[:, :7]), ValueError, ["seqlen_local=7", "zigzag"]),
    "layout": (lambda: kv_ring_attention(q, kv, kv, layout="striped"), ValueError, ["layout='striped'", "zigzag"]),
    "ulysses layout": (lambda: ulysses_attention(q, kv, kv, layout="diagonal"), ValueError, ["layout='diagonal'"]),
    "softmax_scale 0": (lambda: token_ring_attention(q, kv, kv, softmax_scale=0.0), ValueError, ["softmax_scale", "0.0"]),
    "softmax_scale < 0": (lambda: kv_ring_attention(q, kv, kv, softmax_scale=-1.0), ValueError, ["softmax_scale", "-1.0"]),
    "partial_dtype": (lambda: token_ring_attention(q, kv, kv, partial_dtype=torch.float16), TypeError, ["partial_dtype", "float16"]),
    "algorithm": (lambda: sequence_parallel_attention(q, kv, kv, algorithm="ring"), ValueError, ["algorithm='ring'", "kv_ring"]),
    "module algorithm": (lambda: SequenceParallelAttention(algorithm="fast"), ValueError, ["algorithm='fast'"]),
    "module layout": (lambda: SequenceParallelAttention(layout="rows"), ValueError, ["layout='rows'"]),
    "ulysses packed": (lambda: sequence_parallel_attention(q, kv, kv, algorithm="ulysses", cu_seqlens=torch.tensor([0, 8])), ValueError, ["ulysses", "cu_seqlens"]),
    "packed batch 2": (lambda: token_ring_attention(torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), cu_seqlens=torch.tensor([0, 8])), ValueError, ["batch 1", "batch=2"]),
    "packed wrong length": (lambda: kv_ring_attention(q, kv, kv, cu_seqlens=torch.tensor([0, 5, 9])), ValueError, ["cu_seqlens", "8 tokens", "9"]),
    "cu_seqlens start": (lambda: token_ring_attention(q, kv, kv, cu_seqlens=torch.tensor([1, 8])), ValueError, ["cu_seqlens", "start at 0", "[1, 8]"]),
    "cu_seqlens decreasing": (lambda: token_ring_attention(q, kv, kv, cu_seqlens=torch.tensor([0, 6, 4])), ValueError, ["non-decreasing", "[0, 6, 4]"]),
    "sdpa mask": (lambda: sequence_parallel_sdpa(qs, kvs, kvs, attn_mask=torch.ones(8, 8, dtype=torch.bool), enable_gqa=True), ValueError, ["attn_mask"]),
    "sdpa dropout": (lambda: sequence_parallel_sdpa(qs, kvs, kvs, dropout_p=0.1, enable_gqa=True), ValueError, ["dropout_p", "0.1"]),
    "sdpa gqa": (lambda: sequence_parallel_sdpa(qs, kvs, kvs), ValueError, ["4 heads", "2", "enable_gqa=True"]),
    "shard not divisible": (lambda: shard_sequence(torch.randn(1, 10, 2), None, "zigzag", rank=0, world_size=2), ValueError, ["10", "divisible by 4", "zigzag"]),
    "shard rank": (lambda: shard_sequence(torch.randn(1, 8, 2), None, rank=3, world_size=2), ValueError, ["rank 3", "size 2"]),
    "shard layout": (lambda: shard_sequence(torch.randn(1, 8, 2), None, "spiral", rank=0, world_size=2), ValueError, ["layout='spiral'"]),
    "shard cu_seqlens total": (lambda: shard_sequence(torch.randn(1, 8, 2), None, rank=0, world_size=2, cu_seqlens=torch.tensor([0, 5])), ValueError, ["5 tokens", "8"]),
    "shard world 0": (lambda: shard_positions(8, 0, 0), ValueError, ["world_size", "0"]),
    "bounds layout": (lambda: shard_bounds(8, 0, 2, "rows"), ValueError, ["layout='rows'"]),
    "unshard layout": (lambda: unshard_sequence(torch.randn(1, 8), None, "rows"), ValueError, ["layout='rows'"]),
    "layout make": (lambda: ShardLayout.make(2, "x", seqlen_local=4), ValueError, ["layout='x'"]),
    "schedule algorithm": (lambda: ring_schedule("ulysses", ShardLayout.make(2, "zigzag", seqlen_local=4), True, 0), ValueError, ["algorithm='ulysses'", "token_ring"]),
    "schedule rank": (lambda: ring_schedule("token_ring", ShardLayout.make(2, "zigzag", seqlen_local=4), True, 2), ValueError, ["rank=2", "2 ranks"]),
    "shape world 0": (lambda: AttentionShape(**{**shape, "world_size": 0}), ValueError, ["world_size must be >= 1", "0"]),
    "shape heads": (lambda: AttentionShape(**{**shape, "heads_q": 3}), ValueError, ["heads_q=3", "heads_kv=2"]),
    "config sp": (lambda: ParallelConfig(sequence_parallel_size=0), ValueError, ["sequence_parallel_size=0"]),
    "config algorithm": (lambda: ParallelConfig(algorithm="ring"), ValueError, ["algorithm='ring'"]),
    "all_to_all splits": (lambda: all_to_all(torch.zeros(3, 2), [3], [2]), ValueError, ["input_splits=[2]", "3"]),
    "sparse ring": (lambda: sequence_parallel_attention(q, kv, kv, algorithm="token_ring", sparse=XAttentionConfig()), ValueError, ["algorithm='token_ring'", "sparse", "'ulysses'"]),
    "sparse module ring": (lambda: SequenceParallelAttention(algorithm="kv_ring", sparse=XAttentionConfig()), ValueError, ["algorithm='kv_ring'", "'ulysses'"]),
    "sparse packed": (lambda: sequence_parallel_attention(q, kv, kv, sparse=XAttentionConfig(), cu_seqlens=torch.tensor([0, 8])), ValueError, ["sparse", "cu_seqlens", "expected None"]),
    "sparse type": (lambda: sequence_parallel_attention(q, kv, kv, sparse=dict(threshold=0.9)), TypeError, ["sparse={'threshold': 0.9}", "XAttentionConfig"]),
    "sparse per-head length": (lambda: ulysses_attention(q, kv, kv, sparse=XAttentionConfig(threshold=torch.full((3,), 0.9))), ValueError, ["3 per-head values", "heads_q=4"]),
    "sparse threshold": (lambda: XAttentionConfig(threshold=1.5), ValueError, ["XAttentionConfig.threshold=1.5", "(0, 1]"]),
    "sparse block": (lambda: XAttentionConfig(stride=8, block_size=12), ValueError, ["block_size=12", "multiple of stride=8"]),
    "sparse sharpness": (lambda: XAttentionConfig(sharpness=0.0), ValueError, ["XAttentionConfig.sharpness", "positive finite", "0.0"]),
    "config sparse ring": (lambda: ParallelConfig(algorithm="token_ring", sparse=XAttentionConfig()), ValueError, ["algorithm='token_ring'", "Ulysses"]),
    "config sparse type": (lambda: ParallelConfig(sparse=0.9), TypeError, ["sparse=0.9", "XAttentionConfig"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_argument_and_value(name):
    fn, exc, words = CASES[name]
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{name}: {w!r} not in: {info.value}"


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
