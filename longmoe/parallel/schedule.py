"""Ring schedules as data: what each rank computes and which rows move at every step of a ring pass.

A schedule is a tuple of :class:`RingStep`, one per step, for one rank. The ring implementations
(``token_ring.py``, ``kv_ring.py``) walk it to post their sends and receives and to run their kernel
calls; the cost model (``cost_model.py``) walks the same steps to count bytes, messages and kernel calls.
The two cannot drift apart, and a data-dependent schedule (block-sparse rings, which skip empty blocks)
plugs in here by building different steps.

TokenRing, rank ``r`` of ``P``, step ``s`` (``owner = r + s``):
  * compute: the owner's query rows against this rank's own keys (``segments(owner, r)``);
  * ``query`` to ``r - 1``: the owner's rows that rank needs at step ``s + 1``; ``query`` from ``r + 1``:
    the rows of owner ``r + s + 1`` this rank needs (steps ``s < P - 1``);
  * ``partial`` to the owner (steps ``s > 0``), and from rank ``r - s`` the partial of this rank's own
    queries that it computed.
KV ring, step ``s``: compute this rank's queries against the keys of rank ``r - s``; ``kv`` (the held K/V
block) to ``r + 1`` and the next one from ``r - 1`` (steps ``s < P - 1``); backward adds ``kv_grad`` (the
fp32 dK/dV accumulators of the held block) to ``r + 1`` at every step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from longmoe.parallel.layout import ShardLayout, StepSegment
from longmoe.runtime.distributed import ring_direction

__all__ = ["Payload", "Transfer", "RingStep", "RING_ALGORITHMS", "ring_schedule"]

Payload = Literal["query", "partial", "kv", "kv_grad"]
"""What a transfer carries: ``query`` rows that travel like Q (q; backward also dout, lse, delta);
``partial`` results returned to their owner (out and lse; backward dQ); ``kv`` a K/V block; ``kv_grad`` the
fp32 dK/dV accumulators of a K/V block."""

RING_ALGORITHMS: tuple[str, ...] = ("token_ring", "kv_ring")


@dataclass(frozen=True, slots=True)
class Transfer:
    """Rows one rank sends to (or receives from) ``peer`` at one step.

    ``direction`` is the byte-accounting label of the message's travel (the sender's ``ring_direction``),
    the same for the send and its receive. ``segments`` are the query blocks whose rows move (``query`` and
    ``partial``; empty for K/V payloads); ``rows`` counts query rows or key rows.
    """

    payload: Payload
    peer: int
    direction: str
    rows: int
    segments: tuple[StepSegment, ...] = ()


@dataclass(frozen=True, slots=True)
class RingStep:
    """One step on one rank: the owner of the queries and the rank of the keys computed here, the blocks
    computed (``compute``), and the transfers posted at this step."""

    index: int
    owner: int
    kv_rank: int
    compute: tuple[StepSegment, ...]
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]

    def sent(self, payload: Payload) -> tuple[Transfer, ...]:
        return tuple(t for t in self.sends if t.payload == payload)

    def received(self, payload: Payload) -> tuple[Transfer, ...]:
        return tuple(t for t in self.recvs if t.payload == payload)


def _query_transfer(payload: Payload, peer: int, direction: str, segments) -> tuple[Transfer, ...]:
    rows = sum(seg.num_q for seg in segments)
    return (Transfer(payload, peer, direction, rows, tuple(segments)),) if rows else ()


def _token_ring(shard: ShardLayout, causal: bool, rank: int) -> tuple[RingStep, ...]:
    p = shard.world
    prev, nxt = (rank - 1) % p, (rank + 1) % p
    steps = []
    for s in range(p):
        owner = (rank + s) % p
        compute = shard.segments(owner, rank, causal)
        sends, recvs = (), ()
        if s < p - 1:
            sends += _query_transfer("query", prev, "prev", shard.segments(owner, prev, causal))
            recvs += _query_transfer("query", nxt, "prev", shard.segments((owner + 1) % p, rank, causal))
        if s > 0:
            label = ring_direction(s, p)
            sends += _query_transfer("partial", owner, label, compute)
            src = (rank - s) % p
            recvs += _query_transfer("partial", src, label, shard.segments(rank, src, causal))
        steps.append(RingStep(s, owner, rank, compute, sends, recvs))
    return tuple(steps)


def _kv_ring(shard: ShardLayout, causal: bool, rank: int, backward: bool) -> tuple[RingStep, ...]:
    p = shard.world
    prev, nxt = (rank - 1) % p, (rank + 1) % p
    steps = []
    for s in range(p):
        kv_rank = (rank - s) % p
        held, arriving = shard.local_len(kv_rank), shard.local_len((kv_rank - 1) % p)
        sends, recvs = (), ()
        if s < p - 1:
            sends += (Transfer("kv", nxt, "next", held),)
            recvs += (Transfer("kv", prev, "next", arriving),)
        if backward and p > 1:  # the accumulators travel with their block and reach its owner after P hops
            sends += (Transfer("kv_grad", nxt, "next", held),)
            recvs += (Transfer("kv_grad", prev, "next", arriving),)
        steps.append(RingStep(s, rank, kv_rank, shard.segments(rank, kv_rank, causal), sends, recvs))
    return tuple(steps)


@functools.lru_cache(maxsize=4096)
def ring_schedule(
    algorithm: str, shard: ShardLayout, causal: bool, rank: int, *, backward: bool = False
) -> tuple[RingStep, ...]:
    """The steps of one ``algorithm`` pass ("token_ring" or "kv_ring") on ``rank`` of ``shard.world``;
    ``backward`` selects the backward pass (TokenRing's steps are the same both ways, only the payloads'
    sizes differ; the KV ring's backward also moves dK/dV accumulators)."""
    if not 0 <= rank < shard.world:
        raise ValueError(f"rank={rank} is outside the ring of {shard.world} ranks")
    if algorithm == "token_ring":
        return _token_ring(shard, bool(causal), rank)
    if algorithm == "kv_ring":
        return _kv_ring(shard, bool(causal), rank, bool(backward))
    raise ValueError(f"algorithm={algorithm!r} has no ring schedule; expected one of {RING_ALGORITHMS}")
