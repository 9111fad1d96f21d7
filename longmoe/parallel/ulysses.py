"""Ulysses sequence-parallel attention: all-to-all from sequence shards to head shards and back.

Each rank trades its (seqlen_local, all heads) slab for (full sequence, heads/P), runs ordinary attention
on whole sequences, and trades back. Traffic per rank is (P-1)/P of q, k, v and out each pass, spread over
all peers, independent of the ring length; it needs ``heads % P == 0`` (K/V heads are replicated when
``heads_kv < P`` divides P). Composes with the ring algorithms (Ulysses inside a node, ring across).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import XAttentionConfig, flash_attention
from longmoe.parallel.common import check_sequence_parallel_inputs
from longmoe.parallel.layout import check_layout, shard_positions
from longmoe.runtime.collectives import all_to_all
from longmoe.runtime.distributed import world_and_rank
from longmoe.runtime.exchanger import CommStats

__all__ = ["ulysses_attention", "seq_to_heads", "heads_to_seq"]


def seq_to_heads(x: torch.Tensor, group=None, *, stats: CommStats | None = None) -> torch.Tensor:
    """(batch, seqlen_local, heads, D) sequence shard -> (batch, P * seqlen_local, heads / P, D), ranks'
    shards concatenated in rank order. Differentiable (the backward is the inverse all-to-all)."""
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    b, sl, h, d = x.shape
    send = x.reshape(b, sl, world, h // world, d).permute(2, 0, 1, 3, 4)  # (P, B, S_l, H/P, D)
    recv = _exchange(send, group, stats, "ulysses sequence->heads")  # (P_src, B, S_l, H/P, D)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * sl, h // world, d)


def heads_to_seq(y: torch.Tensor, group=None, *, stats: CommStats | None = None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (batch, P * seqlen_local, heads / P, D) -> (batch, seqlen_local, heads, D)."""
    world, _ = world_and_rank(group)
    if world == 1:
        return y
    b, s, hp, d = y.shape
    sl = s // world
    send = y.reshape(b, world, sl, hp, d).permute(1, 0, 2, 3, 4)  # (P_dst, B, S_l, H/P, D)
    recv = _exchange(send, group, stats, "ulysses heads->sequence")  # (P_src = head group, B, S_l, H/P, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, sl, world * hp, d)


def _exchange(send: torch.Tensor, group, stats: CommStats | None, what: str) -> torch.Tensor:
    if stats is not None:  # what leaves this rank: every slice but its own
        off_rank = send.numel() // send.shape[0] * (send.shape[0] - 1) * send.element_size()
        stats.add("other", off_rank, off_rank, messages=send.shape[0] - 1)
    return all_to_all(send, group=group, what=what)


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
    timeout_s: float | None = None,
    stats: CommStats | None = None,
    check_finite: bool = False,
    sparse: XAttentionConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses attention over the sequence shards of ``group`` (every rank calls it), with autograd.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim) shards in
    ``layout``. Needs ``heads_q % P == 0`` and either ``heads_kv % P == 0`` or ``P % heads_kv == 0`` (K/V
    heads are then replicated, P / heads_kv copies each). Returns out like q, and lse (batch, heads_q,
    seqlen_local) fp32 when ``return_lse``. ``timeout_s`` bounds the entry check; the all-to-alls use the
    process group's timeout. ``stats`` (a :class:`longmoe.runtime.CommStats`) receives the bytes sent to
    other ranks (forward; the backward's all-to-alls are not counted). ``sparse`` (a
    :class:`~longmoe.attention.XAttentionConfig`) runs XAttention instead of dense attention on the whole
    sequences of this rank's heads, so the block masks are the single-process ones; per-head thresholds are
    sliced to this rank's heads. With ``head_selection="group"`` and ``heads_kv < P`` (replicated K/V heads)
    a GQA group's mask is averaged over the group's query heads on this rank only.
    """
    check_layout(layout)
    world, rank = world_and_rank(group)
    check_sequence_parallel_inputs(
        q,
        k,
        v,
        group,
        world,
        rank,
        layout,
        across_ranks=check_ranks,
        timeout_s=timeout_s,
        check_finite=check_finite,
    )
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
    if sparse is not None and not isinstance(sparse, XAttentionConfig):
        raise TypeError(f"sparse={sparse!r}: expected a longmoe.attention.XAttentionConfig or None")
    if world == 1:
        if sparse is not None:
            sparse.for_heads(0, hq, hq)  # checks a per-head threshold's length
            return sparse(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)
        return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)
    qh, kh, vh = (
        seq_to_heads(t, group, stats=stats) for t in (q, k, v)
    )  # (B, S, H/P, D), rank-order sequence
    order = None
    if causal and layout == "zigzag":
        s_total = qh.shape[1]
        gathered = torch.cat(
            [shard_positions(s_total, r, world, layout, device=q.device) for r in range(world)]
        )
        order = torch.argsort(gathered)  # natural position t sits at gathered index order[t]
        qh, kh, vh = (t.index_select(1, order) for t in (qh, kh, vh))
    if sparse is not None:
        per = hq // world
        local = sparse.for_heads(rank * per, (rank + 1) * per, hq)
        out, lse = local(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    else:
        out, lse = flash_attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(1, inverse)
        lse = lse.index_select(2, inverse)
    out = heads_to_seq(out, group, stats=stats)
    if not return_lse:
        return out
    with torch.no_grad():
        lse_local = heads_to_seq(lse.transpose(1, 2).unsqueeze(-1), group, stats=stats)
    return out, lse_local.squeeze(-1).transpose(1, 2).contiguous()
