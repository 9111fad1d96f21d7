"""longmoe.megatron: a 2-layer megatron-core GPTModel built with ``gpt_layer_spec()`` (longmoe sequence-parallel
core attention over CP, longmoe MoE over EP) on gloo ranks against the same model run unsharded.

World 1, world 2 (CP 2, EP 2) and world 4 (CP 2, EP 2, so two data-parallel replicas: Megatron folds EP into
DP x CP, and the EP groups are the CP groups {0, 1}, {2, 3}). The unsharded run is megatron-core at world 1 with the same spec and weights. Every rank feeds the
same global batch, sharded by Megatron's own ``get_batch_on_this_cp_rank`` (zigzag); the loss is the sum
of per-token losses over the global token count, so the CP-reduced gradients of replicated weights and the
expert rows (which receive every token of the EP group through the all-to-all) equal the unsharded ones.
The bound is 2x the fp32 unsharded run's error against the fp64 unsharded run (+ the fp32 floor).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

from longmoe.attention import XAttentionConfig
from longmoe.runtime import spawn
from tests.oracle import ATOL, max_err

pytestmark = pytest.mark.distributed

VOCAB, SEQ, BATCH, EXPERTS = 128, 32, 2, 4


def _config(dtype, cp, ep, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
              num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=64, normalization="RMSNorm",
              gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
              params_dtype=dtype, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
              context_parallel_size=cp, expert_model_parallel_size=ep, moe_aux_loss_coeff=0.0)  # fmt: skip
    kw.update(overrides)
    return TransformerConfig(**kw)


def _setup(cp, ep, **overrides):
    """Megatron's parallel state on the spawned gloo group, CPU shims, and the model."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from longmoe.megatron import gpt_layer_spec
    from tests.megatron import cpu_shims

    warnings.filterwarnings("ignore")
    cpu_shims.install()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=cp, expert_model_parallel_size=ep)
    dtype = overrides.pop("dtype", torch.float32)
    sparse = overrides.pop("sparse", None)
    cfg = _config(dtype, cp, ep, **overrides)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=gpt_layer_spec(sparse=sparse), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope")  # fmt: skip
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}


def _step(model, batch):
    loss = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    total = loss.sum() / (BATCH * SEQ)
    total.backward()
    return total.detach()


def _reference(rank, world, sparse=None):
    """World 1, fp64 and fp32: the unsharded loss, the full state dict and every gradient (the fp64 model
    starts from the fp32 weights)."""
    out, state = [], None
    for dtype in (torch.float32, torch.float64):
        model = _setup(1, 1, dtype=dtype, sparse=sparse)
        if state is not None:
            model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
        loss = _step(model, _batch())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if state is None:
            state = {
                k: v.clone()
                for k, v in model.state_dict().items()
                if torch.is_tensor(v) and "extra_state" not in k
            }
        out.append((float(loss), grads))
    return out[1], out[0], state


def _sharded(rank, world, cp, ep, state, sparse=None):
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    model = _setup(cp, ep, sparse=sparse)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    batch = get_batch_on_this_cp_rank(_batch())
    loss = _step(model, batch)
    cp = ps.get_context_parallel_group()
    dist.all_reduce(loss, group=cp)
    grads = {}
    for n, p in model.named_parameters():
        if getattr(p, "allreduce", True):  # replicated: sum the CP shards' contributions
            dist.all_reduce(p.grad, group=cp)
        grads[n] = p.grad.clone()
    ep_rank = ps.get_expert_model_parallel_rank()
    return float(loss), grads, ep_rank


@functools.cache
def _references(sparse=None):
    return spawn(_reference, 1, sparse, timeout_s=300)[0]


# XAttention core attention (Ulysses over CP): 4 key blocks of 8 per sequence, so the masks drop tiles
SPARSE = XAttentionConfig(threshold=0.5, stride=4, block_size=8)


