"""Topologies with routing (mesh, ring, switch, several nodes), hardware descriptions and plan_cluster:
link loads add up to the bytes sent times the links crossed, and the predictions move the way the
links say they should."""

from __future__ import annotations

import pytest
import torch

from longmoe.parallel import (
    AttentionShape,
    Topology,
    communication_bytes,
    estimate_time,
    hardware_topology,
    link_loads,
    plan_cluster,
)
from longmoe.parallel.planning import emulated_topology, main


def shape(p=4, hq=16, hkv=16, sl=1024, **kw):
    return AttentionShape(
        world_size=p, batch=1, seqlen_local=sl, heads_q=hq, heads_kv=hkv, head_dim=128, **kw
    )


def test_paths():
    assert Topology(kind="mesh").path(0, 3, 4) == (("p2p", 0, 3),)
    ring = Topology(kind="ring")
    assert ring.path(0, 1, 4) == (("hop", 0, 1),)
    assert ring.path(0, 3, 4) == (("hop", 0, 3),)  # the shorter way: backwards
    assert ring.path(0, 2, 4) == (("hop", 0, 1), ("hop", 1, 2))  # a tie goes forward, as the emulator routes
    assert ring.path(1, 4, 5) == (("hop", 1, 0), ("hop", 0, 4))
    assert Topology(kind="switch").path(2, 0, 3) == (("up", 2), ("down", 0))
    rails = Topology(kind="mesh", nodes=2)
    assert rails.path(1, 2, 4) == (("node_up", 0, 1), ("node_down", 1, 0))  # one NIC per rank
    assert rails.path(2, 3, 4) == (("p2p", 2, 3),)
    shared = Topology(kind="switch", nodes=2, inter_node_links=1)
    assert shared.path(1, 3, 4) == (("up", 1), ("node_up", 0, 0), ("node_down", 1, 0), ("down", 3))
    with pytest.raises(ValueError, match="world_size=5 does not split into nodes=2"):
        rails.path(0, 1, 5)


@pytest.mark.parametrize("kind", ["mesh", "ring", "switch"])
@pytest.mark.parametrize("alg", ["token_ring", "kv_ring", "ulysses"])
@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_link_loads_are_bytes_times_links_crossed(kind, alg, p):
    """Every byte a rank sends loads each link direction on its path once: summed over links, the loads
    equal sum over ranks of bytes x path length (mesh: 1 link; switch: 2; ring: the hops)."""
    s = shape(p, 20, 20, sl=96 + p)
    topo = Topology(kind=kind)
    for backward in (False, True):
        loads = link_loads(alg, s, topo, backward=backward)
        sent = sum(sum(communication_bytes(alg, s, r, backward=backward).values()) for r in range(p))
        if alg == "ulysses":  # its bytes are split evenly over the P - 1 peers: exact up to rounding
            sent = pytest.approx(sent, abs=p * p)
        if kind == "mesh":
            assert sum(loads.values()) == sent
        elif kind == "switch":
            assert sum(n for k, n in loads.items() if k[0] == "up") == sent
            assert sum(n for k, n in loads.items() if k[0] == "down") == sent
        else:  # each message crosses min(k, P - k) links, k = (dst - src) mod P
            from longmoe.parallel.cost_model import ring_step_sends, ulysses_sends

            sends = ulysses_sends(s, backward) if alg == "ulysses" else [
                (a, b, n) for step in ring_step_sends(alg, s, backward) for a, b, n, _ in step
            ]  # fmt: skip
            assert sum(n for _, _, n in sends) == sent
            assert sum(loads.values()) == sum(n * min((b - a) % p, (a - b) % p) for a, b, n in sends)


def test_switch_takes_token_ring_edge_away():
    """TokenRing sends Q one way and partials the other: on separate links (mesh) both directions run at
    once; through one NIC per rank (switch) they share its egress. MHA forward: the same bytes as the KV
    ring's K and V, so no gain left on a switch; forward + backward it keeps the gain of its fewer bytes
    (the KV ring's backward also moves fp32 dK/dV)."""
    s = shape(4, 32, 32, sl=4096, dtype=torch.bfloat16)
    kw = dict(link_bandwidth=5e9, compute_rate=400e12)

    def ratio(topo, passes=(False, True)):
        tok = sum(estimate_time("token_ring", s, topo, backward=b) for b in passes)
        return tok / sum(estimate_time("kv_ring", s, topo, backward=b) for b in passes)

    mesh, switch = Topology(kind="mesh", **kw), Topology(kind="switch", **kw)
    assert ratio(mesh, (False,)) < 0.9 and ratio(switch, (False,)) == pytest.approx(1.0, abs=0.02)
    assert ratio(mesh) < 0.6 and ratio(switch) > ratio(mesh) + 0.08


