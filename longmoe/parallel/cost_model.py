"""Cost model for sequence-parallel attention: exact bytes per link direction, and step time estimates.

``communication_bytes`` mirrors the implementations step by step (it walks the same
:class:`ShardLayout` segments), so its byte counts equal what the exchangers count, per rank and direction; tests assert that.
``estimate_time`` turns bytes and FLOPs into seconds for a :class:`Topology` (link bandwidth, whether ranks
form a full mesh or a ring, compute rate), assuming each step's communication overlaps its compute.
``choose_algorithm`` picks the cheapest. Compute comes either from a FLOP rate or, better, from a
:class:`ComputeProfile` (``profile_compute``): the measured time of every distinct kernel call the
algorithms make for this shape (ring chunks are smaller than Ulysses' one call, and kernels are not
equally efficient at every size), plus the partial merges. ``measure_topology`` measures the links
(bandwidth, per-message latency, how much communication hides behind compute).

Rule of thumb the model reproduces (bytes per query row, elements of size e): forward, TokenRing moves Q
one way and the partial output (+ fp32 LSE) the other, ``Hq*D*e`` each, where the KV ring moves
``2*Hkv*D*e``; backward, TokenRing moves q, dout (+ lse, delta) and returns an fp32 dQ, ``2*Hq*D*e`` and
``4*Hq*D``, where the KV ring moves K, V and fp32 dK, dV accumulators, ``2*Hkv*D*e + 8*Hkv*D``. Over a
forward plus backward in bf16 TokenRing moves fewer bytes when ``Hq/Hkv < 16/6 ~ 2.7``: MHA favours
TokenRing when communication dominates, GQA 8:1 the KV ring.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from longmoe.parallel.plan import ShardLayout
from longmoe.parallel.token_ring import partial_direction

__all__ = [
    "ALGORITHMS",
    "AttentionShape",
    "ComputeProfile",
    "Topology",
    "communication_bytes",
    "estimate_time",
    "choose_algorithm",
    "measure_topology",
    "profile_compute",
    "ulysses_applies",
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
    alltoall_bandwidth: float | None = None
    """Measured bytes per second one rank sends through ``all_to_all_single``; None: derived from ``link_bandwidth`` and ``kind``. Collective implementations differ
    from point-to-point ones (gloo on CPU: far from a mesh's P-1 parallel links)."""
    notes: dict = field(default_factory=dict)


CallKey = tuple[int, int, int, int, bool, bool]
"""(query rows, key rows, heads_q, heads_kv, causal, backward) of one attention kernel call."""


@dataclass(kw_only=True, slots=True)
class ComputeProfile:
    """Measured seconds of attention kernel calls on one rank (averaged over the group's ranks).

    ``calls`` maps a :data:`CallKey` to seconds; ``merge_per_row`` is the seconds to fold one query row's
    fp32 partial into the running output (forward) or one row of partial dQ (backward) per head. A call
    not in the table is costed at ``flops / rate`` with ``rate`` the measured rate of the nearest
    measured call (or the topology's ``compute_rate`` when nothing was measured).
    """

    calls: dict[CallKey, float] = field(default_factory=dict)
    merge_per_row: float = 0.0

    def rate(self, shape: AttentionShape) -> float | None:
        """FLOP/s of the largest measured call (None if none)."""
        if not self.calls:
            return None
        key = max(self.calls, key=lambda c: _call_flops(shape, c))
        return _call_flops(shape, key) / self.calls[key]


def _call_flops(shape: AttentionShape, key: CallKey) -> float:
    nq, nk, hq, _, causal, backward = key
    f = 4.0 * shape.batch * hq * nq * nk * shape.head_dim * (0.5 if causal else 1.0)
    return 2.5 * f if backward else f


def _call_time(
    shape: AttentionShape, topology: Topology, profile: ComputeProfile | None, key: CallKey
) -> float:
    if profile is not None:
        if key in profile.calls:
            return profile.calls[key]
        rate = profile.rate(shape)
        if rate is not None:
            return _call_flops(shape, key) / rate
    return _call_flops(shape, key) / topology.compute_rate


def ulysses_applies(shape: AttentionShape) -> bool:
    """Whether Ulysses can split these heads over the ranks: query heads evenly, and K/V heads evenly or
    (repeated) when fewer than the ranks and dividing them."""
    p = shape.world_size
    return shape.heads_q % p == 0 and (shape.heads_kv % p == 0 or p % shape.heads_kv == 0)


def ulysses_heads(shape: AttentionShape) -> tuple[int, int]:
    """(query heads, key/value heads) of each rank's one attention call under Ulysses (K/V heads are
    repeated up to P when fewer than P)."""
    p = shape.world_size
    hkv_eff = max(shape.heads_kv, p) if shape.heads_kv % p else shape.heads_kv
    return shape.heads_q // p, hkv_eff // p


def compute_calls(algorithm: str, shape: AttentionShape, rank: int, backward: bool) -> list[CallKey]:
    """The attention kernel calls ``rank`` makes in one pass of ``algorithm``, in order."""
    p, shard, causal = shape.world_size, shape.shard, shape.causal
    hq, hkv = shape.heads_q, shape.heads_kv
    if algorithm == "ulysses" and p > 1:
        s = shard.local_len(0) * p
        return [(s, s, *ulysses_heads(shape), causal, backward)]
    calls = []
    for step in range(p):
        owner, kv_rank = ((rank + step) % p, rank) if algorithm == "token_ring" else (rank, (rank - step) % p)
        calls += [
            (g.num_q, g.num_kv, hq, hkv, g.causal, backward) for g in shard.segments(owner, kv_rank, causal)
        ]
    return calls


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


def estimate_time(
    algorithm: str,
    shape: AttentionShape,
    topology: Topology,
    *,
    backward: bool = False,
    profile: ComputeProfile | None = None,
) -> float:
    """Estimated seconds of one forward (or backward) pass (the slowest rank's), with kernel times from
    ``profile`` where it has them, else from ``topology.compute_rate``."""
    p = shape.world_size
    bw, lat = topology.link_bandwidth, topology.latency
    if p == 1:
        return sum(_call_time(shape, topology, profile, c) for c in compute_calls("ring", shape, 0, backward))
    if algorithm == "ulysses":
        total = sum(communication_bytes("ulysses", shape, 0, backward=backward).values())
        if topology.alltoall_bandwidth is not None:
            comm = total / topology.alltoall_bandwidth
        elif topology.kind == "mesh":
            comm = total / (p - 1) / bw  # each peer link carries 1/(P-1) of it, all in parallel
        else:  # each destination d is reached over min(d, P-d) links, split between the two directions
            per_dst = total / (p - 1)
            load = sum(min(dd, p - dd) * per_dst for dd in range(1, p)) / 2
            comm = load / bw
        (call,) = compute_calls("ulysses", shape, 0, backward)
        return comm + 2 * lat * (p - 1) + _call_time(shape, topology, profile, call)
    return max(_ring_time(algorithm, shape, topology, r, backward, profile) for r in range(p))


def _ring_time(
    algorithm: str, shape: AttentionShape, topology: Topology, rank: int, backward: bool, profile
) -> float:
    """Seconds of one pass on ``rank`` for the ring algorithms: per step
    ``max(compute, comm) + (1 - overlap) * min(compute, comm) + messages * latency``, where compute
    includes merging the step's partial results."""
    p = shape.world_size
    bw, lat = topology.link_bandwidth, topology.latency
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
            msgs = (2 if s < p - 1 else 0) + (2 if backward else 0)  # k, v; dk, dv accumulators
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
            # q (fwd) or q, dout, lse, delta (bwd) travel; out, lse (fwd) or dq (bwd) return
            msgs = ((4 if backward else 1) if s < p - 1 else 0) + ((1 if backward else 2) if s > 0 else 0)
        else:
            raise ValueError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")
        compute = sum(
            _call_time(shape, topology, profile, (g.num_q, g.num_kv, hq, hkv, g.causal, backward))
            for g in segs
        )
        if profile is not None and s > 0:
            # forward: every partial after the first is merged into the running output; backward: partial
            # dQ is added (and, for the ring, the travelling fp32 dK/dV accumulators)
            heads_rows = hq * rows(segs)
            if algorithm == "ring" and backward:
                heads_rows += 2 * hkv * sum(g.num_kv for g in segs)
            compute += profile.merge_per_row * b * heads_rows
        total += max(compute, comm) + (1.0 - topology.overlap) * min(compute, comm) + msgs * lat
    return total


def choose_algorithm(
    shape: AttentionShape,
    topology: Topology,
    *,
    backward: bool = True,
    candidates=ALGORITHMS,
    profile: ComputeProfile | None = None,
) -> tuple[str, dict[str, float]]:
    """The algorithm with the lowest estimated forward (+ backward) time, and every estimate
    (``profile``: measured kernel times, see :func:`profile_compute`).

    Ulysses is a candidate only when the heads split evenly over the ranks. Estimates within 2% of each
    other count as a tie, broken by the fewest bytes on the busiest link direction (less to lose when
    the overlap is worse than modelled).
    """
    est = {}
    for alg in candidates:
        if alg == "ulysses" and not ulysses_applies(shape):
            continue
        t = estimate_time(alg, shape, topology, profile=profile)
        if backward:
            t += estimate_time(alg, shape, topology, backward=True, profile=profile)
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
    """Measure link bandwidth (a ring exchange of ``nbytes``), this rank's attention FLOP/s, how much of an
    exchange hides behind a concurrent attention call, the per-message latency and the all-to-all
    bandwidth; collective.

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
    t_compute = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        flash_attention_forward(q, q, q)
        t_compute = min(t_compute, time.perf_counter() - t0)
    rate = 4.0 * 1024 * 1024 * 8 * 128 / t_compute
    bw, overlap = float("inf"), 1.0
    if world > 1:
        ex = P2PExchanger(group, timeout_s=60, name="measure_topology")
        buf = torch.empty(nbytes // 4)

        def exchange(step: int, with_compute: bool) -> float:
            dist.barrier(group=group)  # start together: skew between ranks is not link time
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
        # Per-message latency: rounds of back-to-back tiny exchanges (median round: on shared cores a rank
        # is sometimes descheduled, and the ring algorithms pay that on every step).
        tiny, n_msgs, rounds = torch.empty(16), 16, []
        for r in range(repeats):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            for i in range(n_msgs):
                ex.send_recv(tiny, (rank + 1) % world, (rank - 1) % world, step=200 + r * n_msgs + i)
                ex.commit()
                ex.wait()
            rounds.append((time.perf_counter() - t0) / n_msgs)
        latency = statistics.median(rounds)
        # all-to-all, as Ulysses uses it: a (P, n) tensor out, the same back (bytes sent = (P-1)/P of it)
        a2a_in = torch.empty(world, nbytes // 4 // world)
        a2a_out = torch.empty_like(a2a_in)
        a2a = float("inf")
        for _ in range(repeats):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_to_all_single(a2a_out, a2a_in, group=group)
            a2a = min(a2a, time.perf_counter() - t0)
        a2a_bw = a2a_in.numel() * 4 * (world - 1) / world / a2a
        stats = torch.tensor([bw, rate, overlap, latency, a2a_bw], dtype=torch.float64)
        dist.all_reduce(stats, group=group)
        bw, rate, overlap, latency, a2a_bw = (stats / world).tolist()
        overlap = min(max(overlap, 0.0), 1.0)
    else:
        latency, a2a_bw = 0.0, None
    topo = Topology(
        kind=kind, link_bandwidth=bw, compute_rate=rate, overlap=overlap, latency=latency,
        alltoall_bandwidth=a2a_bw,
        notes={"measured": True},
    )  # fmt: skip
    _MEASURED[key] = topo
    return topo


_PROFILES: dict[tuple, ComputeProfile] = {}


def profile_compute(
    shape: AttentionShape,
    group=None,
    *,
    backward: bool = True,
    algorithms=ALGORITHMS,
    max_calls: int = 8,
    device: torch.device | str = "cpu",
) -> ComputeProfile:
    """Time each distinct attention kernel call ``algorithms`` make for ``shape`` (forward, and backward
    with ``backward``) and the partial merge, on every rank of ``group`` at once (so they contend for the
    machine as they will when running); the times are averaged over ranks so every rank makes the same
    choice. Collective; cached per (shape, backward, algorithms, group, device).

    Costs about one ring pass plus one Ulysses call of compute. With many distinct calls (packed
    documents) only the ``max_calls`` largest are timed; the rest are costed at the largest one's rate.
    """
    import torch.distributed as dist

    from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
    from longmoe.attention.merge import merge_attention_partials_
    from longmoe.parallel.plan import group_key, world_and_rank

    world, _ = world_and_rank(group)
    cache_key = (
        world, shape.batch, shape.seqlen_local, shape.heads_q, shape.heads_kv, shape.head_dim, shape.dtype,
        shape.causal, shape.layout, shape.cu_seqlens, backward, tuple(algorithms), group_key(group), str(device),
    )  # fmt: skip
    if cache_key in _PROFILES:
        return _PROFILES[cache_key]
    keys: set[CallKey] = set()
    for alg in algorithms:
        for r in range(shape.world_size):
            for bwd in (False, True) if backward else (False,):
                keys.update(compute_calls(alg, shape, r, bwd))
    ordered = sorted(keys, key=lambda c: (-_call_flops(shape, c), c))[:max_calls]
    b, d, dtype = shape.batch, shape.head_dim, shape.dtype
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g, device=device).to(dtype)

    times = []
    for i, (nq, nk, hq, hkv, causal, bwd) in enumerate(ordered):
        q, k, v = rand(b, nq, hq, d), rand(b, nk, hkv, d), rand(b, nk, hkv, d)
        if i == 0:
            flash_attention_forward(q, k, v, causal=causal)  # warm-up: thread pool, lazily loaded kernels
        if world > 1:
            dist.barrier(group=group)  # every rank computes at once, contending as in a real pass
        t0 = time.perf_counter()
        out, lse = flash_attention_forward(q, k, v, causal=causal, out_dtype=torch.float32)
        if bwd:
            dout = rand(b, nq, hq, d)
            delta = attention_delta(dout, out)
            if world > 1:
                dist.barrier(group=group)
            t0 = time.perf_counter()
            flash_attention_backward(
                dout, q, k, v, None, lse, delta=delta, causal=causal, grad_dtype=torch.float32
            )
        times.append(time.perf_counter() - t0)
    rows = max((c[0] for c in ordered), default=1)
    hq = shape.heads_q
    acc_o = torch.zeros(b, rows, hq, d, device=device)
    acc_l = torch.zeros(b, hq, rows, device=device)
    part_o = torch.randn(b, rows, hq, d, generator=g, device=device)
    part_l = torch.randn(b, hq, rows, generator=g, device=device)
    t0 = time.perf_counter()
    merge_attention_partials_(acc_o, acc_l, part_o, part_l)
    times.append((time.perf_counter() - t0) / (b * rows * hq))
    stats = torch.tensor(times, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, group=group)
        stats /= world
    *call_times, merge = stats.tolist()
    prof = ComputeProfile(calls=dict(zip(ordered, call_times, strict=True)), merge_per_row=merge)
    _PROFILES[cache_key] = prof
    return prof
