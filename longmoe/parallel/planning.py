"""Planning without running: topologies from a hardware description, and what the cost model predicts for
a cluster of any size (step time, bytes per link direction, the algorithm ``auto`` would pick).

    from longmoe.parallel import AttentionShape, hardware_topology, plan_cluster

    topo = hardware_topology("h100_sxm", nodes=4)                  # 4 nodes x 8 GPUs, NVLink + 400G IB
    shape = AttentionShape(world_size=32, batch=1, seqlen_local=4096, heads_q=32, heads_kv=32, head_dim=128)
    plan = plan_cluster(shape, topo)
    print(plan.chosen, plan.algorithms["token_ring"].step_s)

or ``python -m longmoe.parallel --hardware h100_sxm --nodes 4 --seqlen-local 4096``.

The same :mod:`~longmoe.parallel.cost_model` functions the selector uses produce the numbers, so a plan
for the machine you are on (``measure_topology`` + ``profile_compute``) is what ``algorithm="auto"`` sees.
The hardware figures below are nominal: peak link rates per direction and sustained attention rates of
published kernels (FlashAttention-2/3), each with its source in :data:`HARDWARE`; give measured ones
(``link_bandwidth=``, ``compute_rate=``) where you have them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from longmoe.parallel.cost_model import (
    ALGORITHMS,
    AttentionShape,
    ComputeProfile,
    Topology,
    choose_algorithm,
    estimate_breakdown,
    link_loads,
    link_name,
    ulysses_applies,
)

__all__ = [
    "HARDWARE",
    "AlgorithmPlan",
    "ClusterPlan",
    "emulated_topology",
    "hardware_topology",
    "plan_cluster",
    "print_plan",
]

HARDWARE: dict[str, dict] = {
    "h100_sxm": dict(
        kind="mesh", link_bandwidth=450e9, compute_rate=600e12, latency=10e-6, gpus_per_node=8,
        inter_node_bandwidth=50e9,
        source="NVLink 4 through NVSwitch: 900 GB/s per GPU, 450 GB/s each direction; FlashAttention-3 "
        "bf16 forward at head dim 128 sustains 600-750 TFLOP/s (Shah et al. 2024); one 400 Gb/s NDR "
        "InfiniBand NIC per GPU (50 GB/s each direction)",
    ),
    "a100_sxm": dict(
        kind="mesh", link_bandwidth=300e9, compute_rate=220e12, latency=10e-6, gpus_per_node=8,
        inter_node_bandwidth=25e9,
        source="NVLink 3 through NVSwitch: 600 GB/s per GPU, 300 GB/s each direction; FlashAttention-2 "
        "forward reaches 190-230 TFLOP/s on A100 (Dao 2023); one 200 Gb/s HDR NIC per GPU",
    ),
    "a10_pcie": dict(
        kind="switch", link_bandwidth=25e9, compute_rate=70e12, latency=15e-6, gpus_per_node=4,
        inter_node_bandwidth=12.5e9,
        source="PCIe 4.0 x16 per GPU into the host's root complex / PCIe switch, ~25 GB/s achievable each "
        "direction; A10 bf16 tensor peak 125 TFLOP/s, attention kernels sustain roughly half of it; "
        "100 Gb/s Ethernet between nodes",
    ),
}  # fmt: skip
"""Nominal figures per GPU type: how the GPUs of one node are linked (``kind``; bytes/s per direction),
attention FLOP/s of one GPU, per-message latency, GPUs per node, and the per-GPU NIC between nodes."""


def hardware_topology(
    gpu: str = "h100_sxm",
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    inter_node_links: int | None = None,
    **overrides,
) -> Topology:
    """A :class:`Topology` from a hardware description (a :data:`HARDWARE` entry), for planning without
    running. ``overrides`` replace any :class:`Topology` field (``link_bandwidth=``, ``compute_rate=``,
    ``kind=``, ...). ``inter_node_links``: links from each node into the fabric (None: one NIC per GPU).
    The ranks per node (``gpus_per_node``) go into ``notes``; :func:`plan_cluster` checks the world size."""
    if gpu not in HARDWARE:
        raise ValueError(f"gpu={gpu!r} is not one of {sorted(HARDWARE)}")
    spec = dict(HARDWARE[gpu])
    source, per_node = spec.pop("source"), spec.pop("gpus_per_node")
    per_node = per_node if gpus_per_node is None else gpus_per_node
    spec.update(nodes=nodes, inter_node_links=inter_node_links, overlap=1.0)
    spec.update(overrides)
    notes = {"hardware": gpu, "gpus_per_node": per_node, "source": source}
    return Topology(**spec, notes=notes)


@dataclass(kw_only=True, slots=True)
class AlgorithmPlan:
    """What the cost model predicts for one algorithm: seconds of the slowest rank (forward, backward),
    their sum per ring step (``step_s``: the pass over P), the compute inside it and the communication
    left exposed, and the bytes every link direction carries in a forward (+ backward) pass."""

    algorithm: str
    forward_s: float
    backward_s: float
    compute_s: float
    exposed_comm_s: float
    link_bytes: dict[str, int]

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def busiest_link(self) -> tuple[str, int]:
        return max(self.link_bytes.items(), key=lambda kv: kv[1], default=("-", 0))


@dataclass(kw_only=True, slots=True)
class ClusterPlan:
    shape: AttentionShape
    topology: Topology
    chosen: str
    """What ``choose_algorithm`` (hence ``algorithm="auto"``) picks."""
    algorithms: dict[str, AlgorithmPlan] = field(default_factory=dict)

    def step_s(self, algorithm: str) -> float:
        """Seconds per ring step (forward + backward pass over P), the unit ring papers quote."""
        return self.algorithms[algorithm].total_s / self.shape.world_size

    def rows(self) -> list[dict]:
        out = []
        for alg, a in self.algorithms.items():
            name, nbytes = a.busiest_link
            out.append(
                dict(
                    algorithm=alg, chosen=alg == self.chosen, forward_ms=a.forward_s * 1e3,
                    backward_ms=a.backward_s * 1e3, step_ms=self.step_s(alg) * 1e3,
                    compute_ms=a.compute_s * 1e3, exposed_comm_ms=a.exposed_comm_s * 1e3,
                    busiest_link=name, busiest_link_MB=nbytes / 1e6,
                    links=len(a.link_bytes), total_link_MB=sum(a.link_bytes.values()) / 1e6,
                )
            )  # fmt: skip
        return out


def plan_cluster(
    shape: AttentionShape,
    topology: Topology,
    *,
    backward: bool = True,
    profile: ComputeProfile | None = None,
    candidates=ALGORITHMS,
) -> ClusterPlan:
    """Predict every candidate algorithm's time and per-link bytes for ``shape`` (``shape.world_size``
    ranks) on ``topology``, and the one ``algorithm="auto"`` would pick. Pure arithmetic: plans for 64 or
    1024 ranks take well under a second."""
    per_node = topology.notes.get("gpus_per_node")
    if per_node is not None and shape.world_size != per_node * topology.nodes:
        raise ValueError(
            f"shape.world_size={shape.world_size} but the topology has {topology.nodes} node(s) of "
            f"{per_node} GPUs = {per_node * topology.nodes} ranks"
        )
    topology.ranks_per_node(shape.world_size)  # raises when the nodes do not split evenly
    chosen, _ = choose_algorithm(shape, topology, backward=backward, candidates=candidates, profile=profile)
    plans = {}
    for alg in candidates:
        if alg == "ulysses" and not ulysses_applies(shape):
            continue
        fwd, c_f, x_f = estimate_breakdown(alg, shape, topology, profile=profile)
        bwd, c_b, x_b = (0.0, 0.0, 0.0)
        if backward:
            bwd, c_b, x_b = estimate_breakdown(alg, shape, topology, backward=True, profile=profile)
        loads: dict[str, int] = {}
        for bw in (False, True) if backward else (False,):
            for link, n in link_loads(alg, shape, topology, backward=bw).items():
                loads[link_name(link)] = loads.get(link_name(link), 0) + n
        plans[alg] = AlgorithmPlan(
            algorithm=alg, forward_s=fwd, backward_s=bwd, compute_s=c_f + c_b, exposed_comm_s=x_f + x_b,
            link_bytes=loads,
        )  # fmt: skip
    return ClusterPlan(shape=shape, topology=topology, chosen=chosen, algorithms=plans)


def print_plan(plan: ClusterPlan, title: str | None = None) -> None:
    """A rich table of a plan."""
    from rich.console import Console
    from rich.table import Table

    s, t = plan.shape, plan.topology
    title = title or (
        f"P={s.world_size} ({t.nodes} node(s), {t.kind} inside, {t.link_bandwidth / 1e9:g} GB/s per direction"
        + (
            f", {(t.inter_node_bandwidth or t.link_bandwidth) / 1e9:g} GB/s between nodes"
            if t.nodes > 1
            else ""
        )
        + f"), {t.compute_rate / 1e12:g} TFLOP/s; B={s.batch} S_local={s.seqlen_local} Hq={s.heads_q} "
        f"Hkv={s.heads_kv} D={s.head_dim} {str(s.dtype).split('.')[-1]}{' causal' if s.causal else ''}"
    )
    table = Table(title=title)
    cols = ("algorithm", "fwd ms", "bwd ms", "ms/step", "compute ms", "exposed comm ms", "busiest link",
            "MB on it", "links used")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="right")
    for r in plan.rows():
        mark = " (auto)" if r["chosen"] else ""
        table.add_row(
            r["algorithm"] + mark, f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}", f"{r['step_ms']:.3f}",
            f"{r['compute_ms']:.2f}", f"{r['exposed_comm_ms']:.2f}", r["busiest_link"],
            f"{r['busiest_link_MB']:.1f}", str(r["links"]),
        )  # fmt: skip
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longmoe.parallel", description=__doc__.split("\n")[0])
    ap.add_argument("--hardware", choices=sorted(HARDWARE), default="h100_sxm")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument(
        "--kind", choices=("mesh", "ring", "switch"), default=None, help="override the intra-node links"
    )
    ap.add_argument("--seqlen-local", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 32), metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--forward-only", action="store_true")
    ns = ap.parse_args(argv)
    over = {"kind": ns.kind} if ns.kind else {}
    topo = hardware_topology(ns.hardware, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, **over)
    shape = AttentionShape(
        world_size=topo.notes["gpus_per_node"] * ns.nodes, batch=ns.batch, seqlen_local=ns.seqlen_local,
        heads_q=ns.heads[0], heads_kv=ns.heads[1], head_dim=ns.head_dim, dtype=getattr(torch, ns.dtype),
        causal=not ns.no_causal,
    )  # fmt: skip
    print_plan(plan_cluster(shape, topo, backward=not ns.forward_only))
    return 0


def emulated_topology(
    topology: str, world_size: int, rate: str | float, *, inter_rate: str | float | None = None, **overrides
) -> Topology:
    """The :class:`Topology` an :class:`~longmoe.runtime.netem.EmulatedCluster` is configured as (link
    bandwidth: the TCP payload rate of its ``tc`` rate), for comparing the model with emulated runs.
    ``overrides`` set the measured fields (``compute_rate``, ``latency``, ``overlap``, ...)."""
    from longmoe.runtime.netem import TOPOLOGIES, goodput, parse_rate

    if topology not in TOPOLOGIES:
        raise ValueError(f"topology={topology!r} is not one of {TOPOLOGIES}")
    bw = goodput(parse_rate(rate))
    spec: dict = {"kind": {"ring": "ring", "full_mesh": "mesh"}.get(topology, "switch"), "link_bandwidth": bw}
    if topology == "two_nodes":
        if world_size % 2:
            raise ValueError(f"world_size={world_size}: the model splits two_nodes evenly; use an even world")
        inter = parse_rate(rate) / 4 if inter_rate is None else parse_rate(inter_rate)
        spec.update(nodes=2, inter_node_links=1, inter_node_bandwidth=goodput(inter))
    spec.update(overrides)
    return Topology(**spec, notes={"emulated": topology, "rate": str(rate)})