def test_slow_inter_node_link_dominates_rings():
    """Two nodes joined by one slow link: the ring step that crosses it sets the pace."""
    s = shape(8, 16, 16, sl=2048, dtype=torch.bfloat16)
    fast = Topology(
        kind="mesh", link_bandwidth=100e9, compute_rate=200e12, nodes=2, inter_node_bandwidth=100e9
    )
    slow = Topology(kind="mesh", link_bandwidth=100e9, compute_rate=200e12, nodes=2, inter_node_bandwidth=5e9)
    for alg in ("kv_ring", "token_ring"):
        assert estimate_time(alg, s, slow) > 2 * estimate_time(alg, s, fast), alg
    loads = link_loads("kv_ring", s, slow)
    assert {k for k in loads if k[0] == "node_up"} == {("node_up", 0, 3), ("node_up", 1, 3)}  # ranks 3 and 7


def test_hardware_plans():
    topo = hardware_topology("h100_sxm", nodes=4)
    assert topo.nodes == 4 and topo.notes["gpus_per_node"] == 8 and topo.link_bandwidth == 450e9
    plan = plan_cluster(shape(32, 32, 8, sl=8192, dtype=torch.bfloat16), topo)
    assert set(plan.algorithms) == {"token_ring", "kv_ring", "ulysses"}
    assert plan.chosen == min(plan.algorithms, key=lambda a: plan.algorithms[a].total_s) or (
        plan.algorithms[plan.chosen].total_s <= 1.02 * min(a.total_s for a in plan.algorithms.values())
    )
    for a in plan.algorithms.values():
        assert a.forward_s > 0 and a.backward_s > a.forward_s and a.exposed_comm_s >= 0
        assert a.compute_s <= a.total_s * (1 + 1e-9)
        assert any(name.startswith("node") for name in a.link_bytes)  # something crossed the nodes
    rows = plan.rows()
    assert len(rows) == 3 and sum(r["chosen"] for r in rows) == 1
    with pytest.raises(ValueError, match="shape.world_size=16 but the topology has 4 node"):
        plan_cluster(shape(16, 32, 8), topo)
    with pytest.raises(ValueError, match="gpu='tpu'"):
        hardware_topology("tpu")
    with pytest.raises(ValueError, match="kind='torus'"):
        Topology(kind="torus")


def test_plan_at_64_ranks_is_quick():
    import time

    t0 = time.perf_counter()
    plan = plan_cluster(
        shape(64, 64, 8, sl=4096, dtype=torch.bfloat16), hardware_topology("h100_sxm", nodes=8)
    )
    assert time.perf_counter() - t0 < 30 and plan.chosen in plan.algorithms


def test_emulated_topology_matches_the_emulator():
    t = emulated_topology("two_nodes", 4, "800mbit", compute_rate=1e10)
    assert (t.kind, t.nodes, t.inter_node_links) == ("switch", 2, 1)
    assert t.inter_node_bandwidth == pytest.approx(t.link_bandwidth / 4)
    assert t.link_bandwidth == pytest.approx(800e6 / 8 * 1448 / 1514)
    assert emulated_topology("full_mesh", 3, "1gbit").kind == "mesh"
    with pytest.raises(ValueError, match="world_size=3"):
        emulated_topology("two_nodes", 3, "1gbit")


def test_cli(capsys):
    assert main(["--hardware", "a10_pcie", "--seqlen-local", "512", "--heads", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "token_ring" in out and "kv_ring" in out and "(auto)" in out


def test_step_time_hides_the_shorter_side():
    t = Topology(overlap=0.75, comm_overlap=0.25)
    assert t.step_time(compute=1.0, comm=3.0) == pytest.approx(3.0 + 0.25 * 1.0)  # compute behind comm
    assert t.step_time(compute=3.0, comm=1.0) == pytest.approx(3.0 + 0.75 * 1.0)  # comm behind compute
    assert Topology(overlap=0.5).step_time(3.0, 1.0) == pytest.approx(3.5)  # comm_overlap None: overlap
