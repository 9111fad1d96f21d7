"""Decode attention over a :class:`ShardedKVCache` (TokenRing's pattern applied to one new token).

For each decoded token and layer, every rank of the group:

1. has the token's query ``(batch, 1, heads_q, head_dim)``. In :func:`longmoe.generate` the non-attention
   part of a decode step is replicated on every rank (every rank has the token and the same hidden state),
   so the query needs no broadcast: 0 bytes instead of the ``B x Hq x D`` broadcast an owner-computes
   design would send;
2. attends over its own cache shard with :func:`flash_attention_forward` (fp32 ``(out, lse)``; an empty
   shard gives ``lse = -inf`` and ``out = 0``);
3. merges the partials ``(batch, heads_q, head_dim + 1)`` fp32 exactly, so that every rank has the result
   (the next part of the step is replicated), in one of three ways (:data:`DECODE_MERGES`):

   * ``"allgather"``: every rank all-gathers every partial and merges in rank order (a ring: ``P - 1``
     rounds, ``(P - 1)`` partials sent per rank);
   * ``"owner"``: the partials of the sequences a rank owns (the rank storing their new token) are gathered
     to it, merged in rank order, and the merged ``(b, Hq, D)`` broadcast back: 2 rounds per distinct owner;
   * ``"allreduce"``: an all-reduce (max) of the LSEs, then one (sum) of ``exp(lse - max) * [out | 1]``
     (gloo's ring: ``4 (P - 1)`` rounds of ``1/P`` chunks; NCCL's trees need fewer rounds).

   :func:`choose_decode_merge` picks the cheapest on a :class:`~longmoe.parallel.Topology` (per round:
   latency + the busiest link's time). Measured with gloo on this 2-core machine (Hq 32, D 128, median of
   140 calls): P = 2, B = 1 allgather 1.0 ms, owner 1.2, allreduce 1.3; P = 4, B = 1 owner 2.3 ms,
   allgather 4.1-4.7, allreduce 10.6; P = 4, B = 4 (four owners) allgather 4.6-5.8 ms, owner 10.2-10.9 -
   the order the per-round model predicts. Every merge returns the same values on every rank.

Bytes per decoded token per rank (:func:`decode_bytes`): ``layers x (P - 1) x B x Hq x (D + 1) x 4`` for
the all-gather, independent of the context length. The naive alternative, all-gathering the K/V cache to
one rank, moves ``layers x context x 2 x Hkv x D x itemsize``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longmoe.attention.flash_attention import flash_attention_forward
from longmoe.attention.merge import merge_attention_partials
from longmoe.runtime.distributed import world_and_rank
from longmoe.runtime.exchanger import CommStats

__all__ = [
    "DECODE_MERGES", "DecodeError", "DecodeContext", "sharded_decode_attention", "decode_bytes", "merge_sends",
    "decode_merge_time", "choose_decode_merge",
]  # fmt: skip

DECODE_MERGES = ("allgather", "allreduce", "owner")
"""How decode partials merge: every rank all-gathers them; two all-reduces; or on the token's owner, then
broadcast. ``"auto"`` (in :func:`longmoe.generate`) picks the cheapest with :func:`choose_decode_merge`."""


class DecodeError(RuntimeError):
    """A decode collective failed or timed out; the message names the rank, layer and token step."""


@dataclass(slots=True)
class DecodeContext:
    """What the attention function needs besides the tensors (set on each attention module by generate).

    Fields: ``phase`` ("prefill" or "decode"); ``cache``; ``group``; ``layout``/``algorithm``/``cu_seqlens``
    for the sequence-parallel prefill; ``step`` (the token step, for error messages); ``timeout_s`` (every
    wait); ``stats`` (bytes moved, or None); ``merge`` and ``owners`` (this step's partial merge and each
    sequence's token owner); ``sparse`` (an XAttentionConfig for the prefill, or None); ``topology`` (for
    the cost model).
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
    merge: str = "allgather"
    owners: list[int] | None = None
    sparse: object | None = None
    topology: object | None = None


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
    merge: str = "allgather",
    owners: list[int] | None = None,
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
    if merge not in DECODE_MERGES:
        raise ValueError(f"merge={merge!r}; expected one of {DECODE_MERGES}")
    if merge == "owner" and (
        owners is None or len(owners) != batch or any(not 0 <= r < world for r in owners)
    ):
        raise ValueError(f"merge='owner' needs owners: one rank in 0..{world - 1} per sequence; got {owners}")
    lse = lse.reshape(batch, hq, 1)
    where = f"rank {rank}: decode attention at token step {step}, layer {layer} (group of {world})"
    if merge == "allgather":
        merged = _merge_allgather(out[:, 0], lse, group, world, timeout_s, where, stats)
    elif merge == "allreduce":
        merged = _merge_allreduce(out[:, 0], lse, group, world, timeout_s, where, stats)
    else:
        merged = _merge_owner(out[:, 0], lse, owners, group, world, rank, timeout_s, where, stats)
    return merged.unsqueeze(1).to(q.dtype)


