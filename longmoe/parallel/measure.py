"""Measuring what the cost model needs, on the ranks of a group: links and kernel calls. Collective.

* :func:`measure_topology`: link bandwidth (a ring exchange), per-message latency, how much of an exchange
  hides behind a concurrent attention call, the all-to-all bandwidth, and the attention FLOP rate.
* :func:`profile_compute`: the time of every distinct kernel call the algorithms would make for a shape.

Both run every rank at once (so they contend for the machine as a real pass does), average over the
group so every rank makes the same choice, cache per group, and put every tensor on the group's device
(``group_device``: CUDA under NCCL, where a CPU kernel's rate would be the wrong number too).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
from longmoe.attention.merge import merge_attention_partials_
from longmoe.parallel.cost_model import (
    ALGORITHMS,
    AttentionShape,
    CallKey,
    ComputeProfile,
    Topology,
    _call_flops,
    compute_calls,
    ulysses_applies,
    ulysses_collectives,
)
from longmoe.runtime.distributed import group_device, group_key, world_and_rank
from longmoe.runtime.exchanger import P2PExchanger
from longmoe.runtime.profile_cache import ProfileCache, machine_fingerprint

__all__ = ["measure_topology", "profile_compute"]


def _now(device: torch.device) -> float:
    """A timestamp after the device's queued work is done (kernels on CUDA are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_MEASURED: dict[tuple, Topology] = {}
_METHOD = 4  # 4: CPU timings with huge-page allocations (THP_MEM_ALLOC_ENABLE) and the grouped decode tile
"""Version of what measure_topology / profile_compute measure and how; part of every on-disk key, so a
change of method is a cache miss."""
_FINGERPRINTS: dict[tuple, list] = {}


def topology_fingerprint(group=None, device: torch.device | str | None = None) -> dict:
    """What identifies this group's machines and links, for the on-disk profile cache: every rank's
    :func:`~longmoe.runtime.profile_cache.machine_fingerprint` in rank order, the backend, and
    ``$LONGMOE_TOPOLOGY_FINGERPRINT`` (set by an emulated cluster from its link configuration). Collective
    the first time per group."""
    device = group_device(group) if device is None else torch.device(device)
    key = (group_key(group), str(device))
    if key not in _FINGERPRINTS:
        world, _ = world_and_rank(group)
        mine = machine_fingerprint(device)
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine, group=group)
        backend = dist.get_backend(group) if world > 1 else "none"
        _FINGERPRINTS[key] = [ranks, str(backend), os.environ.get("LONGMOE_TOPOLOGY_FINGERPRINT", "")]
    ranks, backend, links = _FINGERPRINTS[key]
    return {"ranks": ranks, "backend": backend, "links": links}


def _from_disk(kind: str, key: dict, group, device: torch.device, measure) -> tuple[dict, bool]:
    """Rank 0 of ``group`` looks ``key`` up in the :class:`ProfileCache` and every rank gets its answer (one
    broadcast, so all ranks use the same numbers); on a miss every rank runs ``measure()`` (collective) and
    rank 0 stores what it returns. Returns (value, whether it came from the cache)."""
    world, rank = world_and_rank(group)
    cache = ProfileCache()  # rank 0's setting decides; every rank joins the broadcast either way
    value = cache.get(kind, key) if rank == 0 else None
    if world > 1:
        box = [value]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(
            box, src=src, group=group, device=device if device.type == "cuda" else None
        )
        value = box[0]
    if value is not None:
        return value, True
    value = measure()
    if rank == 0:
        cache.put(kind, key, value)
    return value, False


