"""Hugging Face interop: Mixtral, Qwen2-MoE, OLMoE and PhiMoE blocks (small configs, no download) into MoELayer and back.

The Hugging Face block in fp64 is the oracle; the tolerance rule compares our fp32 layer with the Hugging
Face block in fp32 (``err(ours32, hf64) <= 2 * err(hf32, hf64) + atol``). The Hugging Face experts run their
eager per-expert loop (``experts_implementation="eager"``).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from longmoe.moe import MoELayer
from longmoe.moe.hf import (
    HFMoEBlock,
    load_moe_layer_into_hf,
    moe_config_from_hf,
    moe_layer_from_hf,
    replace_hf_moe_blocks,
)
from longmoe.moe.router import sparsemixer_routing
from tests.oracle import assert_within_oracle

COMMON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    max_position_embeddings=64, initializer_range=0.2,
)  # fmt: skip
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        intermediate_size=64,
        norm_topk_prob=False,
        **COMMON,
    ),  # fmt: skip
    "olmoe": lambda: transformers.OlmoeConfig(
        intermediate_size=8, num_experts=16, num_experts_per_tok=8, norm_topk_prob=False, **COMMON
    ),  # fine-grained: many narrow experts, top-8
    "phimoe": lambda: transformers.PhimoeConfig(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON
    ),
}


def _model(family: str, dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = FAMILIES[family]()
    cfg._experts_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_round_trip(family):
    hf64 = _model(family, torch.float64)
    hf32 = _model(family, torch.float32)
    block64, block32 = hf64.model.layers[0].mlp, hf32.model.layers[0].mlp
    layer = moe_layer_from_hf(block32, hf32.config)
    assert isinstance(layer, MoELayer) and not layer.training
    assert layer.config.num_experts == {"qwen2_moe": 6, "olmoe": 16}.get(family, 4)
    assert (layer.shared_expert is not None) == (family == "qwen2_moe")

    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        oracle = block64(x)
        same = block32(x.float())
        ours, aux = layer(x.float())
    assert aux.tokens_per_expert.sum() == 2 * 13 * layer.config.top_k
    assert_within_oracle(f"{family} block", ours, same, oracle, torch.float32)

    # ...and back: a freshly initialised block that receives the layer's weights is the original block.
    torch.manual_seed(1)
    fresh = type(block32)(hf32.config).eval()
    load_moe_layer_into_hf(layer, fresh, hf32.config)
    for (name, p), (_, q) in zip(block32.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(fresh(x.float()), same)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_model_with_replaced_blocks(family):
    hf64 = _model(family, torch.float64)
    hf32 = _model(family, torch.float32)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        oracle = hf64(ids).logits
        same = hf32(ids).logits
    new = replace_hf_moe_blocks(hf32)
    assert sorted(new) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(hf32.get_submodule(n), HFMoEBlock) for n in new)
    with torch.no_grad():
        ours = hf32(ids).logits
    assert_within_oracle(f"{family} logits", ours, same, oracle, torch.float32)
    assert new["model.layers.0.mlp"].last_aux.num_tokens == 22


def test_sparsemixer_matches_transformers():
    logits = torch.randn(200, 8, dtype=torch.float64)
    logits[:20] = logits[:20].round()  # exact ties and near-threshold gaps
    for eps in (0.01, 0.3):
        want_p, want_i = sparsemixer(logits, jitter_eps=eps, training=False, top_k=2)
        got_p, got_i = sparsemixer_routing(logits, eps)
        assert torch.equal(got_i, want_i)
        assert torch.equal(got_p, want_p)


def test_unsupported_config_names_model_type():
    cfg = transformers.LlamaConfig()
    with pytest.raises(ValueError, match=r"hf_config.model_type='llama' is not supported; expected one of"):
        moe_config_from_hf(cfg)
    mix = FAMILIES["mixtral"]()
    mix.hidden_act = "gelu"
    with pytest.raises(ValueError, match=r"hf_config.hidden_act='gelu'.*expected 'silu'"):
        moe_config_from_hf(mix)
