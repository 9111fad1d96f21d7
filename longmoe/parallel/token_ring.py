"""TokenRing sequence-parallel attention (arXiv 2412.20501): K/V stay, Q travels, partials return directly.

At step ``s`` rank ``r`` holds the queries of owner ``i = (r + s) mod P`` (they move one hop, from rank
``r+1`` to ``r``, per step), attends them to its own K/V, and sends the partial ``(block_out, block_lse)``
straight back to the owner over a second process group, so the Q batch and the partial batch are two
concurrent P2P batches and both directions of a link carry data. The owner merges partials with the
stable LSE update in fp32. With the zigzag layout a causal step needs only half of Q (or half of K/V), and
only that half is sent and computed.

Backward (ours; the paper and its code have none): K/V and dK/dV stay local. ``(q, dout, lse, delta)``
with ``delta = rowsum(dout * out)`` travel the way Q did; each rank adds the step's dK/dV to its own
accumulators and returns the partial dQ to the owner over the second group.

Communication of step ``s+1`` is launched before the compute of step ``s`` and waited after it, so it
overlaps compute; every wait has a timeout that names the rank, step and peer. The steps (who computes
which block, which rows move where) come from :func:`longmoe.parallel.schedule.ring_schedule`, the same
data the cost model walks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
from longmoe.attention.merge import merge_attention_partials_
from longmoe.parallel.common import RingFunction, prepare_ring_call
from longmoe.parallel.layout import ShardLayout, rows_of
from longmoe.parallel.schedule import RingStep, ring_schedule
from longmoe.runtime.distributed import second_group, world_and_rank
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.exchanger import CommStats, P2PExchanger

__all__ = ["token_ring_attention", "token_ring_forward", "token_ring_backward"]


class _Traveller:
    """Tensors that travel like Q (Q in the forward; q, dout, lse, delta in the backward).

    ``tensors`` are (tensor, sequence dim) holding, compactly and in order, the owner-local query rows
    ``rows`` (a tuple of disjoint ``(start, stop)`` ranges).
    """

    def __init__(self, tensors: list[tuple[torch.Tensor, int]], rows: tuple[tuple[int, int], ...]):
        self.tensors = tensors
        self.rows = rows
        self._offsets = []
        off = 0
        for a, b in rows:
            self._offsets.append(off)
            off += b - a

    def _locate(self, want: tuple[int, int]) -> int:
        for (a, b), off in zip(self.rows, self._offsets, strict=True):
            if a <= want[0] and want[1] <= b:
                return off + want[0] - a
        raise AssertionError(f"rows {want} are not held (holding {self.rows})")  # a schedule bug

    def part(self, want: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
        """The wanted rows of every tensor (contiguous copies when more than one range)."""
        out = []
        for t, dim in self.tensors:
            pieces = [t.narrow(dim, self._locate(w), w[1] - w[0]) for w in want]
            out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim))
        return out

    def empty_like_rows(self, want: tuple[tuple[int, int], ...]) -> _Traveller:
        n = sum(b - a for a, b in want)
        out = []
        for t, dim in self.tensors:
            shape = list(t.shape)
            shape[dim] = n
            out.append((t.new_empty(shape), dim))
        return _Traveller(out, want)


def _split_rows(t: torch.Tensor, segments, dim: int) -> list[torch.Tensor]:
    """Split a step's compact partial (rows of every segment, in order) back into per-segment pieces."""
    return list(t.split([seg.num_q for seg in segments], dim=dim))


def _cat(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim)


