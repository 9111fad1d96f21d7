"""KV-ring sequence-parallel attention (ring attention): Q stays, K/V circulate. The baseline TokenRing
is compared with, and the cheaper choice when K/V are small (GQA with many query heads per KV head).

Forward: at step ``s`` rank ``r`` attends its queries to the K/V of rank ``r - s``, received from rank
``r - 1`` while the previous step computes, and merges the partial in fp32. Backward: K/V circulate again,
and with them fp32 dK/dV accumulators (on a second process group, concurrently), which arrive at their
owner after ``P`` hops; dQ stays local. As in ring-flash-attention, a step's block gradients are computed
first and the incoming accumulators are waited for only after that compute, so their hop hides behind it.
Zigzag and contiguous layouts, causal or not, GQA/MQA. The steps come from
:func:`longmoe.parallel.schedule.ring_schedule`, the same data the cost model walks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
from longmoe.attention.merge import merge_attention_partials_
from longmoe.parallel.common import RingFunction, prepare_ring_call
from longmoe.parallel.layout import ShardLayout
from longmoe.parallel.schedule import RingStep, ring_schedule
from longmoe.runtime.distributed import second_group, world_and_rank
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.exchanger import CommStats, P2PExchanger

__all__ = ["kv_ring_attention", "kv_ring_forward", "kv_ring_backward"]


def _post(ex: P2PExchanger, step: RingStep, payload: str, tensors, templates) -> list[torch.Tensor]:
    """Send ``tensors`` as the step's ``payload`` transfer and post the receive of the next block's (rows
    from the schedule, other dims from ``templates``); returns the receive buffers ([] if none this step)."""
    sends, recvs = step.sent(payload), step.received(payload)
    if not sends:
        return []
    (send,), (recv,) = sends, recvs
    bufs = []
    for x, like in zip(tensors, templates, strict=True):
        ex.send(x, send.peer, step=step.index, direction=send.direction)
        buf = like.new_empty((like.shape[0], recv.rows, *like.shape[2:]))
        bufs.append(ex.recv(buf, recv.peer, step=step.index, direction=recv.direction))
    ex.commit()
    return bufs


def kv_ring_forward(
    q, k, v, *, group, causal: bool, softmax_scale: float, shard: ShardLayout, timeout_s: float,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """KV-ring forward on local shards q (B, S_l, Hq, D), k/v (B, S_l, Hkv, D): (out fp32 (B, S_l, Hq, D),
    lse fp32 (B, Hq, S_l))."""
    world, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    acc = accumulation_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    out = torch.zeros(b, sl, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq, sl), float("-inf"), dtype=acc, device=q.device)
    ex = P2PExchanger(group, timeout_s=timeout_s, name="kv_ring.kv") if world > 1 else None
    cur_k, cur_v = k, v
    for step in ring_schedule("kv_ring", shard, causal, rank):
        incoming = _post(ex, step, "kv", (cur_k, cur_v), (k, v))  # next step's K/V, during this compute
        for seg in step.compute:
            (qa, qe), (ka, ke) = seg.q_rows, seg.kv_rows
            bo, bl = flash_attention_forward(
                q[:, qa:qe], cur_k[:, ka:ke], cur_v[:, ka:ke], causal=seg.causal, softmax_scale=softmax_scale,
                out_dtype=acc,
            )  # fmt: skip
            merge_attention_partials_(out[:, qa:qe], lse[:, :, qa:qe], bo, bl)
        if incoming:
            ex.wait()
            cur_k, cur_v = incoming
    if stats is not None and ex is not None:
        stats.add_exchanger(ex)
    return out, lse


def kv_ring_backward(
    dout, q, k, v, out, lse, *, group, causal: bool, softmax_scale: float, shard: ShardLayout, timeout_s: float,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """KV-ring backward: (dq, dk, dv) for the local shards in the input dtype."""
    world, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    acc = accumulation_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    delta = attention_delta(dout, out)
    dq = torch.zeros(b, sl, hq, d, dtype=acc, device=q.device)
    kv_ex = P2PExchanger(group, timeout_s=timeout_s, name="kv_ring.bwd.kv") if world > 1 else None
    g_ex = None
    if world > 1:
        g_ex = P2PExchanger(
            second_group(group, timeout_s=timeout_s), timeout_s=timeout_s, name="kv_ring.bwd.dkdv"
        )
    cur_k, cur_v = k, v
    acc_k = acc_v = None  # fp32 dK/dV accumulators of the K/V block held this step; they travel with it
    grads_in: list[torch.Tensor] = []
    grad_like = (k.new_empty((b, 0, *k.shape[2:]), dtype=acc),) * 2
    for step in ring_schedule("kv_ring", shard, causal, rank, backward=True):
        incoming = _post(kv_ex, step, "kv", (cur_k, cur_v), (k, v))
        step_dk = torch.zeros(cur_k.shape, dtype=acc, device=k.device)
        step_dv = torch.zeros(cur_v.shape, dtype=acc, device=v.device)
        for seg in step.compute:
            (qa, qe), (ka, ke) = seg.q_rows, seg.kv_rows
            gq, gk, gv = flash_attention_backward(
                dout[:, qa:qe], q[:, qa:qe], cur_k[:, ka:ke], cur_v[:, ka:ke], None, lse[:, :, qa:qe],
                delta=delta[:, :, qa:qe], causal=seg.causal, softmax_scale=softmax_scale, grad_dtype=acc,
            )  # fmt: skip
            dq[:, qa:qe] += gq
            step_dk[:, ka:ke] += gk
            step_dv[:, ka:ke] += gv
        if grads_in:  # the accumulators of this block, sent by r - 1 last step: waited only after compute
            g_ex.wait()
            acc_k, acc_v = grads_in[0].add_(step_dk), grads_in[1].add_(step_dv)
        else:
            acc_k, acc_v = step_dk, step_dv
        grads_in = _post(g_ex, step, "kv_grad", (acc_k, acc_v), grad_like)
        if incoming:
            kv_ex.wait()
            cur_k, cur_v = incoming
    if grads_in:
        g_ex.wait()
        acc_k, acc_v = grads_in  # after P hops: the accumulators of this rank's own K/V
    if stats is not None and kv_ex is not None:
        stats.add_exchanger(kv_ex)
        stats.add_exchanger(g_ex)
    return dq.to(q.dtype), acc_k.to(k.dtype), acc_v.to(v.dtype)


def kv_ring_attention(
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
    stats: CommStats | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """KV-ring attention over the sequence shards of ``group`` (every rank calls it), with autograd.

    Args and returns as :func:`longmoe.parallel.token_ring_attention`: q (batch, seqlen_local, heads_q,
    head_dim), k/v (batch, seqlen_local, heads_kv, head_dim) local shards, or packed documents with the
    global ``cu_seqlens``; out like q, lse (batch, heads_q, seqlen_local) fp32. ``timeout_s`` bounds every
    wait; ``stats`` (a :class:`longmoe.runtime.CommStats`) receives the bytes moved.
    """
    shard, scale = prepare_ring_call(
        q, k, v, group, layout, softmax_scale, check_ranks=check_ranks, cu_seqlens=cu_seqlens,
        timeout_s=float(timeout_s), check_finite=check_finite,
    )  # fmt: skip
    kw = dict(group=group, causal=bool(causal), softmax_scale=scale, shard=shard, timeout_s=float(timeout_s),
              stats=stats)  # fmt: skip
    out, lse = RingFunction.apply(q, k, v, kv_ring_forward, kv_ring_backward, kw, kw)
    return (out, lse) if return_lse else out