def measure_topology(
    group=None,
    *,
    nbytes: int = 8 << 20,
    repeats: int = 3,
    kind: str = "mesh",
    device: torch.device | str | None = None,
) -> Topology:
    """Measure link bandwidth (a ring exchange of ``nbytes``), this rank's attention FLOP/s, how much of an
    exchange hides behind a concurrent attention call, the per-message latency and the all-to-all
    bandwidth; collective.

    ``kind``: "mesh", "ring" or "switch" to state how the ranks are linked (see :class:`Topology`), or
    "detect" to tell them apart by two more timed patterns (in ``notes``: ``both_ways`` and ``two_hops``,
    each time over the one-way exchange's): every rank sending to both neighbours at once takes about
    twice as long through one NIC per rank ("switch") as over separate links; every rank sending two ranks
    ahead (P >= 4) takes about twice as long on a ring, where each such message crosses two links, as on a
    mesh. (P = 2 and P = 3 have no such difference: a 3-ring is a full mesh.) From P = 4 it also times
    every ring edge alone: edges under half the fastest, one after every ``P / k`` ranks, make ``k`` nodes
    joined by slow links (``nodes``, ``inter_node_bandwidth``; ``notes["edge_bandwidths"]``). On loopback,
    where the cores rather than links set the pace, "detect" describes the cores (sending both ways costs
    them twice).

    The result is averaged over ranks (all-reduce) so every rank makes the same choice, and cached per
    (group, kind, device) in memory and on disk (:mod:`longmoe.runtime.profile_cache`, keyed by every
    rank's machine and the links' fingerprint; ``notes["from_cache"]`` says whether it came from there).
    ``device`` (default: the group's device, :func:`group_device`) is where the buffers and the timed
    attention call live.
    """
    if kind not in ("mesh", "ring", "switch", "detect"):
        raise ValueError(f"kind={kind!r} is not one of ('mesh', 'ring', 'switch', 'detect')")
    device = group_device(group) if device is None else torch.device(device)
    key = (group_key(group), kind, str(device))
    if key in _MEASURED:
        return _MEASURED[key]
    disk_key = {
        "links": topology_fingerprint(group, device),
        "kind": kind,
        "nbytes": nbytes,
        "repeats": repeats,
        "method": _METHOD,
    }

    def measure() -> dict:
        t = _measure_links(group, nbytes=nbytes, repeats=repeats, kind=kind, device=device)
        return {f: getattr(t, f) for f in Topology.__slots__}

    value, hit = _from_disk("topology", disk_key, group, device, measure)
    fields = {f: value[f] for f in Topology.__slots__ if f in value}
    topo = Topology(**{**fields, "notes": {**value.get("notes", {}), "from_cache": hit}})
    _MEASURED[key] = topo
    return topo


