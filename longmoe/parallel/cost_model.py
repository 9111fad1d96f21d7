"""Cost model for sequence-parallel attention: exact bytes per link direction, and step time estimates.

Pure: no process group, no timing (measuring is :mod:`longmoe.parallel.measure`). The ring algorithms are
costed by walking the same :func:`~longmoe.parallel.schedule.ring_schedule` steps the implementations
walk, with one per-step traffic function (:func:`step_traffic`), so ``communication_bytes`` equals what
the exchangers count, per rank and direction (tests assert that), and ``estimate_time`` sees the same
transfers and kernel calls.
``estimate_time`` turns bytes and FLOPs into seconds for a :class:`Topology` (which link directions each
message crosses in a mesh, ring, switch or several nodes, their bandwidth, the compute rate, how much of a
step's communication its compute hides).
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

from dataclasses import dataclass, field
from typing import Literal

import torch

from longmoe.parallel.layout import Layout, ShardLayout
from longmoe.parallel.schedule import RING_ALGORITHMS, RingStep, Transfer, ring_schedule

__all__ = [
    "ALGORITHMS",
    "AttentionShape",
    "ComputeProfile",
    "Topology",
    "communication_bytes",
    "estimate_breakdown",
    "estimate_time",
    "choose_algorithm",
    "link_loads",
    "link_name",
    "compute_calls",
    "step_traffic",
    "ulysses_applies",
]

ALGORITHMS: tuple[str, ...] = (*RING_ALGORITHMS, "ulysses")
"""Every sequence-parallel algorithm, by the name ``sequence_parallel_attention(algorithm=...)`` takes."""
Algorithm = Literal["token_ring", "kv_ring", "ulysses"]


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
    layout: Layout = "zigzag"
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


Link = tuple
"""One direction of one physical link, as :meth:`Topology.path` names it: ``("p2p", a, b)`` (mesh),
``("hop", a, b)`` (ring neighbours), ``("up", r)`` / ``("down", r)`` (a rank's NIC into / out of a switch),
``("node_up", n, k)`` / ``("node_down", n, k)`` (node ``n``'s ``k``-th link into / out of the fabric)."""


@dataclass(kw_only=True, slots=True)
class Topology:
    """What the ranks are connected by: every link direction's bandwidth and how messages are routed.

    Inside a node (``kind``): ``"mesh"``, a link per pair of ranks (NVSwitch, loopback); ``"ring"``, links
    between neighbours only, a message to rank ``r + s`` crossing ``min(s, P - s)`` of them (the shorter way,
    ties forward: a PCIe/NVLink ring, or the emulated ``ring``); ``"switch"``, one NIC per rank into a
    switch, so everything a rank sends shares one direction of its NIC (the emulated ``switch``). With
    ``nodes > 1`` the ranks are split into nodes of consecutive ranks, and traffic between nodes goes over
    ``inter_node_links`` links per node (None: one per rank, rail-optimised like one NIC per GPU) of
    ``inter_node_bandwidth`` into a non-blocking fabric; under ``kind="switch"`` it first crosses the
    rank's NIC (the emulated ``two_nodes``: bridges joined by one shared link).
    """

    kind: Literal["mesh", "ring", "switch"] = "mesh"
    link_bandwidth: float = 25e9
    """Bytes per second per link per direction (inside a node)."""
    compute_rate: float = 100e12
    """Attention FLOP/s of one rank."""
    latency: float = 10e-6
    """Seconds per message (launch and handshake)."""
    overlap: float = 1.0
    """Fraction of a step's communication hidden behind its compute: 1.0 when copy engines move the data
    (GPUs), less when the transport itself burns the cores that compute (gloo on CPU). A step costs
    ``max(compute, comm) + (1 - overlap) * min(compute, comm)``; with ``comm_overlap`` set, ``overlap`` is
    the fraction of compute hidden behind longer communication."""
    comm_overlap: float | None = None
    """Fraction of a step's communication hidden when it is shorter than the compute (None: ``overlap``).
    It differs where the transport needs the cores the compute is using (gloo on shared CPU cores)."""
    alltoall_bandwidth: float | None = None
    """Measured bytes per second one rank sends through ``all_to_all_single``; None: from the links' loads.
    Collective implementations differ from point-to-point ones (gloo on CPU: far from a mesh's P-1
    parallel links)."""
    nodes: int = 1
    inter_node_bandwidth: float | None = None
    """Bytes per second per direction of one link between a node and the fabric (None: ``link_bandwidth``)."""
    inter_node_links: int | None = None
    """Links from each node into the fabric (None: one per rank of the node)."""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("mesh", "ring", "switch"):
            raise ValueError(f"kind={self.kind!r} is not one of ('mesh', 'ring', 'switch')")
        for name in ("link_bandwidth", "compute_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.nodes < 1 or (self.inter_node_links is not None and self.inter_node_links < 1):
            raise ValueError(
                f"nodes={self.nodes} and inter_node_links={self.inter_node_links} must be >= 1 (or None)"
            )

    def step_time(self, compute: float, comm: float) -> float:
        """Seconds of a step whose compute and communication run at once (see ``overlap``)."""
        if comm >= compute:
            return comm + (1.0 - self.overlap) * compute
        hidden = self.overlap if self.comm_overlap is None else self.comm_overlap
        return compute + (1.0 - hidden) * comm

    def ranks_per_node(self, world: int) -> int:
        if world % self.nodes:
            raise ValueError(f"world_size={world} does not split into nodes={self.nodes} equal nodes")
        return world // self.nodes

    def path(self, src: int, dst: int, world: int) -> tuple[Link, ...]:
        """The link directions a message from rank ``src`` to rank ``dst`` crosses, in a group of ``world``."""
        per = self.ranks_per_node(world)
        ns, nd = src // per, dst // per
        if ns != nd:
            links = self.inter_node_links or per
            hops = (("node_up", ns, src % per % links), ("node_down", nd, dst % per % links))
            return (("up", src), *hops, ("down", dst)) if self.kind == "switch" else hops
        if self.kind == "mesh":
            return (("p2p", src, dst),)
        if self.kind == "switch":
            return (("up", src), ("down", dst))
        base, a, b = ns * per, src % per, dst % per  # ring inside the node
        k = (b - a) % per
        step = 1 if k <= per // 2 else -1
        out, r = [], a
        while r != b:
            nxt = (r + step) % per
            out.append(("hop", base + r, base + nxt))
            r = nxt
        return tuple(out)

    def capacity(self, link: Link) -> float:
        """Bytes per second of one link direction."""
        if link[0] in ("node_up", "node_down"):
            return self.inter_node_bandwidth or self.link_bandwidth
        return self.link_bandwidth

    def link_time(self, sends, world: int) -> tuple[float, dict[Link, int]]:
        """Seconds the busiest link direction needs for ``sends`` ((src, dst, bytes, ...) sent at once; any
        further fields are ignored), and every link direction's load in bytes."""
        load: dict[Link, int] = {}
        for src, dst, nbytes, *_ in sends:
            if nbytes and src != dst:
                for link in self.path(src, dst, world):
                    load[link] = load.get(link, 0) + nbytes
        return max((n / self.capacity(k) for k, n in load.items()), default=0.0), load


def link_name(link: Link) -> str:
    """A readable name of a link direction: "r0->r1", "r2->switch", "switch->r2", "node0->fabric#1"."""
    kind, *rest = link
    if kind in ("p2p", "hop"):
        return f"r{rest[0]}->r{rest[1]}"
    if kind == "up":
        return f"r{rest[0]}->switch"
    if kind == "down":
        return f"switch->r{rest[0]}"
    if kind == "node_up":
        return f"node{rest[0]}->fabric#{rest[1]}"
    return f"fabric#{rest[1]}->node{rest[0]}"


CallKey = tuple[int, int, int, int, bool, bool]
"""(query rows, key rows, heads_q, heads_kv, causal, backward) of one attention kernel call."""


@dataclass(kw_only=True, slots=True)
class ComputeProfile:
    """Measured seconds of attention kernel calls on one rank (averaged over the group's ranks).

    ``calls`` maps a :data:`CallKey` to seconds; ``merge_per_row`` is the seconds to fold one query row's
    fp32 partial into the running output (forward) or one row of partial dQ (backward) per head. A call
    not in the table is costed at ``flops / rate`` with ``rate`` the measured rate of the nearest
    measured call (or the topology's ``compute_rate`` when nothing was measured). ``alltoall`` maps the
    bytes of one all-to-all's input tensor to its measured seconds, at the sizes Ulysses moves for this
    shape (small collectives run below the bandwidth a large one reaches).
    """

    calls: dict[CallKey, float] = field(default_factory=dict)
    merge_per_row: float = 0.0
    alltoall: dict[int, float] = field(default_factory=dict)

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
    _check_algorithm(algorithm)
    if algorithm == "ulysses" and shape.world_size > 1:
        s = shape.shard.local_len(0) * shape.world_size
        return [(s, s, *ulysses_heads(shape), shape.causal, backward)]
    alg = "kv_ring" if algorithm == "ulysses" else algorithm  # one rank: one local call either way
    steps = ring_schedule(alg, shape.shard, shape.causal, rank, backward=backward)
    return [_call_key(shape, seg, backward) for step in steps for seg in step.compute]


def _call_key(shape: AttentionShape, seg, backward: bool) -> CallKey:
    return (seg.num_q, seg.num_kv, shape.heads_q, shape.heads_kv, seg.causal, backward)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")


def step_traffic(step: RingStep, shape: AttentionShape, backward: bool) -> list[tuple[Transfer, int, int]]:
    """(transfer, bytes, messages) of every send of one ring step: the one place where a payload's size is
    written down. Bytes per row (elements of size e, partials of size e_p):

    * ``query``: forward q, ``Hq*D*e``; backward q and dout, ``2*Hq*D*e``, plus fp32 lse and delta, ``8*Hq``.
    * ``partial``: forward out and fp32 lse, ``Hq*D*e_p + 4*Hq``; backward fp32 dq, ``4*Hq*D``.
    * ``kv``: k and v, ``2*Hkv*D*e`` per key row; ``kv_grad``: fp32 dK and dV, ``8*Hkv*D``.
    """
    b, hq, hkv, d, e, ep = (
        shape.batch,
        shape.heads_q,
        shape.heads_kv,
        shape.head_dim,
        shape.elt,
        shape.partial_elt,
    )
    per_row = {  # payload -> (bytes per row, messages) for (forward, backward)
        "query": ((hq * d * e, 1), (2 * hq * d * e + 8 * hq, 4)),
        "partial": ((hq * d * ep + 4 * hq, 2), (4 * hq * d, 1)),
        "kv": ((2 * hkv * d * e, 2),) * 2,
        "kv_grad": ((8 * hkv * d, 2),) * 2,
    }
    out = []
    for t in step.sends:
        nbytes, msgs = per_row[t.payload][int(backward)]
        out.append((t, b * t.rows * nbytes, msgs))
    return out


def communication_bytes(
    algorithm: str, shape: AttentionShape, rank: int, *, backward: bool = False
) -> dict[str, int]:
    """Bytes rank ``rank`` sends, by direction label ("next", "prev", "other"), in one forward
    (``backward=False``) or one backward pass; equal to what the implementation's exchangers count.

    Ulysses uses all-to-all collectives: its bytes are those sent to other ranks, under "other".
    """
    _check_algorithm(algorithm)
    p = shape.world_size
    out: dict[str, int] = {}
    if p == 1:
        return out
    if algorithm == "ulysses":
        b, sl, hq, d, elt = shape.batch, shape.seqlen_local, shape.heads_q, shape.head_dim, shape.elt
        hkv_eff = max(shape.heads_kv, p) if shape.heads_kv % p else shape.heads_kv
        # forward: q, k, v there and out back; backward: dout there, dq, dk, dv back (the same sizes)
        out["other"] = b * sl * d * elt * (2 * hq + 2 * hkv_eff) * (p - 1) // p
        return out
    for step in ring_schedule(algorithm, shape.shard, shape.causal, rank, backward=backward):
        for t, nbytes, _ in step_traffic(step, shape, backward):
            if nbytes:
                out[t.direction] = out.get(t.direction, 0) + nbytes
    return out


def ulysses_collectives(shape: AttentionShape) -> tuple[int, int]:
    """Bytes of the input of Ulysses' query-sized all-to-all (q, out; backward dout, dq) and of its
    K/V-sized one (k, v; backward dk, dv) on one rank; each pass runs two of each."""
    hkv_eff = max(shape.heads_kv, shape.world_size) if shape.heads_kv % shape.world_size else shape.heads_kv
    row = shape.batch * shape.seqlen_local * shape.head_dim * shape.elt
    return row * shape.heads_q, row * hkv_eff


def ulysses_sends(shape: AttentionShape, backward: bool = False) -> list[tuple[int, int, int]]:
    """(src, dst, bytes) of every pair in one Ulysses pass (its all-to-alls): each rank sends an equal
    share of :func:`communication_bytes` to every other rank."""
    p = shape.world_size
    if p == 1:
        return []
    per_dst = communication_bytes("ulysses", shape, 0, backward=backward)["other"] // (p - 1)
    return [(s, d, per_dst) for s in range(p) for d in range(p) if d != s]


AFTER_COMPUTE: tuple[str, ...] = ("partial", "kv_grad")
"""Payloads a ring step can only send once its compute is done (TokenRing's partial results, the KV ring's
updated dK/dV accumulators): they travel during the next step's compute, and the last step's are exposed."""


def ring_step_sends(
    algorithm: str, shape: AttentionShape, backward: bool = False
) -> list[list[tuple[int, int, int, int]]]:
    """Per communication window of a ring pass, (src, dst, bytes, messages) of every rank's sends in it (all
    ranks send at once). Window ``i`` overlaps step ``i``'s compute and carries what step ``i`` sends before
    computing and what step ``i - 1`` sent after (:data:`AFTER_COMPUTE`); one more window at the end
    carries the last step's after-compute sends, with nothing to hide behind."""
    p = shape.world_size
    scheds = [ring_schedule(algorithm, shape.shard, shape.causal, r, backward=backward) for r in range(p)]
    n = len(scheds[0])
    windows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n + 1)]
    for r in range(p):
        for i in range(n):
            for t, nbytes, m in step_traffic(scheds[r][i], shape, backward):
                windows[i + (t.payload in AFTER_COMPUTE)].append((r, t.peer, nbytes, m))
    return windows if windows[n] else windows[:n]


def link_loads(
    algorithm: str, shape: AttentionShape, topology: Topology, *, backward: bool = False
) -> dict[Link, int]:
    """Bytes every link direction carries in one pass of ``algorithm`` (all ranks), routed by ``topology``
    (what ``tc -s`` counts on an emulated cluster, less framing)."""
    _check_algorithm(algorithm)
    p = shape.world_size
    if algorithm == "ulysses":
        steps = [ulysses_sends(shape, backward)]
    elif p == 1:
        steps = []
    else:
        steps = ring_step_sends(algorithm, shape, backward)
    total: dict[Link, int] = {}
    for sends in steps:
        for link, n in topology.link_time(sends, p)[1].items():
            total[link] = total.get(link, 0) + n
    return total


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
    return estimate_breakdown(algorithm, shape, topology, backward=backward, profile=profile)[0]


def estimate_breakdown(
    algorithm: str,
    shape: AttentionShape,
    topology: Topology,
    *,
    backward: bool = False,
    profile: ComputeProfile | None = None,
) -> tuple[float, float, float]:
    """(pass seconds, compute seconds, exposed communication seconds) of the slowest rank in one pass."""
    p = shape.world_size
    if p == 1:
        t = sum(_call_time(shape, topology, profile, c) for c in compute_calls("kv_ring", shape, 0, backward))
        return t, t, 0.0
    if algorithm == "ulysses":
        q_bytes, kv_bytes = ulysses_collectives(shape)
        if profile is not None and q_bytes in profile.alltoall and kv_bytes in profile.alltoall:
            # two query-sized (q and out; dout and dq) and two K/V-sized (k and v; dk and dv) collectives
            comm = 2 * profile.alltoall[q_bytes] + 2 * profile.alltoall[kv_bytes]
        else:
            if topology.alltoall_bandwidth is not None:
                total = sum(communication_bytes("ulysses", shape, 0, backward=backward).values())
                comm = total / topology.alltoall_bandwidth
            else:
                comm = topology.link_time(ulysses_sends(shape, backward), p)[0]
            comm += 4 * topology.latency * (p - 1)
        (call,) = compute_calls("ulysses", shape, 0, backward)
        compute = _call_time(shape, topology, profile, call)
        return comm + compute, compute, comm  # the all-to-alls run before / after the call: all exposed
    _check_algorithm(algorithm)
    return _ring_time(algorithm, shape, topology, backward, profile)


def _ring_time(
    algorithm: str, shape: AttentionShape, topology: Topology, backward: bool, profile
) -> tuple[float, float, float]:
    """(seconds, compute, exposed communication) of one pass on the slowest rank for the ring algorithms,
    walking their schedule: a step's communication is the busiest link direction's time for every rank's
    sends in that step's window (:func:`ring_step_sends`); on each rank the step costs
    ``Topology.step_time(compute, comm) + messages * latency``, where compute includes merging the step's
    partial results."""
    p, b, hq, hkv = shape.world_size, shape.batch, shape.heads_q, shape.heads_kv
    scheds = [ring_schedule(algorithm, shape.shard, shape.causal, r, backward=backward) for r in range(p)]
    windows = ring_step_sends(algorithm, shape, backward)
    comm = [topology.link_time(sends, p)[0] for sends in windows]
    worst = (0.0, 0.0, 0.0)
    for r in range(p):
        total = busy = 0.0
        for i, sends in enumerate(windows):
            msgs = sum(m for src, _, nbytes, m in sends if src == r and nbytes)
            compute = 0.0
            if i < len(scheds[r]):
                step = scheds[r][i]
                compute = sum(
                    _call_time(shape, topology, profile, _call_key(shape, g, backward)) for g in step.compute
                )
                if profile is not None and step.index > 0:
                    # forward: every partial after the first is merged into the running output; backward:
                    # partial dQ is added (and, for the KV ring, the travelling fp32 dK/dV accumulators)
                    heads_rows = hq * sum(g.num_q for g in step.compute)
                    if algorithm == "kv_ring" and backward:
                        heads_rows += 2 * hkv * sum(g.num_kv for g in step.compute)
                    compute += profile.merge_per_row * b * heads_rows
            c = comm[i]
            total += topology.step_time(compute, c) + msgs * topology.latency
            busy += compute
        if total > worst[0]:
            worst = (total, busy, total - busy)
    return worst


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