def _collective(fn, *args, where: str, what: str, timeout_s: float, **kwargs) -> None:
    """Run ``fn(*args, async_op=True, **kwargs)`` (a torch.distributed collective) and wait at most
    ``timeout_s``; a failure or timeout raises :class:`DecodeError` naming ``where`` and ``what``."""
    try:
        work = fn(*args, async_op=True, **kwargs)
        if work.wait(timeout=datetime.timedelta(seconds=timeout_s)) is False:
            raise RuntimeError(f"timed out after {timeout_s} s")
    except RuntimeError as err:
        raise DecodeError(
            f"{where}: the {what} failed within {timeout_s} s - a rank died or stalled. Cause: {err}"
        ) from err


def _merge_in_order(parts: list[torch.Tensor], d: int) -> torch.Tensor:
    """parts: per rank (B, Hq, D + 1) fp32 [out | lse] -> merged (B, Hq, D), in rank order."""
    acc_out, acc_lse = parts[0][..., :d].unsqueeze(1), parts[0][..., d:]
    for p in parts[1:]:
        acc_out, acc_lse = merge_attention_partials(acc_out, acc_lse, p[..., :d].unsqueeze(1), p[..., d:])
    return acc_out[:, 0]


def _merge_allgather(out, lse, group, world, timeout_s, where, stats) -> torch.Tensor:
    """Every rank gathers every partial (B, Hq, D + 1) and merges in rank order: bit-identical everywhere."""
    mine = torch.cat([out, lse], dim=-1).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    _collective(dist.all_gather, parts, mine, group=group, where=where, what="all-gather of attention partials",
                timeout_s=timeout_s)  # fmt: skip
    if stats is not None:
        stats.add("decode_allgather", (world - 1) * mine.nbytes, (world - 1) * mine.nbytes)
    return _merge_in_order(parts, out.shape[-1])


