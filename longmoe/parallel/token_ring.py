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
overlaps compute; every wait has a timeout that names the rank, step and peer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
from longmoe.attention.merge import merge_attention_partials_
from longmoe.parallel.plan import (
    RingFunction,
    ShardLayout,
    group_key,
    prepare_ring_call,
    rows_of,
    world_and_rank,
)
from longmoe.runtime.distributed import new_group_like
from longmoe.runtime.exchanger import P2PExchanger

__all__ = ["token_ring_attention", "partial_direction", "second_group"]

_SECOND_GROUPS: dict[int, dist.ProcessGroup] = {}


def second_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A second process group over ``group``'s ranks (created collectively on first use, then cached).

    Two groups let the Q batch and the partial-output batch run as two independent P2P streams.
    """
    key = group_key(group)
    if key not in _SECOND_GROUPS:
        _SECOND_GROUPS[key] = new_group_like(group)
    return _SECOND_GROUPS[key]


def partial_direction(offset: int, world: int) -> str:
    """Byte-accounting label of a send to rank ``r + offset``: "next", "prev" or "other" (a non-neighbour)."""
    offset %= world
    if offset == 1:
        return "next"
    if offset == world - 1:
        return "prev"
    return "other"


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


def _ring_steps(
    traveller: _Traveller,
    shard: ShardLayout,
    group: dist.ProcessGroup | None,
    group2: dist.ProcessGroup | None,
    causal: bool,
    timeout_s: float,
    name: str,
    compute,
    partial_shapes,
    accumulate,
    exchangers: list | None,
):
    """The TokenRing schedule shared by forward and backward.

    compute(segments, tensors) -> list of partial tensors for the owner (rows of every segment, compact);
    partial_shapes(num_rows) -> list of (shape, dtype) an owner receives for a step with ``num_rows`` rows;
    accumulate(segments, partials) adds partials (own or received) into the owner's result.
    """
    world, rank = world_and_rank(group)
    if world == 1:
        segs = shard.segments(0, 0, causal)
        if segs:
            accumulate(segs, compute(segs, traveller.part(rows_of(segs))))
        return
    prev, nxt = (rank - 1) % world, (rank + 1) % world
    q_ex = P2PExchanger(group, timeout_s=timeout_s, name=f"{name}.q")
    o_ex = P2PExchanger(group2, timeout_s=timeout_s, name=f"{name}.partials")
    if exchangers is not None:
        exchangers.extend([q_ex, o_ex])
    cur: _Traveller | None = traveller
    pending = None
    for s in range(world):
        owner = (rank + s) % world
        incoming = None
        if s < world - 1:
            need_prev = shard.segments(owner, prev, causal)
            need_me = shard.segments((owner + 1) % world, rank, causal)
            if need_prev:
                for t in cur.part(rows_of(need_prev)):
                    q_ex.send(t, prev, step=s, direction="prev")
            if need_me:
                incoming = traveller.empty_like_rows(rows_of(need_me))
                for t, _ in incoming.tensors:
                    q_ex.recv(t, nxt, step=s, direction="prev")
            if q_ex.num_queued:
                q_ex.commit()
        segs = shard.segments(owner, rank, causal)
        partials = compute(segs, cur.part(rows_of(segs))) if segs else None
        if s == 0:
            if partials is not None:
                accumulate(segs, partials)
        else:
            if o_ex.in_flight:
                o_ex.wait()
                if pending is not None:
                    accumulate(*pending)
                pending = None
            label = partial_direction(s, world)
            if partials is not None:
                for t in partials:
                    o_ex.send(t, owner, step=s, direction=label)
            src = (rank - s) % world
            theirs = shard.segments(rank, src, causal)
            if theirs:
                device = traveller.tensors[0][0].device
                n = sum(seg.num_q for seg in theirs)
                bufs = [torch.empty(shape, dtype=dt, device=device) for shape, dt in partial_shapes(n)]
                for t in bufs:
                    o_ex.recv(t, src, step=s, direction=label)
                pending = (theirs, bufs)
            if o_ex.num_queued:
                o_ex.commit()
        if s < world - 1:
            if q_ex.in_flight:
                q_ex.wait()
            cur = incoming
    if o_ex.in_flight:
        o_ex.wait()
        if pending is not None:
            accumulate(*pending)


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
    exchangers: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenRing forward on local shards; returns (out fp32 (B, S_l, Hq, D), lse fp32 (B, Hq, S_l))."""
    b, sl, hq, d = q.shape
    out = torch.zeros(b, sl, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, sl), float("-inf"), dtype=torch.float32, device=q.device)

    def compute(segs, tensors):
        (qp,) = tensors
        outs, lses = [], []
        for seg, qs in zip(segs, _split_rows(qp, segs, 1), strict=True):
            ka, kb = seg.kv_rows
            bo, bl = flash_attention_forward(
                qs,
                k[:, ka:kb],
                v[:, ka:kb],
                causal=seg.causal,
                softmax_scale=softmax_scale,
                out_dtype=torch.float32,
            )
            outs.append(bo)
            lses.append(bl)
        cat = lambda xs, dim: xs[0] if len(xs) == 1 else torch.cat(xs, dim)
        return [cat(outs, 1).to(partial_dtype), cat(lses, 2)]

    def partial_shapes(n: int):
        return [((b, n, hq, d), partial_dtype), ((b, hq, n), torch.float32)]

    def accumulate(segs, partials):
        bo, bl = partials
        for seg, o, l in zip(segs, _split_rows(bo, segs, 1), _split_rows(bl, segs, 2), strict=True):
            a, e = seg.q_rows
            merge_attention_partials_(out[:, a:e], lse[:, :, a:e], o, l)

    group2 = second_group(group) if world_and_rank(group)[0] > 1 else None
    _ring_steps(
        _Traveller([(q, 1)], ((0, sl),)), shard, group, group2, causal, timeout_s, "token_ring",
        compute, partial_shapes, accumulate, exchangers,
    )  # fmt: skip
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
    exchangers: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TokenRing backward: (dq, dk, dv) for the local shards, in the input dtype."""
    b, sl, hq, d = q.shape
    delta = attention_delta(dout, out)
    dq = torch.zeros(b, sl, hq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def compute(segs, tensors):
        parts = [_split_rows(t, segs, dim) for t, dim in zip(tensors, (1, 1, 2, 2), strict=True)]
        gqs = []
        for seg, qp, dop, lp, dp in zip(segs, *parts, strict=True):
            ka, kb = seg.kv_rows
            gq, gk, gv = flash_attention_backward(
                dop, qp, k[:, ka:kb], v[:, ka:kb], None, lp, delta=dp, causal=seg.causal,
                softmax_scale=softmax_scale, grad_dtype=torch.float32,
            )  # fmt: skip
            dk[:, ka:kb] += gk
            dv[:, ka:kb] += gv
            gqs.append(gq)
        # fp32: partial dQs are summed over up to P steps, so they travel unrounded
        return [gqs[0] if len(gqs) == 1 else torch.cat(gqs, 1)]

    def partial_shapes(n: int):
        return [((b, n, hq, d), torch.float32)]

    def accumulate(segs, partials):
        for seg, g in zip(segs, _split_rows(partials[0], segs, 1), strict=True):
            a, e = seg.q_rows
            dq[:, a:e] += g

    traveller = _Traveller([(q, 1), (dout.contiguous(), 1), (lse, 2), (delta, 2)], ((0, sl),))
    group2 = second_group(group) if world_and_rank(group)[0] > 1 else None
    _ring_steps(
        traveller, shard, group, group2, causal, timeout_s, "token_ring.bwd",
        compute, partial_shapes, accumulate, exchangers,
    )  # fmt: skip
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
    exchangers: list | None = None,
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
        timeout_s: limit for every wait; a stalled or dead peer raises ``ExchangeTimeout`` naming the
            rank, step and peer.
        partial_dtype: dtype the partial outputs travel back in: None (default) = the input dtype, or
            float32. Each partial is a convex-combination term of the result, so one bf16 rounding of it
            keeps the merged error within 2x the single-process error (measured by the tests) at half the
            return traffic. LSEs and partial dQs (summed over up to P steps) always travel in fp32.
        check_ranks: all-gather the shapes/dtype once per call to catch mismatched ranks with a clear error.
        exchangers: if a list is given, the P2P exchangers used are appended (byte counters for tests and
            benchmarks).

    Returns:
        out (batch, seqlen_local, heads_q, head_dim) in q's dtype, or ``(out, lse)``.
    """
    shard, scale = prepare_ring_call(
        q, k, v, group, layout, softmax_scale, check_ranks=check_ranks, cu_seqlens=cu_seqlens
    )
    partial_dtype = q.dtype if partial_dtype is None else partial_dtype
    if partial_dtype not in (torch.float32, q.dtype):
        raise TypeError(f"partial_dtype must be torch.float32 or q's dtype {q.dtype}; got {partial_dtype}")
    kw = dict(group=group, causal=bool(causal), softmax_scale=scale, shard=shard, timeout_s=float(timeout_s),
              exchangers=exchangers)  # fmt: skip
    out, lse = RingFunction.apply(
        q, k, v, token_ring_forward, token_ring_backward, {**kw, "partial_dtype": partial_dtype}, kw
    )
    return (out, lse) if return_lse else out