def _measure_links(group, *, nbytes: int, repeats: int, kind: str, device: torch.device) -> Topology:
    """The timings behind :func:`measure_topology` (no caching)."""
    world, rank = world_and_rank(group)
    q = torch.randn(1, 1024, 8, 128, device=device)
    flash_attention_forward(q, q, q)
    t_compute = float("inf")
    for _ in range(2):
        t0 = _now(device)
        flash_attention_forward(q, q, q)
        t_compute = min(t_compute, _now(device) - t0)
    rate = 4.0 * 1024 * 1024 * 8 * 128 / t_compute
    bw, overlap, comm_overlap, notes = float("inf"), 1.0, None, {"measured": True}
    if world > 1:
        ex = P2PExchanger(group, timeout_s=60, name="measure_topology")
        buf = torch.empty(nbytes // 4, device=device)
        buf2 = torch.empty_like(buf)
        step = iter(range(1 << 30))

        def exchange(offsets=(1,), with_compute: bool = False, size: int | None = None) -> float:
            """Seconds for every rank to send ``buf`` (its first ``size`` elements) to each ``rank + offset``
            (and receive from ``rank - offset``) at once."""
            dist.barrier(group=group)  # start together: skew between ranks is not link time
            t0 = _now(device)
            for off, b in zip(offsets, (buf[:size], buf2[:size]), strict=False):
                ex.send_recv(b, (rank + off) % world, (rank - off) % world, step=next(step))
            ex.commit()
            if with_compute:
                flash_attention_forward(q, q, q)
            ex.wait()
            return _now(device) - t0

        t_comm = min(exchange() for _ in range(repeats + 1))
        t_both = min(exchange(with_compute=True) for _ in range(repeats))
        bw = nbytes / t_comm
        # Fraction of the shorter of the two that ran in the shadow of the other, once with this exchange
        # and once with one a third as long as the compute: hiding compute behind a long transfer and
        # hiding a short transfer behind compute are different things when the transport needs the cores.
        hidden = {t_comm >= t_compute: (t_compute + t_comm - t_both) / min(t_compute, t_comm)}
        agreed = torch.tensor([bw * t_compute / 3], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)  # every rank must send the same size
        small = max(int(agreed.item()) // 4, 1)
        t_small = min(exchange(size=small) for _ in range(repeats))
        t_small_both = min(exchange(size=small, with_compute=True) for _ in range(repeats))
        hidden.setdefault(
            t_small >= t_compute, (t_compute + t_small - t_small_both) / min(t_compute, t_small)
        )
        # compute hidden behind longer communication, and communication hidden behind longer compute (both
        # timings on one side of the compute: that side's figure for both)
        overlap = hidden[True] if True in hidden else hidden[False]
        comm_overlap = hidden[False] if False in hidden else hidden[True]
        # Per-message latency: rounds of back-to-back tiny exchanges (median round: on shared cores a rank
        # is sometimes descheduled, and the ring algorithms pay that on every step).
        tiny, n_msgs, rounds = torch.empty(16, device=device), 16, []
        for _ in range(repeats):
            dist.barrier(group=group)
            t0 = _now(device)
            for _ in range(n_msgs):
                ex.send_recv(tiny, (rank + 1) % world, (rank - 1) % world, step=next(step))
                ex.commit()
                ex.wait()
            rounds.append((_now(device) - t0) / n_msgs)
        latency = statistics.median(rounds)
        # all-to-all, as Ulysses uses it: a (P, n) tensor out, the same back (bytes sent = (P-1)/P of it)
        a2a_in = torch.empty(world, nbytes // 4 // world, device=device)
        a2a_out = torch.empty_like(a2a_in)
        a2a = float("inf")
        for _ in range(repeats):
            dist.barrier(group=group)
            t0 = _now(device)
            dist.all_to_all_single(a2a_out, a2a_in, group=group)
            a2a = min(a2a, _now(device) - t0)
        a2a_bw = a2a_in.numel() * 4 * (world - 1) / world / a2a
        both_ways = two_hops = 1.0
        edges = torch.zeros(world, dtype=torch.float64, device=device)
        if kind == "detect" and world >= 3:
            both_ways = min(exchange((1, -1)) for _ in range(repeats)) / t_comm
            if world >= 4:
                two_hops = min(exchange((2,)) for _ in range(repeats)) / t_comm
                # Each ring edge alone (r -> r + 1, timed by the receiver): slow edges mark node boundaries.
                part = buf[: max(len(buf) // 2, 1)]
                for r in range(world):
                    dist.barrier(group=group)
                    t0 = _now(device)
                    if rank == r:
                        ex.send(part, (r + 1) % world, step=next(step))
                    elif rank == (r + 1) % world:
                        ex.recv(torch.empty_like(part), r, step=next(step))
                    else:
                        next(step)
                    if ex.num_queued:
                        ex.commit()
                        ex.wait()
                    if rank == (r + 1) % world:
                        edges[r] = part.numel() * part.element_size() / (_now(device) - t0)
                dist.all_reduce(edges, group=group)
        stats = torch.tensor(
            [bw, rate, overlap, latency, a2a_bw, both_ways, two_hops, comm_overlap],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(stats, group=group)
        bw, rate, overlap, latency, a2a_bw, both_ways, two_hops, comm_overlap = (stats / world).tolist()
        overlap, comm_overlap = (min(max(x, 0.0), 1.0) for x in (overlap, comm_overlap))
        nodes: dict = {}
        if kind == "detect":
            notes.update(both_ways=both_ways, two_hops=two_hops)
            kind = "switch" if both_ways > 1.65 else ("ring" if two_hops > 1.5 else "mesh")
            if world >= 4:
                nodes = _nodes_from_edges(edges.tolist())
                notes["edge_bandwidths"] = edges.tolist()
                if nodes:
                    bw = nodes.pop("link_bandwidth")
    else:
        latency, a2a_bw, nodes = 0.0, None, {}
    topo = Topology(
        kind="mesh" if kind == "detect" else kind, link_bandwidth=bw, compute_rate=rate, overlap=overlap,
        comm_overlap=comm_overlap, latency=latency, alltoall_bandwidth=a2a_bw, notes=notes, **nodes,
    )  # fmt: skip
    return topo


def _nodes_from_edges(edge_bw: list[float]) -> dict:
    """Node structure from the bandwidth of each ring edge ``r -> r + 1`` measured alone: when some edges are
    under half the fastest and they fall every ``P / k`` ranks (the last rank of each of ``k`` equal nodes
    of consecutive ranks), the ranks form ``k`` nodes joined by the slow links (taken as one shared link
    per node, the conservative reading). Otherwise ``{}``: one level."""
    p, fast = len(edge_bw), max(edge_bw)
    slow = [r for r, b in enumerate(edge_bw) if b < 0.5 * fast]
    k = len(slow)
    if k < 2 or p % k or slow != [(i + 1) * (p // k) - 1 for i in range(k)]:
        return {}
    inside = [b for r, b in enumerate(edge_bw) if r not in slow]
    return {
        "nodes": k,
        "link_bandwidth": statistics.median(inside),
        "inter_node_bandwidth": statistics.median(edge_bw[r] for r in slow),
        "inter_node_links": 1,
    }


_PROFILES: dict[tuple, ComputeProfile] = {}


def profile_compute(
    shape: AttentionShape,
    group=None,
    *,
    backward: bool = True,
    algorithms=ALGORITHMS,
    max_calls: int = 8,
    device: torch.device | str | None = None,
) -> ComputeProfile:
    """Time each distinct attention kernel call ``algorithms`` make for ``shape`` (forward, and backward
    with ``backward``), the partial merge and Ulysses' all-to-alls at their sizes, on every rank of
    ``group`` at once (so they contend for the machine as they will when running); the times are averaged
    over ranks (all-to-alls: the slowest rank's) so every rank makes the same choice. Collective; cached per (shape, backward, algorithms, group, device) in memory, and on disk
    (:mod:`longmoe.runtime.profile_cache`) per (machines, links, shape, dtype), so later processes reuse it.

    Costs about one ring pass plus one Ulysses call of compute. With many distinct calls (packed
    documents) only the ``max_calls`` largest are timed; the rest are costed at the largest one's rate.
    """
    world, _ = world_and_rank(group)
    device = group_device(group) if device is None else torch.device(device)
    cache_key = (
        world, shape.batch, shape.seqlen_local, shape.heads_q, shape.heads_kv, shape.head_dim, shape.dtype,
        shape.causal, shape.layout, shape.cu_seqlens, backward, tuple(algorithms), group_key(group), str(device),
    )  # fmt: skip
    if cache_key in _PROFILES:
        return _PROFILES[cache_key]
    disk_key = {
        "links": topology_fingerprint(group, device), "world": world, "batch": shape.batch,
        "seqlen_local": shape.seqlen_local, "heads_q": shape.heads_q, "heads_kv": shape.heads_kv,
        "head_dim": shape.head_dim, "dtype": str(shape.dtype), "causal": shape.causal, "layout": shape.layout,
        "cu_seqlens": list(shape.cu_seqlens) if shape.cu_seqlens is not None else None, "backward": backward,
        "algorithms": list(algorithms), "max_calls": max_calls, "method": _METHOD,
    }  # fmt: skip

    def measure() -> dict:
        p = _time_calls(
            shape, group, backward=backward, algorithms=algorithms, max_calls=max_calls, device=device
        )
        return {"calls": [[list(k), t] for k, t in p.calls.items()], "merge_per_row": p.merge_per_row,
                "alltoall": [[n, t] for n, t in p.alltoall.items()]}  # fmt: skip

    value, _ = _from_disk("kernel_calls", disk_key, group, device, measure)
    prof = ComputeProfile(
        calls={tuple(k): t for k, t in value["calls"]},
        merge_per_row=value["merge_per_row"],
        alltoall={int(n): t for n, t in value["alltoall"]},
    )
    _PROFILES[cache_key] = prof
    return prof


def _time_calls(shape, group, *, backward, algorithms, max_calls, device) -> ComputeProfile:
    """The timings behind :func:`profile_compute` (no caching)."""
    world, _ = world_and_rank(group)
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
        t0 = _now(device)
        out, lse = flash_attention_forward(q, k, v, causal=causal, out_dtype=torch.float32)
        if bwd:
            dout = rand(b, nq, hq, d)
            delta = attention_delta(dout, out)
            if world > 1:
                dist.barrier(group=group)
            t0 = _now(device)
            flash_attention_backward(
                dout, q, k, v, None, lse, delta=delta, causal=causal, grad_dtype=torch.float32
            )
        times.append(_now(device) - t0)
    rows = max((c[0] for c in ordered), default=1)
    hq = shape.heads_q
    acc_o = torch.zeros(b, rows, hq, d, device=device)
    acc_l = torch.zeros(b, hq, rows, device=device)
    part_o = torch.randn(b, rows, hq, d, generator=g, device=device)
    part_l = torch.randn(b, hq, rows, generator=g, device=device)
    t0 = _now(device)
    merge_attention_partials_(acc_o, acc_l, part_o, part_l)
    times.append((_now(device) - t0) / (b * rows * hq))
    a2a_sizes = []
    if "ulysses" in algorithms and world > 1 and ulysses_applies(shape):
        # Ulysses' collectives at their own sizes: the median of three after a warm-up (not the best: a
        # pass pays their typical time, and on TCP that varies by a fifth from call to call)
        a2a_sizes = sorted(set(ulysses_collectives(shape)))
        for nbytes in a2a_sizes:
            x = torch.empty(world, max(nbytes // world // shape.elt, 1), dtype=dtype, device=device)
            y = torch.empty_like(x)
            runs = []
            for _ in range(4):
                dist.barrier(group=group)
                t0 = _now(device)
                dist.all_to_all_single(y, x, group=group)
                runs.append(_now(device) - t0)
            times.append(statistics.median(runs[1:]))
    stats = torch.tensor(times, dtype=torch.float64, device=group_device(group))
    if world > 1:
        n = len(ordered) + 1  # kernel calls and the merge: the ranks' mean; collectives: the slowest rank
        dist.all_reduce(stats[:n], group=group)
        stats[:n] /= world
        if len(stats) > n:
            slowest = stats[n:].clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            stats[n:] = slowest
    values = stats.tolist()
    call_times, merge = values[: len(ordered)], values[len(ordered)]
    prof = ComputeProfile(
        calls=dict(zip(ordered, call_times, strict=True)),
        merge_per_row=merge,
        alltoall=dict(zip(a2a_sizes, values[len(ordered) + 1 :], strict=True)),
    )
    return prof
