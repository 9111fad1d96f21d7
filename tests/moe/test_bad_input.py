"""Bad MoE input raises an error that names the argument, its value and what was expected."""

from __future__ import annotations

import pytest
import torch

from longmoe.moe import MoEConfig, MoELayer

BASE = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)

CONFIG_CASES = {
    "top_k > num_experts": (dict(top_k=5), r"top_k=5 exceeds num_experts=4: expected top_k <= num_experts"),
    "dispatch_chunks 0": (dict(dispatch_chunks=0), r"MoEConfig.dispatch_chunks=0: expected an int >= 1"),
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


def _ids(rows):
    return torch.tensor(rows, dtype=torch.int64)


def _call_cases():
    from longmoe.moe import moe_dispatch_map, moe_permute, moe_unpermute
    from longmoe.moe.experts import GroupedExperts

    dmap = moe_dispatch_map(_ids([[0, 1], [2, 3]]), 4)
    experts = GroupedExperts(MoEConfig(**BASE))
    return {
        "router_dtype": (lambda: MoEConfig(**BASE, router_dtype="bf16"), ValueError, ["router_dtype='bf16'", "'input'"]),
        "expert id out of range": (lambda: moe_dispatch_map(_ids([[0, 4]]), 4), (ValueError, RuntimeError), ["expert_ids", "4"]),
        "expert id below -1": (lambda: moe_dispatch_map(_ids([[0, -2]]), 4), (ValueError, RuntimeError), ["expert_ids", "-2"]),
        "expert ids 1-D": (lambda: moe_dispatch_map(_ids([0, 1]), 4), ValueError, ["expert_ids must be 2-D", "(2,)"]),
        "expert ids float": (lambda: moe_dispatch_map(torch.zeros(2, 2), 4), (TypeError, ValueError), ["expert_ids", "float32"]),
        "num_experts 0": (lambda: moe_dispatch_map(_ids([[0, 1]]), 0), ValueError, ["num_experts", "0"]),
        "permute hidden 1-D": (lambda: moe_permute(torch.randn(2), dmap), ValueError, ["x", "(2,)"]),
        "permute wrong tokens": (lambda: moe_permute(torch.randn(3, 8), dmap), ValueError, ["x", "3", "2"]),
        "unpermute wrong rows": (lambda: moe_unpermute(torch.randn(3, 8), dmap, torch.ones(2, 2)), ValueError, ["y", "3", "4"]),
        "unpermute probs shape": (lambda: moe_unpermute(torch.randn(4, 8), dmap, torch.ones(2, 3)), ValueError, ["probs", "(2, 3)", "(2, 2)"]),
        "experts counts sum": (lambda: experts(torch.randn(5, 16), [1, 1, 1, 1]), ValueError, ["tokens_per_expert", "[1, 1, 1, 1]", "5"]),
        "experts counts length": (lambda: experts(torch.randn(4, 16), [2, 2]), ValueError, ["tokens_per_expert", "[2, 2]", "num_local_experts=4"]),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_call_cases()))
def test_call_errors_name_argument_and_value(case):
    fn, exc, words = _call_cases()[case]
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{case}: {w!r} not in: {info.value}"
