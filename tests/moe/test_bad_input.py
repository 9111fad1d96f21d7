"""Bad MoE input raises an error that names the argument, its value and what was expected."""

from __future__ import annotations

import pytest
import torch

from longmoe.moe import MoEConfig, MoELayer

BASE = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)

CONFIG_CASES = {
    "top_k > num_experts": (dict(top_k=5), r"top_k=5 exceeds num_experts=4: expected top_k <= num_experts"),
    "capacity_factor 0": (
        dict(capacity_factor=0),
        r"capacity_factor=0: expected None \(dropless\) or a finite number > 0",
    ),
    "capacity_factor < 0": (dict(capacity_factor=-1.5), r"capacity_factor=-1.5: expected None"),
    "capacity_factor nan": (dict(capacity_factor=float("nan")), r"capacity_factor=nan: expected None"),
    "num_experts 0": (dict(num_experts=0), r"num_experts=0: expected an int >= 1"),
    "hidden_size float": (dict(hidden_size=16.0), r"hidden_size=16.0: expected an int >= 1"),
    "score_function": (
        dict(score_function="relu"),
        r"score_function='relu': expected 'softmax', 'sigmoid' or 'sparsemixer'",
    ),
    "sparsemixer top_k": (
        dict(score_function="sparsemixer", top_k=1),
        r"top_k=1 with score_function='sparsemixer': expected top_k=2",
    ),
    "drop_policy": (dict(drop_policy="random"), r"drop_policy='random': expected 'probs' or 'position'"),
    "activation": (dict(activation="relu"), r"activation='relu': expected 'swiglu' or 'gelu'"),
    "aux_loss_coeff": (dict(aux_loss_coeff=-0.1), r"aux_loss_coeff=-0.1: expected a finite number >= 0"),
    "shared gate without shared expert": (
        dict(shared_expert_gate=True),
        r"shared_expert_gate=True needs a shared expert",
    ),
    "expert widths length": (
        dict(expert_ffn_hidden_sizes=(8, 8)),
        r"expert_ffn_hidden_sizes has 2 entries: expected num_experts=4",
    ),
    "expert width too wide": (
        dict(expert_ffn_hidden_sizes=(8, 9, 8, 8)),
        r"expert_ffn_hidden_sizes\[1\]=9: expected an int in \[1, ffn_hidden_size=8\]",
    ),
    "bias with sparsemixer": (
        dict(score_function="sparsemixer", expert_bias_update_rate=0.01),
        r"expert_bias_update_rate=0.01 with score_function='sparsemixer'",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors_name_value_and_expectation(case):
    overrides, pattern = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{**BASE, **overrides})


def test_expert_parallel_group_needs_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("this test expects no default process group in the test process")
    with pytest.raises(
        ValueError, match=r"expert_parallel_group is set but torch.distributed is not initialised"
    ):
        MoEConfig(**BASE, expert_parallel_group=object())


def test_hidden_size_mismatch_names_both_sizes():
    layer = MoELayer(MoEConfig(**BASE))
    with pytest.raises(
        ValueError,
        match=r"hidden_states last dim=12 \(shape \(2, 3, 12\)\) does not match MoEConfig.hidden_size=16",
    ):
        layer(torch.randn(2, 3, 12))
    with pytest.raises(TypeError, match=r"hidden_states must be a floating tensor; got torch.int64"):
        layer(torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(TypeError, match=r"MoELayer\(config=dict\): expected a longmoe.moe.MoEConfig"):
        MoELayer(BASE)


def test_expert_bias_update_without_bias_is_an_error():
    with pytest.raises(
        RuntimeError, match=r"expert_bias_update_rate is None.*expected expert_bias_update_rate set"
    ):
        MoELayer(MoEConfig(**BASE)).update_expert_bias()