class _TokenRingComm:
    """TokenRing's two P2P streams, driven by the schedule: query rows travel one hop to ``r - 1`` per step
    on ``group``; partial results return to their owner on the second group, so both directions of a link
    carry data at once. Each stream keeps one batch in flight (launched before a step's compute, waited
    after it). With one rank there is nothing to exchange and every method is a no-op."""

    def __init__(self, group, timeout_s: float, name: str, stats: CommStats | None):
        world, _ = world_and_rank(group)
        self.stats, self.pending = stats, None
        self.q_ex = self.o_ex = None
        if world > 1:
            self.q_ex = P2PExchanger(group, timeout_s=timeout_s, name=f"{name}.q")
            self.o_ex = P2PExchanger(second_group(group, timeout_s=timeout_s), timeout_s=timeout_s,
                                     name=f"{name}.partials")  # fmt: skip

    def pass_queries(self, step: RingStep, held: _Traveller) -> _Traveller | None:
        """Send the query rows ``r - 1`` needs next step; post the receive of those this rank needs."""
        incoming = None
        for t in step.sent("query"):
            for x in held.part(rows_of(t.segments)):
                self.q_ex.send(x, t.peer, step=step.index, direction=t.direction)
        for t in step.received("query"):
            incoming = held.empty_like_rows(rows_of(t.segments))
            for x, _ in incoming.tensors:
                self.q_ex.recv(x, t.peer, step=step.index, direction=t.direction)
        if self.q_ex is not None and self.q_ex.num_queued:
            self.q_ex.commit()
        return incoming

    def queries_arrived(self) -> None:
        if self.q_ex is not None and self.q_ex.in_flight:
            self.q_ex.wait()

    def return_partials(self, step: RingStep, partials: list[torch.Tensor] | None, templates) -> list:
        """Wait for the previous step's partials, send this step's to their owner and post the receive of
        this rank's own; returns the (segments, partials) that have arrived, to be accumulated.
        ``templates``: (tensor, row dim) of each partial, for the receive buffers."""
        arrived = self._finish()
        for t in step.sent("partial"):
            for x in partials:
                self.o_ex.send(x, t.peer, step=step.index, direction=t.direction)
        for t in step.received("partial"):
            bufs = [_empty_rows(x, dim, t.rows) for x, dim in templates]
            for x in bufs:
                self.o_ex.recv(x, t.peer, step=step.index, direction=t.direction)
            self.pending = (t.segments, bufs)
        if self.o_ex is not None and self.o_ex.num_queued:
            self.o_ex.commit()
        return arrived

    def _finish(self) -> list:
        if self.o_ex is None or not self.o_ex.in_flight:
            return []
        self.o_ex.wait()
        arrived, self.pending = ([self.pending] if self.pending is not None else []), None
        return arrived

    def close(self) -> list:
        """Wait for the last partials; return them; add the byte counts to ``stats``."""
        arrived = self._finish()
        if self.stats is not None and self.q_ex is not None:
            self.stats.add_exchanger(self.q_ex)
            self.stats.add_exchanger(self.o_ex)
        return arrived


