"""Decode attention over a :class:`ShardedKVCache` (TokenRing's pattern applied to one new token).

For each decoded token and layer, every rank of the group:

1. has the token's query ``(batch, 1, heads_q, head_dim)``. In :func:`longmoe.generate` the non-attention
   part of a decode step is replicated on every rank (every rank has the token and the same hidden state),
   so the query needs no broadcast: 0 bytes instead of the ``B x Hq x D`` broadcast an owner-computes
   design would send;
2. attends over its own cache shard with :func:`flash_attention_forward` (fp32 ``(out, lse)``; an empty
   shard gives ``lse = -inf`` and ``out = 0``);
3. all-gathers the partials ``(batch, heads_q, head_dim + 1)`` fp32 and merges them exactly, in rank order
   (so every rank gets bit-identical results), with :func:`merge_attention_partials`.

Bytes per decoded token per rank: ``layers x (P - 1) x B x Hq x (D + 1) x 4`` sent (a ring all-gather
forwards ``P - 1`` chunks), independent of the context length. The naive alternative, all-gathering the
K/V cache to one rank, moves ``layers x context x 2 x Hkv x D x itemsize`` (see :func:`decode_bytes`).

Why an all-gather rather than a gather to an owner: with a replicated step, every rank needs the merged
output to continue the layer, so merging on every rank saves the broadcast of the result that an owner
merge would need; for one token the all-gather is one message round as the gather is.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longmoe.attention.flash_attention import flash_attention_forward
from longmoe.attention.merge import merge_attention_partials
from longmoe.runtime.distributed import world_and_rank
from longmoe.runtime.exchanger import CommStats

__all__ = ["DecodeError", "DecodeContext", "sharded_decode_attention", "decode_bytes"]


class DecodeError(RuntimeError):
    """A decode collective failed or timed out; the message names the rank, layer and token step."""


@dataclass(slots=True)
class DecodeContext:
    """What the attention function needs besides the tensors (set on each attention module by generate).

    Fields: ``phase`` ("prefill" or "decode"); ``cache``; ``group``; ``layout``/``algorithm``/``cu_seqlens``
    for the sequence-parallel prefill; ``step`` (the token step, for error messages); ``timeout_s`` (every
    wait); ``stats`` (bytes moved, or None).
    """

    cache: object
    group: dist.ProcessGroup | None = None
    phase: str = "prefill"
    layout: str = "zigzag"
    algorithm: str = "auto"
    cu_seqlens: torch.Tensor | None = None
    step: int = -1
    timeout_s: float = 60.0
    stats: CommStats | None = None
    chosen: list = field(default_factory=list)


def sharded_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: list[int],
    *,
    group: dist.ProcessGroup | None = None,
    softmax_scale: float | None = None,
    timeout_s: float = 60.0,
    step: int = -1,
    layer: int = -1,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over the K/V shards of every rank of ``group``.

    q: (batch, 1, heads_q, head_dim), the same on every rank; k, v: (batch, max_length, heads_kv, head_dim),
    this rank's shard, of which ``lengths[b]`` rows of sequence ``b`` are valid (0: an empty shard).
    Returns (batch, 1, heads_q, head_dim) in q's dtype, identical on every rank. Every rank calls it.

    Raises:
        DecodeError: the all-gather failed (a dead peer) or did not finish within ``timeout_s``.
    """
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be (batch, 1, heads_q, head_dim); got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (batch={q.shape[0]}, max_length, heads_kv, head_dim)"
        )
    if len(lengths) != q.shape[0] or any(not 0 <= n <= k.shape[1] for n in lengths):
        raise ValueError(
            f"lengths={lengths} must give 0..{k.shape[1]} valid rows for each of {q.shape[0]} sequences"
        )
    batch, _, hq, d = q.shape
    outs, lses = [], []
    for b, n in enumerate(lengths):  # per-sequence lengths: no padded keys reach the kernel
        o, lse = flash_attention_forward(
            q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], causal=False, softmax_scale=softmax_scale,
            out_dtype=torch.float32,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs).float()  # (B, 1, Hq, D)
    lse = torch.cat(lses)  # (B, Hq, 1)
    world, rank = world_and_rank(group)
    if world == 1:
        return out.to(q.dtype)
    mine = torch.cat([out[:, 0], lse.reshape(batch, hq, 1)], dim=-1).contiguous()  # (B, Hq, D+1)
    parts = [torch.empty_like(mine) for _ in range(world)]
    where = f"rank {rank}: decode attention at token step {step}, layer {layer} (group of {world})"
    try:
        work = dist.all_gather(parts, mine, group=group, async_op=True)
        if work.wait(timeout=datetime.timedelta(seconds=timeout_s)) is False:
            raise RuntimeError(f"timed out after {timeout_s} s")
    except RuntimeError as err:
        raise DecodeError(
            f"{where}: the all-gather of attention partials failed within {timeout_s} s - a rank died or "
            f"stalled. Cause: {err}"
        ) from err
    if stats is not None:
        stats.add("decode_allgather", (world - 1) * mine.nbytes, (world - 1) * mine.nbytes)
    acc_out = parts[0][..., :d].unsqueeze(1)
    acc_lse = parts[0][..., d:]  # (B, Hq, 1)
    for p in parts[1:]:
        acc_out, acc_lse = merge_attention_partials(acc_out, acc_lse, p[..., :d].unsqueeze(1), p[..., d:])
    return acc_out.to(q.dtype)


def decode_bytes(
    *, world: int, batch: int, heads_q: int, heads_kv: int, head_dim: int, context: int, layers: int,
    itemsize: int = 4,
) -> dict[str, int]:  # fmt: skip
    """Bytes one rank sends per decoded token (all layers): ``"token_ring"`` (the partial all-gather above,
    independent of ``context``) and ``"naive_kv_gather"`` (every non-root rank sends its ``context / P``
    tokens of K and V to one rank, which attends over the whole cache; the busiest sender's bytes)."""
    if world == 1:
        return {"token_ring": 0, "naive_kv_gather": 0}
    ring = layers * (world - 1) * batch * heads_q * (head_dim + 1) * 4
    shard = -(-context // world)
    naive = layers * batch * shard * 2 * heads_kv * head_dim * itemsize
    return {"token_ring": ring, "naive_kv_gather": naive}
