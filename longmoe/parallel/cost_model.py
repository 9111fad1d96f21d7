"""Cost model for sequence-parallel attention: exact bytes per link direction, and step time estimates.

``communication_bytes`` mirrors the implementations step by step (it walks the same
:class:`ShardLayout` segments), so its byte counts equal what the exchangers count, per rank and direction; tests assert that.
``estimate_time`` turns bytes and FLOPs into seconds for a :class:`Topology` (link bandwidth, whether ranks
form a full mesh or a ring, compute rate), assuming each step's communication overlaps its compute.
``choose_algorithm`` picks the cheapest.

Rule of thumb the model reproduces (bytes per query row, elements of size e): forward, TokenRing moves Q
one way and the partial output (+ fp32 LSE) the other, ``Hq*D*e`` each, where the KV ring moves
``2*Hkv*D*e``; backward, TokenRing moves q, dout (+ lse, delta) and returns an fp32 dQ, ``2*Hq*D*e`` and
``4*Hq*D``, where the KV ring moves K, V and fp32 dK, dV accumulators, ``2*Hkv*D*e + 8*Hkv*D``. Over a
forward plus backward in bf16 TokenRing moves fewer bytes when ``Hq/Hkv < 16/6 ~ 2.7``: MHA favours
TokenRing when communication dominates, GQA 8:1 the KV ring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from longmoe.parallel.plan import ShardLayout
from longmoe.parallel.token_ring import partial_direction

__all__ = [
    "ALGORITHMS",
    "AttentionShape",
    "Topology",
    "communication_bytes",
    "estimate_time",
    "choose_algorithm",
    "measure_topology",
]

ALGORITHMS: tuple[str, ...] = ("token_ring", "ring", "ulysses")
Algorithm = Literal["token_ring", "ring", "ulysses"]


@dataclass(kw_only=True, slots=True)
class AttentionShape:
    """One sequence-parallel attention call, as every rank sees it."""

    world_size: int
    """Ranks in the sequence-parallel group (P)."""
    batch: int
    seqlen_local: int
    """Tokens per rank (S / P)."""
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    """dtype of q/k/v (and of what travels, except fp32 partials, LSE and gradient accumulators)."""
    causal: bool = True
    layout: Literal["zigzag", "contiguous"] = "zigzag"
    partial_dtype: torch.dtype | None = None
    """dtype TokenRing returns partial outputs in (None: the input dtype); partial dQ is always fp32."""
    cu_seqlens: tuple[int, ...] | None = None
    """Packed documents: the global (ndocs + 1,) offsets (then ``seqlen_local`` is ignored: each rank's
    length follows from the per-document sharding)."""

    def __post_init__(self):
        for name in ("world_size", "batch", "seqlen_local", "heads_q", "heads_kv", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q={self.heads_q} must be a multiple of heads_kv={self.heads_kv}")

    @property
    def shard(self) -> ShardLayout:
        return ShardLayout.make(
            self.world_size, self.layout, seqlen_local=self.seqlen_local, cu_seqlens=self.cu_seqlens
        )

    @property
    def elt(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def partial_elt(self) -> int:
        return torch.finfo(self.partial_dtype or self.dtype).bits // 8


@dataclass(kw_only=True, slots=True)
class Topology:
    """What the ranks are connected by."""

    kind: Literal["mesh", "ring"] = "mesh"
    """"mesh": every pair of ranks has its own link (NVSwitch, a fully connected node, loopback); "ring":
    only neighbours are linked, traffic to rank r+s crosses s links."""
    link_bandwidth: float = 25e9
    """Bytes per second per link per direction."""
    compute_rate: float = 100e12
    """Attention FLOP/s of one rank."""
    latency: float = 10e-6
    """Seconds per message (launch and handshake)."""
    overlap: float = 1.0
    """Fraction of a step's communication hidden behind its compute: 1.0 when copy engines move the data
    (GPUs), less when the transport itself burns the cores that compute (gloo on CPU). A step costs
    ``max(compute, comm) + (1 - overlap) * min(compute, comm)``."""
    notes: dict = field(default_factory=dict)


def _add(d: dict, key: str, n: int) -> None:
    if n:
        d[key] = d.get(key, 0) + n


def communication_bytes(
    algorithm: str, shape: AttentionShape, rank: int, *, backward: bool = False
) -> dict[str, int]:
    """Bytes rank ``rank`` sends, by direction label ("next", "prev", "other"), in one forward
    (``backward=False``) or one backward pass; equal to what the implementation's exchangers count.

    Ulysses uses all-to-all collectives: its bytes are those sent to other ranks, under "other".
    """
    p, b, sl, hq, hkv, d = (
        shape.world_size,
        shape.batch,
        shape.seqlen_local,
        shape.heads_q,
        shape.heads_kv,
        shape.head_dim,
    )
    elt, pelt = shape.elt, shape.partial_elt
    out: dict[str, int] = {}
    if p == 1:
        return out
    shard, causal = shape.shard, shape.causal
    rows = lambda segs: sum(seg.num_q for seg in segs)
    if algorithm == "token_ring":
        # per travelling query row: q (fwd); q + dout + lse + delta (bwd)
        row_travel = hq * d * elt if not backward else 2 * hq * d * elt + 2 * hq * 4
        # per returned row: out + lse (fwd); fp32 dq (bwd)
        row_return = hq * d * pelt + hq * 4 if not backward else hq * d * 4
        for s in range(p):
            owner = (rank + s) % p
            if s < p - 1:
                _add(out, "prev", b * rows(shard.segments(owner, (rank - 1) % p, causal)) * row_travel)
            if s > 0:
                _add(out, partial_direction(s, p), b * rows(shard.segments(owner, rank, causal)) * row_return)
        return out
    if algorithm == "ring":
        row_kv = 2 * b * hkv * d * elt
        for s in range(p):
            held = shard.local_len((rank - s) % p)  # the K/V block this rank holds (and forwards) at step s
            if s < p - 1:
                _add(out, "next", held * row_kv)
            if backward:
                _add(out, "next", held * 2 * b * hkv * d * 4)  # fp32 dK/dV accumulators travel every step
        return out
    if algorithm == "ulysses":
        hkv_eff = max(hkv, p) if hkv % p else hkv
        per_pass = b * sl * d * elt * (2 * hq + 2 * hkv_eff)  # q, k, v there and out back
        if backward:
            per_pass = b * sl * d * elt * (2 * hq + 2 * hkv_eff)  # dout there, dq, dk, dv back
        _add(out, "other", per_pass * (p - 1) // p)
        return out
    raise ValueError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")


def _step_flops(shape: AttentionShape, nq: int, nk: int, causal: bool, backward: bool) -> float:
    f = 4.0 * shape.batch * shape.heads_q * nq * nk * shape.head_dim * (0.5 if causal else 1.0)
    return 2.5 * f if backward else f


def estimate_time(
    algorithm: str, shape: AttentionShape, topology: Topology, *, backward: bool = False
) -> float:
    """Estimated seconds of one forward (or backward) pass on every rank (ranks are symmetric)."""
    p, sl = shape.world_size, shape.shard.local_len(0)
    bw, rate, lat = topology.link_bandwidth, topology.compute_rate, topology.latency
    if p == 1:
        return (
            sum(
                _step_flops(shape, g.num_q, g.num_kv, g.causal, backward)
                for g in shape.shard.segments(0, 0, shape.causal)
            )
            / rate
        )
    if algorithm == "ulysses":
        total = sum(communication_bytes("ulysses", shape, 0, backward=backward).values())
        if topology.kind == "mesh":
            comm = total / (p - 1) / bw  # each peer link carries 1/(P-1) of it, all in parallel
        else:  # each destination d is reached over min(d, P-d) links, split between the two directions
            per_dst = total / (p - 1)
            load = sum(min(dd, p - dd) * per_dst for dd in range(1, p)) / 2
            comm = load / bw
        s = p * sl
        return comm + 2 * lat * (p - 1) + _step_flops(shape, s, s, shape.causal, backward) / p / rate
    return max(_ring_time(algorithm, shape, topology, r, backward) for r in range(p))


def _ring_time(algorithm: str, shape: AttentionShape, topology: Topology, rank: int, backward: bool) -> float:
    """Seconds of one pass on ``rank`` for the ring algorithms: per step
    ``max(compute, comm) + (1 - overlap) * min(compute, comm) + latency``."""
    p = shape.world_size
    bw, rate, lat = topology.link_bandwidth, topology.compute_rate, topology.latency
    elt, pelt = shape.elt, shape.partial_elt
    b, hq, hkv, d = shape.batch, shape.heads_q, shape.heads_kv, shape.head_dim
    shard, causal = shape.shard, shape.causal
    rows = lambda segs: sum(seg.num_q for seg in segs)
    total = 0.0
    for s in range(p):
        if algorithm == "ring":
            segs = shard.segments(rank, (rank - s) % p, causal)
            held = shard.local_len((rank - s) % p)
            kv = 2 * b * held * hkv * d * elt if s < p - 1 else 0
            grads = 2 * b * held * hkv * d * 4 if backward else 0
            comm = (kv + grads) / bw  # both go to the next rank
        elif algorithm == "token_ring":
            owner = (rank + s) % p
            segs = shard.segments(owner, rank, causal)
            travel = hq * d * elt if not backward else 2 * hq * d * elt + 8 * hq
            ret = hq * d * pelt + 4 * hq if not backward else hq * d * 4
            q_bytes = b * rows(shard.segments(owner, (rank - 1) % p, causal)) * travel if s < p - 1 else 0
            r_bytes = b * rows(segs) * ret if s > 0 else 0
            if topology.kind == "mesh":
                same_link = s == p - 1 or p == 2  # the owner is the previous rank: Q and partial share it
                comm = (q_bytes + r_bytes) / bw if same_link else max(q_bytes, r_bytes) / bw
            else:  # partials travel s hops forward: link r->r+1 carries s of them at step s
                comm = max(q_bytes, s * r_bytes) / bw
        else:
            raise ValueError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")
        compute = sum(_step_flops(shape, seg.num_q, seg.num_kv, seg.causal, backward) for seg in segs) / rate
        total += max(compute, comm) + (1.0 - topology.overlap) * min(compute, comm) + lat
    return total


def choose_algorithm(
    shape: AttentionShape, topology: Topology, *, backward: bool = True, candidates=ALGORITHMS
) -> tuple[str, dict[str, float]]:
    """The algorithm with the lowest estimated forward (+ backward) time, and every estimate.

    Ulysses is a candidate only when the heads split evenly over the ranks. Estimates within 2% of each
    other count as a tie, broken by the fewest bytes on the busiest link direction (less to lose when
    the overlap is worse than modelled).
    """
    est = {}
    for alg in candidates:
        if alg == "ulysses" and (
            shape.heads_q % shape.world_size
            or (shape.heads_kv % shape.world_size and shape.world_size % shape.heads_kv)
        ):
            continue
        t = estimate_time(alg, shape, topology)
        if backward:
            t += estimate_time(alg, shape, topology, backward=True)
        est[alg] = t
    fastest = min(est.values())
    tied = [a for a in est if est[a] <= fastest * 1.02]

    def busiest(alg: str) -> int:
        fwd = communication_bytes(alg, shape, 0)
        bwd = communication_bytes(alg, shape, 0, backward=True) if backward else {}
        labels = set(fwd) | set(bwd)
        return max((fwd.get(k, 0) + bwd.get(k, 0) for k in labels), default=0)

    best = min(tied, key=lambda a: (busiest(a), est[a]))
    return best, est


_MEASURED: dict[tuple, Topology] = {}


def measure_topology(group=None, *, nbytes: int = 8 << 20, repeats: int = 3, kind: str = "mesh") -> Topology:
    """Measure link bandwidth (a ring exchange of ``nbytes``), this rank's attention FLOP/s, and how much of
    an exchange hides behind a concurrent attention call; collective.

    The result is averaged over ranks (all-reduce) so every rank makes the same choice, and cached per
    group.
    """
    import torch.distributed as dist

    from longmoe.attention import flash_attention_forward
    from longmoe.parallel.plan import group_key, world_and_rank
    from longmoe.runtime.exchanger import P2PExchanger

    key = (group_key(group), kind)
    if key in _MEASURED:
        return _MEASURED[key]
    world, rank = world_and_rank(group)
    q = torch.randn(1, 1024, 8, 128)
    flash_attention_forward(q, q, q)
    t0 = time.perf_counter()
    flash_attention_forward(q, q, q)
    t_compute = time.perf_counter() - t0
    rate = 4.0 * 1024 * 1024 * 8 * 128 / t_compute
    bw, overlap = float("inf"), 1.0
    if world > 1:
        ex = P2PExchanger(group, timeout_s=60, name="measure_topology")
        buf = torch.empty(nbytes // 4)

        def exchange(step: int, with_compute: bool) -> float:
            t0 = time.perf_counter()
            ex.send_recv(buf, (rank + 1) % world, (rank - 1) % world, step=step)
            ex.commit()
            if with_compute:
                flash_attention_forward(q, q, q)
            ex.wait()
            return time.perf_counter() - t0

        t_comm = min(exchange(i, False) for i in range(repeats + 1))
        t_both = min(exchange(100 + i, True) for i in range(repeats))
        bw = nbytes / t_comm
        # Fraction of the shorter of the two that ran in the shadow of the other.
        overlap = (t_compute + t_comm - t_both) / min(t_compute, t_comm)
        stats = torch.tensor([bw, rate, overlap], dtype=torch.float64)
        dist.all_reduce(stats, group=group)
        bw, rate, overlap = (stats / world).tolist()
        overlap = min(max(overlap, 0.0), 1.0)
    topo = Topology(
        kind=kind, link_bandwidth=bw, compute_rate=rate, overlap=overlap, notes={"measured": True}
    )
    _MEASURED[key] = topo
    return topo