def _merge_allreduce(out, lse, group, world, timeout_s, where, stats) -> torch.Tensor:
    """Two all-reduces: the max LSE (B, Hq, 1), then the sum of ``exp(lse - max) * [out | 1]`` (B, Hq, D + 1);
    out = sum / weight. Every rank receives the same reduced bytes, so the result is identical everywhere."""
    top = lse.clone()
    _collective(dist.all_reduce, top, op=dist.ReduceOp.MAX, group=group, where=where,
                what="all-reduce (max) of attention LSEs", timeout_s=timeout_s)  # fmt: skip
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)  # 0 for an empty shard (lse = -inf)
    acc = torch.cat([out * w, w], dim=-1).contiguous()
    _collective(dist.all_reduce, acc, group=group, where=where, what="all-reduce (sum) of weighted attention partials",
                timeout_s=timeout_s)  # fmt: skip
    if stats is not None:  # a ring all-reduce sends 2 (P - 1) chunks of 1/P of the tensor from every rank
        sent = 2 * (world - 1) * (-(-top.nbytes // world) + -(-acc.nbytes // world))
        stats.add("decode_allreduce", sent, sent)
    d = out.shape[-1]
    return acc[..., :d] / acc[..., d:]


def _merge_owner(out, lse, owners, group, world, rank, timeout_s, where, stats) -> torch.Tensor:
    """Per owner ``o`` of some sequences: gather their partials to ``o``, merge there in rank order, broadcast
    the merged (b_o, Hq, D) back (every rank continues the replicated step, so every rank needs it)."""
    d = out.shape[-1]
    merged = torch.empty_like(out)
    group_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    sent = received = 0
    for o in sorted(set(owners)):
        rows = [b for b, r in enumerate(owners) if r == o]
        mine = torch.cat([out[rows], lse[rows]], dim=-1).contiguous()
        parts = [torch.empty_like(mine) for _ in range(world)] if rank == o else None
        _collective(dist.gather, mine, parts, dst=group_ranks[o], group=group, where=where,
                    what=f"gather of attention partials to owner rank {o}", timeout_s=timeout_s)  # fmt: skip
        res = (
            _merge_in_order(parts, d).contiguous() if rank == o else out.new_empty(len(rows), *out.shape[1:])
        )
        _collective(dist.broadcast, res, src=group_ranks[o], group=group, where=where,
                    what=f"broadcast of the merged attention from owner rank {o}", timeout_s=timeout_s)  # fmt: skip
        merged[rows] = res
        sent += (world - 1) * res.nbytes if rank == o else mine.nbytes
        received += (world - 1) * mine.nbytes if rank == o else res.nbytes
    if stats is not None:
        stats.add("decode_owner", sent, received)
    return merged


def merge_sends(merge: str, *, world: int, batch: int, heads_q: int, head_dim: int,
                owners: list[int] | None = None) -> list[list[tuple[int, int, int]]]:  # fmt: skip
    """The messages of one layer's merge as rounds, each a list of ``(src, dst, bytes)`` sent at once, as the
    gloo/NCCL algorithms run them: ``"allgather"`` a ring of ``P - 1`` rounds of the whole partial;
    ``"allreduce"`` two ring all-reduces (LSE max, weighted sum), ``2 (P - 1)`` rounds each of ``1/P`` of
    the tensor; ``"owner"`` per distinct owner a gather round into it and a broadcast round out of it."""
    if merge not in DECODE_MERGES:
        raise ValueError(f"merge={merge!r}; expected one of {DECODE_MERGES}")
    part = batch * heads_q * (head_dim + 1) * 4
    ring = [(r, (r + 1) % world) for r in range(world)]
    if merge == "allgather":
        return [[(s, t, part) for s, t in ring] for _ in range(world - 1)]
    if merge == "allreduce":
        rounds = []
        for n in (batch * heads_q * 4, part):
            rounds += [[(s, t, -(-n // world)) for s, t in ring] for _ in range(2 * (world - 1))]
        return rounds
    owners = [0] * batch if owners is None else owners
    rounds = []
    for o in sorted(set(owners)):
        rows = sum(1 for r in owners if r == o)
        rounds.append([(r, o, rows * heads_q * (head_dim + 1) * 4) for r in range(world) if r != o])
        rounds.append([(o, r, rows * heads_q * head_dim * 4) for r in range(world) if r != o])
    return rounds


def decode_merge_time(merge: str, topology, *, world: int, batch: int, heads_q: int, head_dim: int,
                      owners: list[int] | None = None) -> float:  # fmt: skip
    """Modelled seconds of one layer's merge on ``topology`` (a :class:`longmoe.parallel.Topology`): per round,
    its per-message latency plus the busiest link direction's time (:meth:`Topology.link_time`)."""
    if world == 1:
        return 0.0
    rounds = merge_sends(merge, world=world, batch=batch, heads_q=heads_q, head_dim=head_dim, owners=owners)
    return sum(topology.latency + topology.link_time(sends, world)[0] for sends in rounds)


def choose_decode_merge(topology, *, world: int, batch: int, heads_q: int, head_dim: int,
                        owners: list[int] | None = None) -> tuple[str, dict[str, float]]:  # fmt: skip
    """The cheapest merge on ``topology`` and every merge's modelled seconds (ties: the order of
    :data:`DECODE_MERGES`). Deterministic, so every rank given the same topology picks the same."""
    times = {
        m: decode_merge_time(
            m, topology, world=world, batch=batch, heads_q=heads_q, head_dim=head_dim, owners=owners
        )  # fmt: skip
        for m in DECODE_MERGES
    }
    return min(DECODE_MERGES, key=lambda m: times[m]), times


def decode_bytes(
    *, world: int, batch: int, heads_q: int, heads_kv: int, head_dim: int, context: int, layers: int,
    itemsize: int = 4, merge: str = "allgather", owners: list[int] | None = None,
) -> dict[str, int]:  # fmt: skip
    """Bytes the busiest rank sends per decoded token (all layers): ``"token_ring"`` (the partial merge
    ``merge``, independent of ``context``) and ``"naive_kv_gather"`` (every non-root rank sends its
    ``context / P`` tokens of K and V to one rank, which attends over the whole cache)."""
    if world == 1:
        return {"token_ring": 0, "naive_kv_gather": 0}
    rounds = merge_sends(merge, world=world, batch=batch, heads_q=heads_q, head_dim=head_dim, owners=owners)
    per_rank = [0] * world
    for sends in rounds:
        for src, _, n in sends:
            per_rank[src] += n
    shard = -(-context // world)
    naive = layers * batch * shard * 2 * heads_kv * head_dim * itemsize
    return {"token_ring": layers * max(per_rank), "naive_kv_gather": naive}
