"""Ulysses sequence-parallel attention: all-to-all from sequence shards to head shards and back.

Each rank trades its (seqlen_local, all heads) slab for (full sequence, heads/P), runs ordinary attention
on whole sequences, and trades back. Traffic per rank is (P-1)/P of q, k, v and out each pass, spread over
all peers, independent of the ring length; it needs ``heads % P == 0`` (K/V heads are replicated when
``heads_kv < P`` divides P). Composes with the ring algorithms (Ulysses inside a node, ring across).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import flash_attention
from longmoe.parallel.plan import check_sequence_parallel_inputs, world_and_rank
from longmoe.parallel.sharding import check_layout, shard_positions

__all__ = ["ulysses_attention", "seq_to_heads", "heads_to_seq"]


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 (one equal slice per rank)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # not empty_like: keep it contiguous
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    b, sl, h, d = x.shape
    send = x.reshape(b, sl, world, h // world, d).permute(2, 0, 1, 3, 4)  # (P, B, S_l, H/P, D)
    recv = _all_to_all(send, group)  # (P_src, B, S_l, H/P, D)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * sl, h // world, d)


def _heads_to_seq(y: torch.Tensor, group, world: int) -> torch.Tensor:
    b, s, hp, d = y.shape
    sl = s // world
    send = y.reshape(b, world, sl, hp, d).permute(1, 0, 2, 3, 4)  # (P_dst, B, S_l, H/P, D)
    recv = _all_to_all(send, group)  # (P_src = head group, B, S_l, H/P, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, sl, world * hp, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.args = (group, world)
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, *ctx.args), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, world):
        ctx.args = (group, world)
        return _heads_to_seq(y, group, world)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, *ctx.args), None, None


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """(batch, seqlen_local, heads, D) sequence shard -> (batch, P * seqlen_local, heads / P, D), ranks'
    shards concatenated in rank order. Differentiable (the backward is the inverse all-to-all)."""
    world, _ = world_and_rank(group)
    return x if world == 1 else _SeqToHeads.apply(x, group, world)


def heads_to_seq(y: torch.Tensor, group=None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (batch, P * seqlen_local, heads / P, D) -> (batch, seqlen_local, heads, D)."""
    world, _ = world_and_rank(group)
    return y if world == 1 else _HeadsToSeq.apply(y, group, world)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    check_ranks: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses attention over the sequence shards of ``group`` (every rank calls it), with autograd.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim) shards in
    ``layout``. Needs ``heads_q % P == 0`` and either ``heads_kv % P == 0`` or ``P % heads_kv == 0`` (K/V
    heads are then replicated, P / heads_kv copies each). Returns out like q, and lse (batch, heads_q,
    seqlen_local) fp32 when ``return_lse``. Collectives use the process group's timeout.
    """
    check_layout(layout)
    world, rank = world_and_rank(group)
    check_sequence_parallel_inputs(q, k, v, group, world, rank, layout, across_ranks=check_ranks)
    hq, hkv = q.shape[2], k.shape[2]
    if hq % world != 0:
        raise ValueError(
            f"ulysses_attention needs heads_q % world_size == 0; got heads_q={hq}, world_size={world}"
        )
    if hkv % world != 0:
        if world % hkv != 0:
            raise ValueError(
                f"ulysses_attention needs heads_kv % world_size == 0 or world_size % heads_kv == 0; got "
                f"heads_kv={hkv}, world_size={world}"
            )
        # Replicate each KV head P / Hkv times so that head group r of Q meets its own KV head on rank r.
        k = k.repeat_interleave(world // hkv, dim=2)
        v = v.repeat_interleave(world // hkv, dim=2)
    if world == 1:
        return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)
    qh, kh, vh = (seq_to_heads(t, group) for t in (q, k, v))  # (B, S, H/P, D), rank-order sequence
    order = None
    if causal and layout == "zigzag":
        s_total = qh.shape[1]
        gathered = torch.cat(
            [shard_positions(s_total, r, world, layout, device=q.device) for r in range(world)]
        )
        order = torch.argsort(gathered)  # natural position t sits at gathered index order[t]
        qh, kh, vh = (t.index_select(1, order) for t in (qh, kh, vh))
    out, lse = flash_attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(1, inverse)
        lse = lse.index_select(2, inverse)
    out = heads_to_seq(out, group)
    if not return_lse:
        return out
    with torch.no_grad():
        lse_local = _heads_to_seq(lse.transpose(1, 2).unsqueeze(-1).contiguous(), group, world)
    return out, lse_local.squeeze(-1).transpose(1, 2).contiguous()
