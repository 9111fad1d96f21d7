"""longmoe.parallelize: the plain-PyTorch path (SP x EP x DP over device meshes) equals one process.

Every rank builds the same fp64 LlamaMoE from one seed and keeps an unsharded copy; the sharded model runs
its part of a global batch, gradients are synchronised, and each rank compares its loss share and every
gradient (its own expert rows for sharded experts) with the one-process model on the whole batch.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longmoe.attention import XAttentionConfig
from longmoe.models import LlamaMoE, LlamaMoEConfig
from longmoe.moe import MoELayer
from longmoe.parallelize import (
    ParallelConfig,
    apply_expert_parallel,
    apply_sequence_parallel,
    build_meshes,
    full_state_dict,
    parallelize,
    shard_batch,
    sync_gradients,
)
from longmoe.runtime import SpawnError, spawn

pytestmark = pytest.mark.distributed

CFG = LlamaMoEConfig(vocab_size=64, hidden_size=32, layers=2, heads_q=4, heads_kv=2,
                     moe=dict(num_experts=4, top_k=2, ffn_hidden_size=24), dense_layers=(0,))  # fmt: skip
TOL = dict(rtol=1e-9, atol=1e-11)  # fp64: only the order of sums over ranks differs


def _model() -> LlamaMoE:
    torch.manual_seed(0)
    model = LlamaMoE(CFG).double()
    with torch.no_grad():  # a router that spreads tokens over every expert
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.router.weight.normal_(0, 1.0)
    return model


def _loss(model, tokens, targets, positions=None, tokens_per_replica=None):
    logits, aux, _ = model(tokens, positions)
    total = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), targets.reshape(-1), reduction="sum")
    return total / (tokens_per_replica or targets.numel()) + aux


def _parity(rank, world, sp, ep, path, sparse=None):
    config = ParallelConfig(
        sequence_parallel_size=sp, expert_parallel_size=ep, algorithm="auto", sparse=sparse
    )
    model = _model()
    ref = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    if sparse is not None:  # the one-process model runs XAttention on whole sequences
        apply_sequence_parallel(ref, None, ParallelConfig(sparse=sparse))
    meshes = parallelize(model, config)
    dp = meshes.dp
    g = torch.Generator().manual_seed(1)
    seqlen = 4 * sp * 3 if sparse is None else 48
    data = torch.randint(0, CFG.vocab_size, (2 * dp, seqlen + 1), generator=g)
    inputs, targets = data[:, :-1], data[:, 1:]

    tokens, positions = shard_batch(inputs, meshes.dense, config)
    local_targets, _ = shard_batch(targets, meshes.dense, config)
    loss = _loss(model, tokens, local_targets, positions, tokens_per_replica=2 * seqlen)
    loss.backward()
    sync_gradients(model, meshes)
    share = loss.detach().clone()
    if world > 1:
        dist.all_reduce(share)
    ref_loss = _loss(ref, inputs, targets)  # the whole global batch in one process
    ref_loss.backward()
    torch.testing.assert_close(share / dp, ref_loss.detach(), **TOL)
    if sparse is not None:  # the masks drop tiles: sparse and dense differ far beyond the tolerance
        with torch.no_grad():
            gap = abs(float(_loss(dense, inputs, targets)) - float(ref_loss))
        assert gap > 1e-4, (
            f"rank {rank}: sparse loss equals the dense one within {gap:.1e}: nothing was dropped"
        )

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        layer = model.get_submodule(name.rsplit(".experts.", 1)[0]) if ".experts." in name else None
        if isinstance(layer, MoELayer) and layer.dispatcher is not None:
            lo = layer.experts.expert_offset
            want = want[lo : lo + layer.experts.num_local_experts]
        assert p.grad is not None, f"rank {rank}: {name} got no gradient"
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m, n=name: f"rank {rank} {name}: {m}")

    # A full checkpoint saved from the sharded model loads into one process and back, nothing missing.
    sd = full_state_dict(model)
    if rank == 0:
        torch.save(sd, path)
    if world > 1:
        dist.barrier()
    fresh = LlamaMoE(CFG).double()
    fresh.load_state_dict(torch.load(path), strict=True)  # strict: every parameter present
    if sparse is not None:
        apply_sequence_parallel(fresh, None, ParallelConfig(sparse=sparse))
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs)[0], ref(inputs)[0], rtol=0, atol=0)
        back = _model()
        back.load_state_dict(torch.load(path), strict=True)
        apply_expert_parallel(back, meshes.experts, config)  # sharded again from the loaded weights,
        apply_sequence_parallel(back, meshes.dense, config)  # on the same groups (same "auto" pick)
        torch.testing.assert_close(back(tokens, positions)[0], model(tokens, positions)[0], rtol=0, atol=0)
    return dp


FACTORISATIONS = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 2, 2), (4, 4, 1), (4, 1, 4), (4, 2, 1),
                  (4, 1, 2)]  # fmt: skip


@pytest.mark.parametrize(
    "world,sp,ep", FACTORISATIONS, ids=[f"w{w}-sp{s}-ep{e}" for w, s, e in FACTORISATIONS]
)
def test_plain_path_matches_one_process(world, sp, ep):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "full.pt")
        if world == 1:
            assert _parity(0, 1, sp, ep, path) == 1
        else:
            assert spawn(_parity, world, sp, ep, path, timeout_s=300) == [world // sp] * world


SPARSE = [(1, 1, 1, "group"), (2, 2, 1, "group"), (4, 2, 2, "group"), (4, 4, 1, "head")]


@pytest.mark.parametrize("world,sp,ep,heads", SPARSE, ids=[f"w{w}-sp{s}-ep{e}-{h}" for w, s, e, h in SPARSE])
def test_plain_path_with_xattention_matches_one_process(world, sp, ep, heads):
    """XAttention under Ulysses (whole sequences per rank and head group) gives the one-process sparse model's
    loss and gradients; per-query-head selection where K/V heads are replicated (heads_kv=2 < sp=4)."""
    sparse = XAttentionConfig(threshold=0.5, stride=2, block_size=4, head_selection=heads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "full.pt")
        if world == 1:
            assert _parity(0, 1, sp, ep, path, sparse) == 1
        else:
            assert spawn(_parity, world, sp, ep, path, sparse, timeout_s=300) == [world // sp] * world


def _mismatch(rank, world):
    config = ParallelConfig(sequence_parallel_size=2 if rank == 0 else 1, expert_parallel_size=1)
    try:
        build_meshes(config)
    except ValueError as exc:
        msg = str(exc)
        assert "sequence_parallel_size is" in msg and "on rank" in msg, msg
        return msg
    raise AssertionError(f"rank {rank}: a config that differs across ranks was accepted")


def _sparse_mismatch(rank, world):
    config = ParallelConfig(sparse=XAttentionConfig(threshold=0.9 if rank == 0 else 0.8))
    try:
        build_meshes(config)
    except ValueError as exc:
        assert "sparse_threshold_crc is" in str(exc) and "on rank" in str(exc), str(exc)
        return str(exc)
    raise AssertionError(f"rank {rank}: XAttention settings that differ across ranks were accepted")


def test_sparse_settings_that_differ_across_ranks_are_an_error():
    msgs = spawn(_sparse_mismatch, 2, timeout_s=60)
    assert "rank 1" in msgs[0] and "rank 0" in msgs[1]


def test_config_mismatch_across_ranks_is_an_error_not_a_hang():
    msgs = spawn(_mismatch, 2, timeout_s=60)
    assert "rank 0" in msgs[0] and "rank 1" in msgs[1]


@pytest.mark.parametrize(
    "kw,match",
    [(dict(sequence_parallel_size=0), "sequence_parallel_size=0"), (dict(expert_parallel_size=1.5), "expert_parallel_size"),
     (dict(algorithm="ring"), "algorithm='ring'"), (dict(layout="striped"), "layout='striped'"),
     (dict(timeout_s=0), "timeout_s")],
)  # fmt: skip
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kw)


def test_sizes_must_divide_the_world():
    with pytest.raises(ValueError, match="sequence_parallel_size=3 does not divide world_size=4"):
        ParallelConfig(sequence_parallel_size=3).data_parallel_size(4)


def _spawned_error(rank, world):
    return build_meshes(ParallelConfig(expert_parallel_size=3))


def test_expert_parallel_size_not_dividing_the_world_raises_on_every_rank():
    with pytest.raises(SpawnError, match="expert_parallel_size=3 does not divide world_size=2"):
        spawn(_spawned_error, 2, timeout_s=60)


def _hf_mixtral(rank, world):
    import transformers

    from longmoe.moe.hf import replace_hf_moe_blocks

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip
    cfg._experts_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    replace_hf_moe_blocks(hf)
    ref = copy.deepcopy(hf)
    config = ParallelConfig(sequence_parallel_size=2, expert_parallel_size=2, algorithm="token_ring")
    meshes = parallelize(hf, config)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    tokens, positions = shard_batch(ids, meshes.dense, config)
    with torch.no_grad():
        out = hf(input_ids=tokens, position_ids=positions[None]).logits
        want = ref(input_ids=ids).logits
    local, _ = shard_batch(want, meshes.dense, config)
    torch.testing.assert_close(out, local, **TOL)
    return "ok"


def test_hugging_face_mixtral_sequence_and_expert_parallel():
    """A HF Mixtral (MoE blocks replaced by longmoe's) under SP 2 x EP 2 on 2 ranks: each rank's logits are
    its shard of the one-process logits."""
    assert spawn(_hf_mixtral, 2, timeout_s=180) == ["ok", "ok"]
