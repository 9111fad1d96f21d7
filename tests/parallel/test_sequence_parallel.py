"""Sequence-parallel attention (TokenRing, KV ring, Ulysses) on real gloo ranks against the fp64 oracle.

Every rank builds the same global batch from a seed, shards it with the production sharding function,
runs forward and backward, and asserts its shard of out, lse, dq, dk, dv against the single-process fp64
oracle. The bound is 2x the error of the *single-process* computation in the same dtype (+ the floor in
tests/oracle.py): error must not grow with the number of ranks. TokenRing and KV-ring byte counts per
rank and direction must equal the cost model's. Each configuration is its own test case (one spawn per
world size runs them all, each rank reporting every case's failure separately).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
import torch.distributed as dist

from longmoe.attention import flash_attention
from longmoe.parallel import (
    AttentionShape,
    CommStats,
    SequenceParallelAttention,
    autotune_algorithm,
    communication_bytes,
    kv_ring_attention,
    sequence_parallel_attention,
    sequence_parallel_sdpa,
    shard_sequence,
    token_ring_attention,
    ulysses_attention,
    unshard_sequence,
)
from longmoe.runtime import ExchangeError, ExchangeTimeout, SpawnError, second_group, spawn
from tests.oracle import ATOL, attention64, max_err

pytestmark = pytest.mark.distributed

ALGS = {"token_ring": token_ring_attention, "kv_ring": kv_ring_attention, "ulysses": ulysses_attention}


def configs(world: int) -> list[dict]:
    """(algorithm, causal, layout, heads_q, heads_kv, head_dim, dtype) cases for ``world`` ranks."""
    out = []
    for alg in ALGS:
        if alg == "ulysses":  # heads must split over the ranks (K/V heads replicated when fewer)
            heads = [(2 * world, 2 * world, 64, torch.float32), (4 * world, world, 128, torch.bfloat16),
                     (2 * world, 1, 64, torch.bfloat16)]  # fmt: skip
        else:
            heads = [(4, 4, 64, torch.float32), (8, 2, 128, torch.bfloat16), (4, 1, 64, torch.bfloat16),
                     (4, 1, 128, torch.float32)]  # fmt: skip
        for causal, layout in ((True, "zigzag"), (True, "contiguous"), (False, "zigzag")):
            for hq, hkv, d, dtype in heads:
                out.append(dict(alg=alg, causal=causal, layout=layout, hq=hq, hkv=hkv, d=d, dtype=dtype))
    # TokenRing partial outputs returned in fp32 instead of the input dtype.
    out.append(dict(alg="token_ring", causal=True, layout="zigzag", hq=8, hkv=8, d=64, dtype=torch.bfloat16,
                    partial_dtype=torch.float32))  # fmt: skip
    return out


def _global_batch(world, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    s = 2 * world * 19  # 19-token zigzag chunks: odd, never a tile multiple
    mk = lambda h: torch.randn(2, s, h, cfg["d"], generator=g, dtype=torch.float64)
    return mk(cfg["hq"]), mk(cfg["hkv"]), mk(cfg["hkv"]), mk(cfg["hq"])


def _check_case(rank, world, cfg, seed):
    dtype, causal, layout = cfg["dtype"], cfg["causal"], cfg["layout"]
    q, k, v, dout = _global_batch(world, cfg, seed)
    # fp64 oracle and the single-process result in the same dtype (what one rank would get).
    o64, l64, *g64 = attention64(q, k, v, dout, causal=causal)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o1, l1 = flash_attention(*leaves, causal=causal, return_lse=True)
    o1.backward(dout.to(dtype))
    single = (o1.detach(), l1, *(t.grad for t in leaves))
    oracle = (o64, l64, *g64)

    shard = lambda t, dim=1: shard_sequence(t, None, layout, dim=dim)
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    stats = CommStats()
    kw = dict(stats=stats)
    if "partial_dtype" in cfg:
        kw["partial_dtype"] = cfg["partial_dtype"]
    out, lse = ALGS[cfg["alg"]](ql, kl, vl, causal=causal, layout=layout, return_lse=True, **kw)
    out.backward(shard(dout).to(dtype))
    ours = (out.detach(), lse, ql.grad, kl.grad, vl.grad)
    assert out.dtype == dtype and ql.grad.dtype == dtype and lse.dtype == torch.float32

    errs = {}
    for name, a, o, s1 in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle, single, strict=True):
        dim = 2 if name == "lse" else 1
        o_local = shard(o, dim)
        assert torch.equal(torch.isneginf(a), torch.isneginf(o_local)), (
            f"rank {rank} {cfg}: {name} -inf pattern"
        )
        assert not torch.isnan(a).any(), f"rank {rank} {cfg}: NaN in {name}"
        e, e1 = max_err(a, o_local), max_err(s1, o)
        bound = 2 * e1 + ATOL[dtype]
        assert e <= bound, (
            f"rank {rank}/{world} {cfg}: {name} err {e:.3e} > 2 * single-process {e1:.3e} + floor"
        )
        errs[name] = e
    if cfg["alg"] != "ulysses":  # Ulysses' stats count its forward all-to-alls only
        sent = stats.bytes_sent
        shape = AttentionShape(
            world_size=world, batch=2, seqlen_local=ql.shape[1], heads_q=cfg["hq"], heads_kv=cfg["hkv"],
            head_dim=cfg["d"], dtype=dtype, causal=causal, layout=layout, partial_dtype=cfg.get("partial_dtype"),
        )  # fmt: skip
        model: dict[str, int] = {}
        for backward in (False, True):
            for label, n in communication_bytes(cfg["alg"], shape, rank, backward=backward).items():
                model[label] = model.get(label, 0) + n
        assert sent == model, f"rank {rank}/{world} {cfg}: exchanger counted {sent}, cost model says {model}"
        if cfg["alg"] == "token_ring" and world > 1 and not (causal and layout == "contiguous"):
            assert sent.get("next", 0) > 0 and sent.get("prev", 0) > 0, (
                f"rank {rank}: one direction idle: {sent}"
            )
    return errs


def _run_all(rank, world, cases):
    """The configurations ``cases`` on this rank; a failure is reported per case, not raised, so one bad
    case does not hide the others (a hang still fails the whole spawn, by its timeout)."""
    failures = []
    for i, cfg in enumerate(cases):
        try:
            _check_case(rank, world, cfg, seed=100 + i)
            failures.append(None)
        except Exception as exc:  # reported by the case's own test below
            failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return failures


@functools.cache
def _failures_by_case(world: int) -> list[list[str]]:
    cases = configs(world) if world != 8 else configs_world8()
    per_rank = spawn(_run_all, world, cases, timeout_s=400)
    assert len(per_rank) == world and all(len(r) == len(cases) for r in per_rank)
    return [[r[i] for r in per_rank if r[i] is not None] for i in range(len(cases))]


def configs_world8() -> list[dict]:
    """The two rings at P = 8 (ring-flash-attention's users report error growing with world size): causal
    zigzag MHA fp32 and GQA 4:1 bf16, non-causal MQA bf16. A subset, so 8 processes on the CI's 2 cores
    stay within ~a minute."""
    keep = {(True, "zigzag", 4, 4, torch.float32), (True, "zigzag", 8, 2, torch.bfloat16),
            (False, "zigzag", 4, 1, torch.bfloat16)}  # fmt: skip
    return [c for c in configs(8) if c["alg"] != "ulysses" and "partial_dtype" not in c
            and (c["causal"], c["layout"], c["hq"], c["hkv"], c["dtype"]) in keep]  # fmt: skip


def _case_id(cfg: dict) -> str:
    mask = ("causal" if cfg["causal"] else "full") + "-" + cfg["layout"]
    extra = "-partial_fp32" if "partial_dtype" in cfg else ""
    return f"{cfg['alg']}-{mask}-{cfg['hq']}x{cfg['hkv']}-d{cfg['d']}-{str(cfg['dtype'])[6:]}{extra}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", range(len(configs(1))), ids=[_case_id(c) for c in configs(1)])
def test_matches_single_process_oracle(world, case):
    failures = _failures_by_case(world)[case]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", range(len(configs_world8())), ids=[_case_id(c) for c in configs_world8()])
def test_rings_at_world_8_match_single_process_oracle(case):
    failures = _failures_by_case(8)[case]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- failures
def _stalled(rank, world, alg):
    # The second process group is created collectively once per group (setup, not a step); make it
    # while every rank is alive, as a first healthy call would.
    second_group(None)
    if rank == 1:
        time.sleep(4)  # alive but never joins: the others must give up on their own
        return "stalled"
    q = torch.randn(1, 8, 2, 16)
    fn = ALGS[alg]
    t0 = time.monotonic()
    try:
        fn(q, q, q, causal=True, timeout_s=2.0, check_ranks=False)
    except ExchangeTimeout as exc:
        waited = time.monotonic() - t0
        msg = str(exc)
        assert f"rank {rank}" in msg and "step" in msg, msg
        assert waited < 5.0, f"rank {rank} waited {waited:.1f} s for a 2 s timeout"
        return msg
    raise AssertionError(f"rank {rank}: {alg} with a stalled peer did not raise")


@pytest.mark.parametrize("alg", ["token_ring", "kv_ring"])
def test_stalled_rank_raises_with_rank_and_step(alg):
    msgs = spawn(_stalled, 3, alg, timeout_s=60)
    assert msgs[1] == "stalled"
    assert all(
        "within 2.0 s" in m or "Timed out" in m or "timed out" in m.lower() for m in (msgs[0], msgs[2])
    )


def _dead(rank, world, alg, phase):
    second_group(None)  # setup while everyone is alive (see _stalled)
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    out = ALGS[alg](q, q, q, causal=True, timeout_s=10.0) if phase == "backward" else None
    dist.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word
    try:
        if phase == "forward":
            ALGS[alg](q, q, q, causal=True, timeout_s=2.0, check_ranks=False)
        else:
            out.sum().backward()
    except (ExchangeTimeout, ExchangeError) as exc:
        msg = str(exc)
        assert f"rank {rank}" in msg and "step" in msg, msg
        return msg
    raise AssertionError(f"rank {rank}: {alg} {phase} with a dead peer did not raise")


@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("alg", ["token_ring", "kv_ring"])
def test_dead_rank_makes_the_others_raise(alg, phase):
    """Rank 1 exits; ranks 0 and 2 must raise (timeout or closed connection) on their own, naming rank and
    step, before the launcher's grace period would kill them."""
    with pytest.raises(SpawnError) as info:
        spawn(_dead, 3, alg, phase, timeout_s=60)
    assert list(info.value.failures) == [1], info.value.failures  # only the dead rank failed
    assert info.value.terminated == [], "surviving ranks hung until the launcher killed them"


def _dead_ulysses(rank, world, phase):
    """Ulysses' all-to-alls: rank 1 dies after a healthy call; survivors raise on their own, naming
    themselves and the exchange, within the group's timeout (10 s here), forward or backward."""
    import datetime

    group = dist.new_group(timeout=datetime.timedelta(seconds=10))
    q = torch.randn(1, 8, 6, 16, requires_grad=True)
    ulysses_attention(q, q, q, group=group, causal=True).sum().backward()  # healthy
    dist.barrier()
    out = ulysses_attention(q, q, q, group=group, causal=True) if phase == "backward" else None
    if rank == 1:
        os._exit(3)
    try:
        if phase == "forward":
            ulysses_attention(q, q, q, group=group, causal=True, check_ranks=False)
        else:
            out.sum().backward()
    except RuntimeError as exc:
        msg = str(exc)
        assert f"on rank {rank}" in msg and "ulysses" in msg, msg
        return msg
    raise AssertionError(f"rank {rank}: Ulysses {phase} with a dead peer did not raise")


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_dead_rank_in_ulysses_makes_the_others_raise(phase):
    with pytest.raises(SpawnError) as info:
        spawn(_dead_ulysses, 3, phase, timeout_s=60)
    assert list(info.value.failures) == [1], info.value.failures
    assert info.value.terminated == [], "surviving ranks hung until the launcher killed them"


def _nonfinite(rank, world):
    """A NaN on rank 1 only: with check_finite every rank raises (rank 1 naming the tensor, the others
    naming rank 1), for every algorithm, and nobody waits in the ring."""
    msgs = []
    for alg in ALGS:
        q = torch.randn(1, 8, 2 * world, 16)
        if rank == 1:
            q[0, 3, 1, 2] = float("nan")
        try:
            sequence_parallel_attention(q, q, q, causal=True, algorithm=alg, check_finite=True, timeout_s=30)
        except ValueError as exc:
            msg = str(exc)
            want = "q has 1 non-finite" if rank == 1 else "nonfinite_inputs is 0 here but 1 on rank 1"
            assert f"rank {rank}" in msg and want in msg, msg
            msgs.append(msg)
            continue
        raise AssertionError(f"rank {rank}: {alg} accepted a NaN with check_finite=True")
    return msgs


def test_check_finite_raises_on_every_rank():
    assert all(len(m) == 3 for m in spawn(_nonfinite, 3, timeout_s=120))


def _bad_inputs(rank, world):
    q = torch.randn(1, 8, 4, 16)
    kv = torch.randn(1, 8, 2, 16)
    errors = {}

    def expect(name, fn, exc, *words):
        try:
            fn()
        except exc as e:
            for w in words:
                assert w in str(e), f"rank {rank}: {name}: {w!r} not in {e}"
            errors[name] = str(e)
            return
        raise AssertionError(f"rank {rank}: {name} did not raise {exc.__name__}")

    for alg, fn in ALGS.items():
        expect(f"{alg} odd zigzag", lambda: fn(q[:, :7], kv[:, :7], kv[:, :7], layout="zigzag"), ValueError,
               "seqlen_local=7", "zigzag")  # fmt: skip
        expect(
            f"{alg} heads",
            lambda: fn(torch.randn(1, 8, 3, 16), kv, kv),
            ValueError,
            "heads_q=3",
            "heads_kv=2",
        )
        hq = 4 if rank == 0 else 8  # a rank disagreeing on the head count
        expect(f"{alg} head mismatch", lambda: fn(torch.randn(1, 8, hq, 16), kv, kv), ValueError,
               "heads_q", "differ across ranks")  # fmt: skip
        dt = torch.float32 if rank == 0 else torch.bfloat16
        expect(
            f"{alg} dtype mismatch", lambda: fn(q.to(dt), kv.to(dt), kv.to(dt)), ValueError, "dtype", "rank"
        )
        expect(f"{alg} layout", lambda: fn(q, kv, kv, layout="striped"), ValueError, "layout='striped'")
    # A group this rank is not in (torch gives it size -1; torch cannot build a 0-rank group at all).
    only_rank0 = dist.new_group(ranks=[0])
    if rank == 1:
        expect(
            "not a member",
            lambda: token_ring_attention(q, kv, kv, group=only_rank0),
            ValueError,
            "not a member",
        )
    else:
        errors["not a member"] = "rank 0 is the member"
        torch.testing.assert_close(
            token_ring_attention(q, kv, kv, group=only_rank0), flash_attention(q, kv, kv)
        )
    expect("size 0", lambda: AttentionShape(world_size=0, batch=1, seqlen_local=8, heads_q=4, heads_kv=2, head_dim=16),
           ValueError, "world_size must be >= 1")  # fmt: skip
    return errors


def test_bad_inputs_raise_clear_errors_on_every_rank():
    errors = spawn(_bad_inputs, 2, timeout_s=120)
    assert errors[0].keys() == errors[1].keys() and len(errors[0]) == 17


# ---------------------------------------------------------------------------------------------- helpers
def _sharding_and_dropins(rank, world):
    x = torch.arange(2 * 4 * world * 3, dtype=torch.float32).reshape(2, 4 * world, 3)
    for layout in ("zigzag", "contiguous"):
        local = shard_sequence(x, None, layout)
        assert local.shape == (2, 4, 3)
        assert torch.equal(unshard_sequence(local, None, layout), x)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8 * world, 4, 32, generator=g)
    k = torch.randn(1, 8 * world, 2, 32, generator=g)
    v = torch.randn(1, 8 * world, 2, 32, generator=g)
    ref = flash_attention(q, k, v, causal=True)
    ql, kl, vl = (shard_sequence(t) for t in (q, k, v))
    module = SequenceParallelAttention(causal=True)
    out = module(ql, kl, vl)
    assert module.last_algorithm in ("token_ring", "kv_ring", "ulysses")
    torch.testing.assert_close(out, shard_sequence(ref), rtol=1e-5, atol=1e-5)
    tuned = SequenceParallelAttention(causal=True, algorithm="autotune")
    torch.testing.assert_close(tuned(ql, kl, vl), shard_sequence(ref), rtol=1e-5, atol=1e-5)
    alg, times = autotune_algorithm(ql, kl, vl, causal=True, backward=False)
    assert tuned.last_algorithm == alg == min(times, key=times.get)
    assert {"token_ring", "kv_ring"} <= set(times)  # Ulysses too where the heads split over the ranks
    sdpa_out = sequence_parallel_sdpa(
        ql.transpose(1, 2),
        kl.transpose(1, 2),
        vl.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
        algorithm="kv_ring",
    )
    torch.testing.assert_close(sdpa_out.transpose(1, 2), shard_sequence(ref), rtol=1e-5, atol=1e-5)
    return module.last_algorithm, tuned.last_algorithm


