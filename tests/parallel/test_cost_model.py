"""The sequence-parallel cost model: the selector's choices, and its byte formulas' structure.

(That its byte counts equal what the exchangers count is asserted on real ranks in
tests/distributed/test_sequence_parallel.py.)
"""

from __future__ import annotations

import pytest
import torch

from longmoe.parallel import AttentionShape, Topology, choose_algorithm, communication_bytes, estimate_time

COMM_BOUND = Topology(kind="mesh", link_bandwidth=5e9, compute_rate=400e12)  # slow links, fast compute
COMPUTE_BOUND = Topology(kind="mesh", link_bandwidth=400e9, compute_rate=50e12)


def shape(hq, hkv, **kw):
    base = dict(world_size=8, batch=1, seqlen_local=4096, heads_q=hq, heads_kv=hkv, head_dim=128,
                dtype=torch.bfloat16, causal=True, layout="zigzag")  # fmt: skip
    base.update(kw)
    return AttentionShape(**base)


def test_mha_comm_bound_picks_token_ring():
    best, est = choose_algorithm(shape(32, 32), COMM_BOUND, candidates=("token_ring", "kv_ring"))
    assert best == "token_ring", est
    assert est["token_ring"] < 0.8 * est["kv_ring"], est


def test_gqa_8_to_1_picks_kv_ring():
    """With 8 query heads per KV head K/V are small: moving them beats moving Q and partials."""
    best, est = choose_algorithm(shape(32, 4), COMM_BOUND, candidates=("token_ring", "kv_ring"))
    assert best == "kv_ring", est


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_crossover_follows_bytes(ratio):
    """Forward + backward bytes: TokenRing's busiest direction beats the KV ring's iff Hq/Hkv < 16/6."""
    s = shape(8 * ratio, 8, causal=False)
    tok = {k: communication_bytes("token_ring", s, 0)[k] + communication_bytes("token_ring", s, 0, backward=True)[k]
           for k in ("next", "prev")}  # fmt: skip
    ring = sum(communication_bytes("kv_ring", s, 0).values()) + sum(
        communication_bytes("kv_ring", s, 0, backward=True).values()
    )
    # TokenRing spreads over two directions; its busier one against the KV ring's only one.
    assert (max(tok.values()) < ring) == (ratio < 16 / 6), (ratio, tok, ring)


def test_compute_bound_estimates_converge():
    """When links are fast every ring algorithm costs about the compute."""
    s = shape(32, 32)
    t_tok = estimate_time("token_ring", s, COMPUTE_BOUND) + estimate_time(
        "token_ring", s, COMPUTE_BOUND, backward=True
    )
    t_ring = estimate_time("kv_ring", s, COMPUTE_BOUND) + estimate_time(
        "kv_ring", s, COMPUTE_BOUND, backward=True
    )
    assert t_tok == pytest.approx(t_ring, rel=0.05)


def test_ring_topology_penalises_token_ring_returns():
    """On a ring (no direct links) a partial for rank r+s crosses s links: TokenRing loses its edge."""
    s = shape(32, 32)
    mesh = Topology(kind="mesh", link_bandwidth=5e9, compute_rate=400e12)
    ring_topo = Topology(kind="ring", link_bandwidth=5e9, compute_rate=400e12)
    assert estimate_time("token_ring", s, ring_topo) > 1.5 * estimate_time("token_ring", s, mesh)
    assert estimate_time("kv_ring", s, ring_topo) == pytest.approx(estimate_time("kv_ring", s, mesh))


def test_ulysses_needs_divisible_heads():
    best, est = choose_algorithm(shape(12, 12, world_size=8), COMM_BOUND)
    assert "ulysses" not in est and best in ("token_ring", "kv_ring")
    _, est = choose_algorithm(shape(32, 8), COMM_BOUND)
    assert "ulysses" in est


def test_world_size_one_moves_nothing():
    s = shape(8, 8, world_size=1)
    for alg in ("token_ring", "kv_ring", "ulysses"):
        assert communication_bytes(alg, s, 0) == {} and communication_bytes(alg, s, 0, backward=True) == {}


def test_bad_shapes():
    with pytest.raises(ValueError, match="heads_q=6 must be a multiple of heads_kv=4"):
        shape(6, 4)
    with pytest.raises(ValueError, match="world_size must be >= 1; got 0"):
        shape(8, 8, world_size=0)
    with pytest.raises(ValueError, match="algorithm='nccl_magic'"):
        communication_bytes("nccl_magic", shape(8, 8), 0)


def test_compute_calls_cover_the_same_work():
    """TokenRing and the KV ring make the same kernel calls per pass (each rank's queries meet every key
    rank's keys once), and Ulysses' one call has P times a ring step's heads-free work."""
    from longmoe.parallel.cost_model import _call_flops, compute_calls

    s = shape(16, 4, world_size=4, seqlen_local=96)
    ring = [_call_flops(s, c) for r in range(4) for c in compute_calls("kv_ring", s, r, False)]
    token = [_call_flops(s, c) for r in range(4) for c in compute_calls("token_ring", s, r, False)]
    assert sorted(ring) == sorted(token)
    (uly,) = compute_calls("ulysses", s, 0, False)
    assert uly == (384, 384, 4, 1, True, False)
    assert 4 * _call_flops(s, uly) == pytest.approx(sum(ring))


def test_profile_drives_the_choice():
    """Measured kernel times decide where bytes do not: a slow Ulysses call loses, a fast one wins."""
    from longmoe.parallel import ComputeProfile
    from longmoe.parallel.cost_model import compute_calls

    s = shape(16, 16, world_size=4, seqlen_local=1024)
    topo = Topology(kind="mesh", link_bandwidth=400e9, compute_rate=50e12)
    ring_calls = {
        c: 1e-3 for r in range(4) for a in ("kv_ring", "token_ring") for c in compute_calls(a, s, r, False)
    }
    (uly,) = compute_calls("ulysses", s, 0, False)
    for uly_time, want in ((1.0, {"kv_ring", "token_ring"}), (1e-4, {"ulysses"})):
        prof = ComputeProfile(calls={**ring_calls, uly: uly_time})
        best, est = choose_algorithm(s, topo, backward=False, profile=prof)
        assert best in want, est


def test_profile_compute_times_every_distinct_call():
    from longmoe.parallel import profile_compute
    from longmoe.parallel.cost_model import compute_calls

    s = shape(4, 2, world_size=2, seqlen_local=64, dtype=torch.float32)
    prof = profile_compute(s, backward=True)
    want = {c for a in ("kv_ring", "token_ring", "ulysses") for r in range(2) for b in (False, True)
            for c in compute_calls(a, s, r, b)}  # fmt: skip
    assert set(prof.calls) == want
    assert all(t > 0 for t in prof.calls.values()) and prof.merge_per_row > 0
    assert profile_compute(s, backward=True) is prof  # cached
    # estimates with the profile are finite and positive for every algorithm
    _, est = choose_algorithm(s, Topology(), profile=prof)
    assert set(est) == {"kv_ring", "token_ring", "ulysses"} and all(0 < t < 10 for t in est.values())