@pytest.mark.parametrize(
    "world,cp,ep,sparse",
    [(1, 1, 1, None), (2, 2, 2, None), (4, 2, 2, None), (1, 1, 1, SPARSE), (2, 2, 2, SPARSE)],
    ids=["w1", "w2-cp2-ep2", "w4-cp2-ep2", "w1-xattention", "w2-cp2-ep2-xattention"],
)
def test_gpt_model_matches_unsharded(world, cp, ep, sparse):
    (loss64, g64), (loss32, g32), state32 = _references(sparse)
    if sparse is not None:  # the masks matter: the dense model's loss is far from the sparse one
        (dense64, _), _, _ = _references(None)
        assert abs(dense64 - loss64) > 1e-3, f"sparse loss {loss64} vs dense {dense64}: nothing was dropped"
    per_rank = spawn(_sharded, world, cp, ep, state32, sparse, timeout_s=400)
    local = EXPERTS // ep
    for rank, (loss, grads, ep_rank) in enumerate(per_rank):
        bound = 2 * abs(loss32 - loss64) + ATOL[torch.float32]
        assert abs(loss - loss64) <= bound, (
            f"rank {rank}/{world}: loss {loss} vs {loss64} (bound {bound:.2e})"
        )
        for name, g in grads.items():
            o, s = g64[name], g32[name]
            if ".experts." in name:  # this rank's expert rows
                o, s = (t[ep_rank * local : (ep_rank + 1) * local] for t in (o, s))
            assert g.shape == o.shape, f"rank {rank}: {name} {tuple(g.shape)} vs {tuple(o.shape)}"
            e, e32 = max_err(g, o), max_err(s, o)
            assert e <= 2 * e32 + ATOL[torch.float32], (
                f"rank {rank}/{world}: {name} grad err {e:.2e} > 2 x {e32:.2e}"
            )
    names = set(per_rank[0][1])
    assert any("self_attention.linear_qkv" in n for n in names) and any(".experts." in n for n in names)