def _empty_rows(template: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(template.shape)
    shape[dim] = rows
    return template.new_empty(shape)


def token_ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    softmax_scale: float,
    shard: ShardLayout,
    timeout_s: float,
    partial_dtype: torch.dtype,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenRing forward on local shards q (B, S_l, Hq, D), k/v (B, S_l, Hkv, D); returns (out fp32
    (B, S_l, Hq, D), lse fp32 (B, Hq, S_l))."""
    _, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    acc = accumulation_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    out = torch.zeros(b, sl, hq, d, dtype=acc, device=q.device)
    lse = torch.full((b, hq, sl), float("-inf"), dtype=acc, device=q.device)
    templates = [(out.new_empty((b, 0, hq, d), dtype=partial_dtype), 1), (lse, 2)]  # receive-buffer shapes

    def accumulate(segs, partial_out, partial_lse):
        for seg, o, l in zip(
            segs, _split_rows(partial_out, segs, 1), _split_rows(partial_lse, segs, 2), strict=True
        ):
            a, e = seg.q_rows
            merge_attention_partials_(out[:, a:e], lse[:, :, a:e], o, l)

    comm = _TokenRingComm(group, timeout_s, "token_ring", stats)
    held = _Traveller([(q, 1)], ((0, sl),))
    for step in ring_schedule("token_ring", shard, causal, rank):
        incoming = comm.pass_queries(step, held)
        partials = None
        if step.compute:  # the owner's query rows against this rank's K/V
            (qp,) = held.part(rows_of(step.compute))
            outs, lses = [], []
            for seg, qs in zip(step.compute, _split_rows(qp, step.compute, 1), strict=True):
                ka, kb = seg.kv_rows
                bo, bl = flash_attention_forward(qs, k[:, ka:kb], v[:, ka:kb], causal=seg.causal,
                                                 softmax_scale=softmax_scale, out_dtype=acc)  # fmt: skip
                outs.append(bo)
                lses.append(bl)
            partials = [_cat(outs, 1).to(partial_dtype), _cat(lses, 2)]
            if step.owner == rank:
                accumulate(step.compute, *partials)
        for segs, (po, pl) in comm.return_partials(step, partials, templates):
            accumulate(segs, po, pl)
        comm.queries_arrived()
        held = incoming
    for segs, (po, pl) in comm.close():
        accumulate(segs, po, pl)
    return out, lse


def token_ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    softmax_scale: float,
    shard: ShardLayout,
    timeout_s: float,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TokenRing backward: (dq, dk, dv) for the local shards, in the input dtype. K/V and their fp32
    gradient accumulators stay; (q, dout, lse, delta) travel like Q; partial dQ (fp32: summed over up to P
    steps, so it travels unrounded) returns to its owner."""
    _, rank = world_and_rank(group)
    b, sl, hq, d = q.shape
    acc = accumulation_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    delta = attention_delta(dout, out)
    dq = torch.zeros(b, sl, hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)

    def accumulate(segs, partial_dq):
        for seg, g in zip(segs, _split_rows(partial_dq, segs, 1), strict=True):
            a, e = seg.q_rows
            dq[:, a:e] += g

    comm = _TokenRingComm(group, timeout_s, "token_ring.bwd", stats)
    held = _Traveller([(q, 1), (dout.contiguous(), 1), (lse, 2), (delta, 2)], ((0, sl),))
    for step in ring_schedule("token_ring", shard, causal, rank, backward=True):
        incoming = comm.pass_queries(step, held)
        partials = None
        if step.compute:
            parts = [_split_rows(t, step.compute, dim)
                     for t, dim in zip(held.part(rows_of(step.compute)), (1, 1, 2, 2), strict=True)]  # fmt: skip
            gqs = []
            for seg, qp, dop, lp, dp in zip(step.compute, *parts, strict=True):
                ka, kb = seg.kv_rows
                gq, gk, gv = flash_attention_backward(
                    dop, qp, k[:, ka:kb], v[:, ka:kb], None, lp, delta=dp, causal=seg.causal,
                    softmax_scale=softmax_scale, grad_dtype=acc,
                )  # fmt: skip
                dk[:, ka:kb] += gk
                dv[:, ka:kb] += gv
                gqs.append(gq)
            partials = [_cat(gqs, 1)]
            if step.owner == rank:
                accumulate(step.compute, partials[0])
        for segs, (pdq,) in comm.return_partials(step, partials, [(dq, 1)]):
            accumulate(segs, pdq)
        comm.queries_arrived()
        held = incoming
    for segs, (pdq,) in comm.close():
        accumulate(segs, pdq)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def token_ring_attention(
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
    partial_dtype: torch.dtype | None = None,
    check_ranks: bool = True,
    stats: CommStats | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TokenRing attention over the sequence shards of ``group`` (every rank calls it), with autograd.

    Args:
        q: (batch, seqlen_local, heads_q, head_dim), this rank's shard (see :func:`shard_sequence`).
        k, v: (batch, seqlen_local, heads_kv, head_dim); ``heads_q % heads_kv == 0``.
        group: the sequence-parallel process group (default: WORLD).
        causal: causal attention over the global sequence.
        softmax_scale: default ``1/sqrt(head_dim)``.
        layout: how the global sequence was sharded: "zigzag" (balanced causal work) or "contiguous".
        cu_seqlens: packed documents: the *global* (ndocs + 1,) document offsets, the same on every rank;
            q/k/v are then (1, local tokens, heads, head_dim) shards from ``shard_sequence(x, group, layout,
            cu_seqlens=cu_seqlens)`` (each document sharded on its own, no padding), and attention stays
            within documents.
        return_lse: also return lse (batch, heads_q, seqlen_local) fp32 (not differentiable).
        timeout_s: limit for every wait (the entry check, the second group's creation, every exchange); a
            stalled or dead peer raises ``ExchangeTimeout`` naming the rank, step and peer.
        partial_dtype: dtype the partial outputs travel back in: None (default) = the input dtype, or
            float32. Each partial is a convex-combination term of the result, so one bf16 rounding of it
            keeps the merged error within 2x the single-process error (measured by the tests) at half the
            return traffic. LSEs and partial dQs (summed over up to P steps) always travel in fp32.
        check_ranks: all-gather the shapes/dtype once per call to catch mismatched ranks with a clear error.
        stats: a :class:`longmoe.runtime.CommStats` the forward and the backward add their bytes to (by
            direction), for tests, benchmarks and logs.
        check_finite: raise ``ValueError`` on every rank if any rank's q/k/v holds a NaN or infinity
            (naming the rank and the tensor); needs ``check_ranks``' all-gather to reach the other ranks.

    Returns:
        out (batch, seqlen_local, heads_q, head_dim) in q's dtype, or ``(out, lse)``.
    """
    shard, scale = prepare_ring_call(
        q, k, v, group, layout, softmax_scale, check_ranks=check_ranks, cu_seqlens=cu_seqlens,
        timeout_s=float(timeout_s), check_finite=check_finite,
    )  # fmt: skip
    partial_dtype = q.dtype if partial_dtype is None else partial_dtype
    if partial_dtype not in (torch.float32, q.dtype):
        raise TypeError(f"partial_dtype must be torch.float32 or q's dtype {q.dtype}; got {partial_dtype}")
    kw = dict(group=group, causal=bool(causal), softmax_scale=scale, shard=shard, timeout_s=float(timeout_s),
              stats=stats)  # fmt: skip
    out, lse = RingFunction.apply(
        q, k, v, token_ring_forward, token_ring_backward, {**kw, "partial_dtype": partial_dtype}, kw
    )
    return (out, lse) if return_lse else out