def test_sharding_module_and_sdpa_dropin():
    chosen = spawn(_sharding_and_dropins, 3, timeout_s=120)
    assert len(set(chosen)) == 1, f"ranks chose different algorithms: {chosen}"


def test_single_process_without_process_group():
    """Without torch.distributed initialised the functions run as plain attention (world size 1)."""
    q, k, v = torch.randn(1, 10, 4, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    ref = flash_attention(q, k, v, causal=True)
    for fn in ALGS.values():
        torch.testing.assert_close(fn(q, k, v, causal=True), ref)


# ---------------------------------------------------------------------------------------------- several groups
def _two_groups(rank, world, size):
    """``world / size`` sequence-parallel groups in one job, each running every algorithm on its own data;
    each group's second process group is made lazily, by its members only, at its first ring call."""
    groups = [dist.new_group(list(range(g, g + size))) for g in range(0, world, size)]  # collective setup
    mine, index = groups[rank // size], rank // size
    g = torch.Generator().manual_seed(1000 + index)  # different data in every group
    q = torch.randn(1, 4 * size, 2 * size, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 4 * size, size, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = flash_attention(q, k, v, causal=True)
    for alg in ALGS:
        ql, kl, vl = (shard_sequence(t, mine).requires_grad_() for t in (q, k, v))
        out = sequence_parallel_attention(ql, kl, vl, group=mine, causal=True, algorithm=alg, timeout_s=30)
        torch.testing.assert_close(out, shard_sequence(ref, mine), rtol=1e-10, atol=1e-10)
        out.sum().backward()  # the backward's second group too
        assert ql.grad is not None and torch.isfinite(ql.grad).all()
    return index


@pytest.mark.parametrize("world,size", [(4, 2), (6, 3)])
def test_several_sequence_parallel_groups_in_one_job(world, size):
    assert spawn(_two_groups, world, size, timeout_s=240) == [r // size for r in range(world)]


# ---------------------------------------------------------------------------------------------- determinism
def _twice(rank, world):
    """Two identical calls give bit-identical outputs and gradients on CPU, for every algorithm."""
    g = torch.Generator().manual_seed(5)
    q, dout = (torch.randn(1, 2 * world * 13, 4 * world, 32, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2 * world * 13, world, 32, generator=g) for _ in range(2))
    for alg in ALGS:
        for dtype in (torch.float32, torch.bfloat16):
            runs = []
            for _ in range(2):
                leaves = [shard_sequence(t).to(dtype).requires_grad_() for t in (q, k, v)]
                out = sequence_parallel_attention(*leaves, causal=True, algorithm=alg, timeout_s=60)
                out.backward(shard_sequence(dout).to(dtype))
                runs.append([out.detach(), *(t.grad for t in leaves)])
            for name, a, b in zip(("out", "dq", "dk", "dv"), *runs, strict=True):
                assert torch.equal(a, b), f"rank {rank}: {alg} {dtype} {name} differs between two runs"
    return "ok"


def test_bit_identical_across_runs():
    assert spawn(_twice, 3, timeout_s=240) == ["ok"] * 3


# ---------------------------------------------------------------------------------------------- packed docs
# Documents of lengths 5, 0, 32, 1, 62, 61: empty, shorter than 2P, odd — none padded to a multiple of 2P.
CU_SEQLENS = torch.tensor([0, 5, 5, 37, 38, 100, 161])


def _varlen_case(rank, world, alg, causal, layout, dtype):
    cu = CU_SEQLENS.tolist()
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(1, cu[-1], h, 32, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))

    def oracle(qd, kd, vd, dod):
        return attention64(qd, kd, vd, dod, causal=causal)

    ref_parts, single_parts = [], []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        ref_parts.append(oracle(q[:, a:b], k[:, a:b], v[:, a:b], dout[:, a:b]))
        leaves = [t[:, a:b].to(dtype).requires_grad_() for t in (q, k, v)]
        o1, l1 = flash_attention(*leaves, causal=causal, return_lse=True)
        o1.backward(dout[:, a:b].to(dtype))
        single_parts.append((o1.detach(), l1, *(t.grad for t in leaves)))
    cat = lambda parts: [torch.cat([p[i] for p in parts], dim=2 if i == 1 else 1) for i in range(5)]
    ref, single = cat(ref_parts), cat(single_parts)

    shard = lambda t, dim=1: shard_sequence(t, None, layout, dim=dim, cu_seqlens=CU_SEQLENS)
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    stats = CommStats()
    out, lse = ALGS[alg](ql, kl, vl, causal=causal, layout=layout, cu_seqlens=CU_SEQLENS, return_lse=True,
                         stats=stats)  # fmt: skip
    out.backward(shard(dout).to(dtype))
    for name, a, o, s1 in zip(("out", "lse", "dq", "dk", "dv"), (out.detach(), lse, ql.grad, kl.grad, vl.grad),
                              ref, single, strict=True):  # fmt: skip
        o_local = shard(o, 2 if name == "lse" else 1)
        assert torch.equal(torch.isneginf(a), torch.isneginf(o_local)), f"rank {rank}: {name} -inf pattern"
        e, e1 = max_err(a, o_local), max_err(s1, o)
        assert e <= 2 * e1 + ATOL[dtype], (
            f"rank {rank}/{world} {alg} {causal} {layout} {dtype}: {name} {e:.2e} vs {e1:.2e}"
        )
    back = unshard_sequence(out.detach(), None, layout, cu_seqlens=CU_SEQLENS)
    torch.testing.assert_close(
        back, ref[0].to(dtype), rtol=0, atol=2 * max_err(single[0], ref[0]) + ATOL[dtype]
    )
    sent = stats.bytes_sent
    shape = AttentionShape(world_size=world, batch=1, seqlen_local=1, heads_q=4, heads_kv=2, head_dim=32, dtype=dtype,
                           causal=causal, layout=layout, cu_seqlens=tuple(cu))  # fmt: skip
    model: dict[str, int] = {}
    for backward in (False, True):
        for label, n in communication_bytes(alg, shape, rank, backward=backward).items():
            model[label] = model.get(label, 0) + n
    assert sent == model, f"rank {rank}: counted {sent} != cost model {model}"


def _varlen_all(rank, world):
    cases = 0
    for alg in ("token_ring", "kv_ring"):
        for causal, layout, dtype in ((True, "zigzag", torch.bfloat16), (True, "contiguous", torch.float32),
                                      (False, "zigzag", torch.float32)):  # fmt: skip
            _varlen_case(rank, world, alg, causal, layout, dtype)
            cases += 1
    local = shard_sequence(torch.zeros(1, int(CU_SEQLENS[-1])), None, "zigzag", cu_seqlens=CU_SEQLENS)
    try:  # a shard that does not match cu_seqlens is refused by name
        token_ring_attention(
            *(torch.zeros(1, local.shape[1] + 1, 2, 8),) * 3, causal=True, cu_seqlens=CU_SEQLENS
        )
    except ValueError as exc:
        assert "cu_seqlens" in str(exc) and f"rank {rank}" in str(exc), exc
    else:
        raise AssertionError("a mis-sharded packed batch was accepted")
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_documents_match_per_document_oracle(world):
    assert spawn(_varlen_all, world, timeout_s=300) == [6] * world


def test_ulysses_refuses_packed_documents():
    q = torch.randn(1, 161, 4, 16)
    with pytest.raises(ValueError, match="ulysses.*cu_seqlens"):
        sequence_parallel_attention(q, q, q, algorithm="ulysses", cu_seqlens=CU_SEQLENS)
    # auto picks a ring algorithm for packed documents (single process: plain attention per document)
    out = sequence_parallel_attention(q, q, q, causal=True, cu_seqlens=CU_SEQLENS)
    parts = [flash_attention(q[:, a:b], q[:, a:b], q[:, a:b], causal=True) for a, b in
             zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist(), strict=True)]  # fmt: skip
    torch.testing.assert_close(out, torch.cat(parts, 1), rtol=1e-5, atol=1e-5)
