"""KV-ring sequence-parallel attention (ring attention): Q stays, K/V circulate. The baseline TokenRing
is compared with, and the cheaper choice when K/V are small (GQA with many query heads per KV head).

Forward: at step ``s`` rank ``r`` attends its queries to the K/V of rank ``r - s``, received from rank
``r - 1`` while the previous step computes, and merges the partial in fp32. Backward: K/V circulate again,
and with them fp32 dK/dV accumulators (on a second process group, concurrently), which arrive at their
owner after ``P`` hops; dQ stays local. Zigzag and contiguous layouts, causal or not, GQA/MQA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
from longmoe.attention.merge import merge_attention_partials_
from longmoe.parallel.plan import RingFunction, ShardLayout, prepare_ring_call, world_and_rank
from longmoe.parallel.token_ring import second_group
from longmoe.runtime.exchanger import P2PExchanger

__all__ = ["ring_attention"]


def ring_forward(
    q,
    k,
    v,
    *,
    group,
    causal: bool,
    softmax_scale: float,
    shard: ShardLayout,
    timeout_s: float,
    exchangers=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-ring forward on local shards: (out fp32 (B, S_l, Hq, D), lse fp32 (B, Hq, S_l))."""
    world, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    out = torch.zeros(b, sl, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, sl), float("-inf"), dtype=torch.float32, device=q.device)
    ex = P2PExchanger(group, timeout_s=timeout_s, name="ring.kv") if world > 1 else None
    if exchangers is not None and ex is not None:
        exchangers.append(ex)
    cur_k, cur_v = k, v
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for s in range(world):
        if s < world - 1:
            # Next step's K/V belong to rank r-s-1; with packed documents their length is that rank's.
            n_in = shard.local_len((rank - s - 1) % world)
            ex.send(cur_k, nxt, step=s, direction="next")
            k_in = ex.recv(k.new_empty(b, n_in, *k.shape[2:]), prv, step=s, direction="next")
            ex.send(cur_v, nxt, step=s, direction="next")
            v_in = ex.recv(v.new_empty(b, n_in, *v.shape[2:]), prv, step=s, direction="next")
            ex.commit()
        for seg in shard.segments(rank, (rank - s) % world, causal):
            (qa, qe), (ka, ke) = seg.q_rows, seg.kv_rows
            bo, bl = flash_attention_forward(
                q[:, qa:qe], cur_k[:, ka:ke], cur_v[:, ka:ke], causal=seg.causal, softmax_scale=softmax_scale,
                out_dtype=torch.float32,
            )  # fmt: skip
            merge_attention_partials_(out[:, qa:qe], lse[:, :, qa:qe], bo, bl)
        if s < world - 1:
            ex.wait()
            cur_k, cur_v = k_in, v_in
    return out, lse


def ring_backward(
    dout, q, k, v, out, lse, *, group, causal: bool, softmax_scale: float, shard: ShardLayout, timeout_s: float,
    exchangers=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """KV-ring backward: (dq, dk, dv) for the local shards in the input dtype."""
    world, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    delta = attention_delta(dout, out)
    dq = torch.zeros(b, sl, hq, d, dtype=torch.float32, device=q.device)
    kv_ex = P2PExchanger(group, timeout_s=timeout_s, name="ring.bwd.kv") if world > 1 else None
    g_ex = P2PExchanger(second_group(group), timeout_s=timeout_s, name="ring.bwd.dkdv") if world > 1 else None
    if exchangers is not None and kv_ex is not None:
        exchangers.extend([kv_ex, g_ex])
    cur_k, cur_v = k, v
    # fp32 accumulators for the K/V block held this step; they travel with it and reach the owner last.
    acc_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    acc_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    gk_in = gv_in = None
    for s in range(world):
        n_in = shard.local_len((rank - s - 1) % world)  # length of the K/V block arriving for step s+1
        if s < world - 1:
            kv_ex.send(cur_k, nxt, step=s, direction="next")
            k_in = kv_ex.recv(k.new_empty(b, n_in, *k.shape[2:]), prv, step=s, direction="next")
            kv_ex.send(cur_v, nxt, step=s, direction="next")
            v_in = kv_ex.recv(v.new_empty(b, n_in, *v.shape[2:]), prv, step=s, direction="next")
            kv_ex.commit()
        if s > 0:
            g_ex.wait()
            acc_k, acc_v = gk_in, gv_in
        for seg in shard.segments(rank, (rank - s) % world, causal):
            (qa, qe), (ka, ke) = seg.q_rows, seg.kv_rows
            gq, gk, gv = flash_attention_backward(
                dout[:, qa:qe], q[:, qa:qe], cur_k[:, ka:ke], cur_v[:, ka:ke], None, lse[:, :, qa:qe],
                delta=delta[:, :, qa:qe], causal=seg.causal, softmax_scale=softmax_scale, grad_dtype=torch.float32,
            )  # fmt: skip
            dq[:, qa:qe] += gq
            acc_k[:, ka:ke] += gk
            acc_v[:, ka:ke] += gv
        if world > 1:
            acc_shape = (b, n_in, *k.shape[2:])
            g_ex.send(acc_k, nxt, step=s, direction="next")
            gk_in = g_ex.recv(acc_k.new_empty(acc_shape), prv, step=s, direction="next")
            g_ex.send(acc_v, nxt, step=s, direction="next")
            gv_in = g_ex.recv(acc_v.new_empty(acc_shape), prv, step=s, direction="next")
            g_ex.commit()
        if s < world - 1:
            kv_ex.wait()
            cur_k, cur_v = k_in, v_in
    if world > 1:
        g_ex.wait()
        acc_k, acc_v = gk_in, gv_in  # after P hops: the accumulators of this rank's own K/V
    return dq.to(q.dtype), acc_k.to(k.dtype), acc_v.to(v.dtype)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    timeout_s: float = 120.0,
    check_ranks: bool = True,
    exchangers: list | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """KV-ring attention over the sequence shards of ``group`` (every rank calls it), with autograd.

    Args and returns as :func:`longmoe.parallel.token_ring_attention`: q (batch, seqlen_local, heads_q,
    head_dim), k/v (batch, seqlen_local, heads_kv, head_dim) local shards, or packed documents with the
    global ``cu_seqlens``; out like q, lse (batch, heads_q, seqlen_local) fp32.
    """
    shard, scale = prepare_ring_call(
        q, k, v, group, layout, softmax_scale, check_ranks=check_ranks, cu_seqlens=cu_seqlens
    )
    kw = dict(group=group, causal=bool(causal), softmax_scale=scale, shard=shard, timeout_s=float(timeout_s),
              exchangers=exchangers)  # fmt: skip
    out, lse = RingFunction.apply(q, k, v, ring_forward, ring_backward, kw, kw)
    return (out, lse) if return_lse else out
