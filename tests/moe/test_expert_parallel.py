"""Expert parallelism on real gloo ranks (longmoe.runtime.spawn) against the single-process layer.

Every rank builds the same full layer from one seed (the single-process reference), loads its full state dict
into an expert-parallel layer (which keeps its own experts), runs its own slice of a global batch, and
asserts forward and backward against the reference on the whole batch. Rank 0 holds no tokens at all (it
sends nothing), and the router is built so that the last expert gets no token (its rank receives nothing
when it holds one expert). fp64 throughout: the two paths differ only in summation order.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from longmoe.moe import MoEConfig, MoELayer
from longmoe.runtime import SpawnError, spawn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

HIDDEN, FFN = 16, 12
TOL = dict(rtol=1e-12, atol=1e-12)  # fp64; only the order of sums over ranks/experts differs


def _tokens_per_rank(world: int) -> list[int]:
    return [0, 9, 5, 13][:world] if world <= 4 else [0] + [7] * (world - 1)


def _reference_layer(cfg: MoEConfig, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(cfg, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.mul_(20.0)
        # The last expert's logit is -5 * mean(x) * sqrt(H): with inputs of mean 2 it never makes the top-k.
        layer.router.weight[-1] = -5.0 / HIDDEN**0.5
    return layer


def _case(
    rank: int, world: int, num_experts: int, top_k: int, capacity_factor: float | None, chunks: int = 1
) -> None:
    group = dist.group.WORLD
    cfg = MoEConfig(
        hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=num_experts, top_k=top_k,
        capacity_factor=capacity_factor, aux_loss_coeff=0.01, expert_bias_update_rate=0.01,
    )  # fmt: skip
    ref = _reference_layer(cfg, seed=100 + num_experts)
    ep = MoELayer(
        dataclasses.replace(cfg, expert_parallel_group=group, dispatch_chunks=chunks), dtype=torch.float64
    )
    ep.load_state_dict(ref.state_dict())  # a full checkpoint into the sharded layer
    local = num_experts // world
    assert ep.experts.linear_fc1.shape[0] == local
    torch.testing.assert_close(
        ep.experts.linear_fc1, ref.experts.linear_fc1[rank * local : (rank + 1) * local], rtol=0, atol=0
    )

    sizes = _tokens_per_rank(world)
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(sum(sizes), HIDDEN, generator=g, dtype=torch.float64) + 2.0
    dout_all = torch.randn(sum(sizes), HIDDEN, generator=g, dtype=torch.float64)
    lo = sum(sizes[:rank])
    x = x_all[lo : lo + sizes[rank]].clone().requires_grad_(True)

    out, aux = ep(x)
    (out * dout_all[lo : lo + sizes[rank]]).sum().backward(retain_graph=True)

    if capacity_factor is None:
        # Dropless: the sharded layer on a slice equals the reference on the whole batch.
        xr = x_all.clone().requires_grad_(True)
        out_ref, aux_ref = ref(xr)
        (out_ref * dout_all).sum().backward()
        ref_out, ref_dx = out_ref[lo : lo + sizes[rank]], xr.grad[lo : lo + sizes[rank]]
        assert int(aux_ref.tokens_per_expert[-1]) == 0, "the last expert was meant to receive no token"
    else:
        # Capacity is per rank (applied to this rank's tokens before dispatch): reference on the same slice,
        # its parameter gradients summed over ranks.
        xr = x.detach().clone().requires_grad_(True)
        out_ref, aux_ref = ref(xr)
        (out_ref * dout_all[lo : lo + sizes[rank]]).sum().backward()
        ref_out, ref_dx = out_ref, xr.grad
        assert int(aux.dropped_tokens) == int(aux_ref.dropped_tokens)
        assert torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert)
        dist.all_reduce(aux_ref.tokens_per_expert)
        dist.all_reduce(aux_ref.routed_tokens_per_expert)
        for p in ref.parameters():
            dist.all_reduce(p.grad)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x.grad, ref_dx, **TOL)

    # Counts: per-rank counts sum to the global ones.
    counts = aux.tokens_per_expert.clone()
    dist.all_reduce(counts)
    assert torch.equal(counts, aux_ref.tokens_per_expert)

    # Gradients: the router is replicated (each rank holds its tokens' share: summed over ranks it is the
    # reference's); each rank holds the full gradient of its own experts' rows.
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.weight.grad, **TOL)
    for name in ("linear_fc1", "linear_fc2"):
        got = getattr(ep.experts, name).grad
        want = getattr(ref.experts, name).grad[rank * local : (rank + 1) * local]
        torch.testing.assert_close(got, want, **TOL)

    # The aux loss is per rank (this rank's tokens): equal to the reference's on the same slice, gradient too.
    ep.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    aux.loss.backward()
    _, aux_local = ref(x.detach())
    aux_local.loss.backward()
    torch.testing.assert_close(aux.loss, aux_local.loss, **TOL)
    if sizes[rank]:
        torch.testing.assert_close(ep.router.weight.grad, ref.router.weight.grad, **TOL)

    # Aux-loss-free balancing: the slots every rank's experts kept (after capacity, as Megatron-core counts
    # them), all-reduced; every rank ends with the bias of the global counts.
    load = ep.update_expert_bias(group)
    kept = aux.tokens_per_expert.float().clone()
    dist.all_reduce(kept, group=group)
    assert torch.equal(load, kept)
    if capacity_factor is None:
        assert torch.equal(load, aux_ref.routed_tokens_per_expert.float())  # dropless: kept == routed
    biases = [torch.empty_like(ep.router.expert_bias) for _ in range(world)]
    dist.all_gather(biases, ep.router.expert_bias)
    assert all(torch.equal(b, biases[0]) for b in biases)

    # Checkpoints move between layouts: the gathered state dict is the reference's.
    full = ep.full_state_dict()
    for key, value in ref.state_dict().items():
        if key != "router.expert_bias":
            assert torch.equal(full[key], value), key


def _ep_fn(rank: int, world: int) -> str:
    _case(rank, world, num_experts=world, top_k=1, capacity_factor=None)  # 1 local expert; one rank idle
    _case(rank, world, num_experts=2 * world, top_k=2, capacity_factor=None)  # 2 local experts
    _case(rank, world, num_experts=2 * world, top_k=2, capacity_factor=0.75)  # capacity, per rank
    # Chunked dispatch: 3 local experts in 2 uneven chunks (1 + 2), dropless and with capacity; one expert
    # per chunk (3 chunks).
    _case(rank, world, num_experts=3 * world, top_k=2, capacity_factor=None, chunks=2)
    _case(rank, world, num_experts=3 * world, top_k=2, capacity_factor=0.75, chunks=2)
    _case(rank, world, num_experts=3 * world, top_k=3, capacity_factor=None, chunks=3)
    try:
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2 * world, top_k=1, dispatch_chunks=3,
                  expert_parallel_group=dist.group.WORLD)  # fmt: skip
    except ValueError as err:
        assert "dispatch_chunks=3 exceeds the 2 local experts per rank" in str(err), str(err)
    else:
        raise AssertionError("MoEConfig accepted more dispatch chunks than local experts")
    # num_experts not divisible by the expert-parallel size: a clear error on every rank.
    try:
        MoEConfig(
            hidden_size=8,
            ffn_hidden_size=8,
            num_experts=world + 1,
            top_k=1,
            expert_parallel_group=dist.group.WORLD,
        )
    except ValueError as err:
        msg = str(err)
        assert f"num_experts={world + 1} is not divisible by the expert-parallel size {world}" in msg, msg
    else:
        raise AssertionError("MoEConfig accepted num_experts not divisible by the expert-parallel size")
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    assert spawn(_ep_fn, world, timeout_s=150.0) == ["ok"] * world


def _ep_fine_fn(rank: int, world: int) -> str:
    # Fine-grained: 64 experts, top-8, 32 or 16 local experts per rank, most of them empty at these token
    # counts (and the last one always); dropless and with capacity drops.
    _case(rank, world, num_experts=64, top_k=8, capacity_factor=None)
    _case(rank, world, num_experts=64, top_k=8, capacity_factor=1.25)
    _case(rank, world, num_experts=64, top_k=8, capacity_factor=None, chunks=4)  # chunks with empty experts
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_fine_grained(world):
    assert spawn(_ep_fine_fn, world, timeout_s=150.0) == ["ok"] * world


def _hang_fn(rank: int, world: int) -> None:
    """Rank 1 never joins the exchange: rank 0's all-to-all must fail by the group timeout, not hang."""
    import datetime

    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1, expert_parallel_group=group)
    layer = MoELayer(cfg)
    if rank == 0:
        layer(torch.randn(4, 8))
    else:
        import time

        time.sleep(30)