def _aux_routed(rank, world):
    """Router gradients (1) of the main loss with the wrapper as is, (2) of the main loss plus the layers'
    ``aux.loss`` added by hand with Megatron's MoEAuxLossAutoScaler disabled, (3) of the main loss alone with
    the scaler disabled. (1) == (2) says the wrapper routes the aux loss into backward; (1) != (3) says it
    matters."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    grads, state, real = [], None, MoEAuxLossAutoScaler.apply
    for routed, by_hand in ((True, False), (False, True), (False, False)):
        model = _setup(1, 1, moe_aux_loss_coeff=0.1)
        state = model.state_dict() if state is None else state
        model.load_state_dict(state)
        MoEAuxLossAutoScaler.apply = real if routed else staticmethod(lambda out, aux: out)
        batch = _batch()
        loss = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        total = loss.sum() / (BATCH * SEQ)
        if by_hand:
            total = total + sum(layer.mlp.last_aux.loss for layer in model.decoder.layers)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "router" in n})
    MoEAuxLossAutoScaler.apply = real
    flags = {n: getattr(p, "allreduce", True) for n, p in model.named_parameters()}
    return grads, flags


def test_aux_loss_reaches_the_router_and_experts_are_not_allreduced():
    (routed, by_hand, without), flags = spawn(_aux_routed, 1, timeout_s=300)[0]
    assert routed.keys() == by_hand.keys() == without.keys() and routed
    for name in routed:
        torch.testing.assert_close(routed[name], by_hand[name], rtol=1e-5, atol=1e-7)
        assert max_err(routed[name], without[name]) > 1e-4, f"{name}: the aux loss changed nothing"
    experts = {n: f for n, f in flags.items() if ".experts." in n}
    assert experts and not any(experts.values()), experts  # Megatron DDP must not sum different experts
    assert all(f for n, f in flags.items() if ".experts." not in n)


def _save(rank, world, cp, ep, state, path):
    from megatron.core import dist_checkpointing

    model = _setup(cp, ep)
    model.load_state_dict(state, strict=False)
    dist_checkpointing.save(model.sharded_state_dict(), path)
    return sorted(k for k in model.state_dict() if ".experts." in k)


def _load(rank, world, path):
    from megatron.core import dist_checkpointing

    model = _setup(1, 1)
    sd = dist_checkpointing.load(model.sharded_state_dict(), path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    loss = _step(model, _batch())
    return float(loss), {
        k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "extra_state" not in k
    }


def test_dist_checkpointing_save_on_4_ranks_load_on_1(tmp_path):
    (_, _), (loss32, _), state32 = _references()
    spawn(_save, 4, 2, 2, state32, str(tmp_path), timeout_s=300)
    loss, loaded = spawn(_load, 1, str(tmp_path), timeout_s=300)[0]
    assert loaded.keys() == state32.keys()
    for k, v in state32.items():  # every expert row of every layer came back, bit for bit
        assert torch.equal(loaded[k], v), k
    assert loss == loss32


def _tc(**overrides):
    return _config(torch.float32, 1, 1, **overrides)


def test_moe_config_mapping():
    from longmoe.megatron import moe_config_from

    cfg = moe_config_from(_tc(moe_router_pre_softmax=True, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
                              moe_expert_capacity_factor=1.25, moe_token_drop_policy="position",
                              moe_router_dtype="fp32", moe_shared_expert_intermediate_size=32))  # fmt: skip
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.top_k) == (64, 64, EXPERTS, 2)
    assert cfg.normalize_topk is False and cfg.activation == "swiglu" and cfg.router_dtype == "float32"
    assert (cfg.aux_loss_coeff, cfg.z_loss_coeff, cfg.capacity_factor, cfg.drop_policy) == (
        0.01,
        1e-3,
        1.25,
        "position",
    )
    assert cfg.shared_expert_ffn_hidden_size == 32
    default = moe_config_from(_tc())
    assert (
        default.normalize_topk is True and default.router_dtype == "input" and default.capacity_factor is None
    )


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(moe_router_topk_scaling_factor=2.0), r"moe_router_topk_scaling_factor=2.0 .*expected None"),
        (dict(add_bias_linear=True), r"add_bias_linear=True .*expected False"),
        (dict(moe_router_load_balancing_type="sinkhorn"), r"moe_router_load_balancing_type='sinkhorn'"),
        (dict(gated_linear_unit=False), r"activation_func='silu' with gated_linear_unit=False"),
        (
            dict(moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0),
            r"moe_pad_expert_input_to_capacity=True",
        ),
    ],
    ids=["topk_scaling", "bias", "sinkhorn", "silu_no_glu", "pad_to_capacity"],
)
def test_moe_config_rejects_what_has_no_equivalent(overrides, pattern):
    from longmoe.megatron import moe_config_from

    with pytest.raises(ValueError, match=pattern):
        moe_config_from(_tc(**overrides))


def test_spec_rejects_unknown_algorithm_and_attention_options():
    from megatron.core.transformer.enums import AttnMaskType

    from longmoe.megatron import SequenceParallelCoreAttention, gpt_layer_spec

    with pytest.raises(ValueError, match=r"attention='ring': expected one of"):
        gpt_layer_spec(attention="ring")
    with pytest.raises(
        ValueError, match=r"attention='token_ring' with sparse: .*expected 'auto' or 'ulysses'"
    ):
        gpt_layer_spec(attention="token_ring", sparse=SPARSE)
    with pytest.raises(TypeError, match=r"sparse=0.5: expected a longmoe.attention.XAttentionConfig"):
        gpt_layer_spec(sparse=0.5)
    with pytest.raises(ValueError, match=r"attention_dropout=0.1: .*expected 0.0"):
        SequenceParallelCoreAttention(
            _tc(attention_dropout=0.1), 1, AttnMaskType.causal, "self", pg_collection=object()
        )
    with pytest.raises(ValueError, match=r"attn_mask_type=.*padding.*expected AttnMaskType.causal"):
        SequenceParallelCoreAttention(_tc(), 1, AttnMaskType.padding, "self", pg_collection=object())