def test_missing_peer_fails_by_timeout_instead_of_hanging():
    with pytest.raises(SpawnError) as info:
        spawn(_hang_fn, 2, timeout_s=20.0)
    assert 0 in info.value.failures, str(info.value)
    assert "all_to_all (MoE per-expert counts) failed on rank 0 of the group" in info.value.failures[0]


def _dead_peer_fn(rank: int, world: int, phase: str) -> str:
    """Rank 1 dies after a healthy step, before the ``phase`` (forward or backward) of the next; the
    survivors' all-to-all must fail on its own (group timeout 10 s), naming this rank and the traffic."""
    import datetime
    import os

    group = dist.new_group(timeout=datetime.timedelta(seconds=10))
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=3, top_k=2, expert_parallel_group=group)
    layer = MoELayer(cfg)
    x = torch.randn(6, 8, requires_grad=True)
    layer(x)[0].sum().backward()  # a healthy step: every lazy setup done
    dist.barrier()
    out = layer(x)[0] if phase == "backward" else None
    if rank == 1:
        os._exit(3)
    try:
        if phase == "forward":
            layer(x)
        else:
            out.sum().backward()
    except RuntimeError as exc:  # CollectiveError (a RuntimeError)
        msg = str(exc)
        assert f"on rank {rank}" in msg and "MoE" in msg, msg
        return msg
    raise AssertionError(f"rank {rank}: the MoE {phase} with a dead peer did not raise")


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_dead_peer_in_dispatch_raises_on_every_survivor(phase):
    with pytest.raises(SpawnError) as info:
        spawn(_dead_peer_fn, 3, phase, timeout_s=60.0)
    assert list(info.value.failures) == [1], info.value.failures  # only the dead rank failed
    assert info.value.terminated == [], "a surviving rank hung until the launcher killed it"
