"""Mixture of Experts: router, token dispatch (local and expert-parallel), grouped experts, MoE layer,
routing statistics, Hugging Face interop.

    from longmoe.moe import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(hidden_size=1024, ffn_hidden_size=2816, num_experts=8, top_k=2))
    out, aux = layer(x)                  # x: (..., 1024); aux.loss, aux.tokens_per_expert, ...
    (task_loss + aux.loss).backward()

Hugging Face interop lives in :mod:`longmoe.moe.hf` (imported on use: it needs ``transformers``).
"""

from longmoe.moe.config import MoEConfig
from longmoe.moe.dispatcher import AllToAllDispatcher, all_to_all
from longmoe.moe.experts import GroupedExperts, SharedExpertMLP, grouped_linear, grouped_mm_available
from longmoe.moe.layer import MoEAux, MoELayer
from longmoe.moe.permute import (
    DispatchMap,
    moe_dispatch_map,
    moe_dispatch_map_ref,
    moe_permute,
    moe_permute_ref,
    moe_unpermute,
    moe_unpermute_ref,
)
from longmoe.moe.router import (
    RouterOutput,
    TopKRouter,
    apply_capacity,
    expert_capacity,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    sparsemixer_routing,
    topk_routing,
)
from longmoe.moe.stats import LayerStepStats, RoutingStats

__all__ = [
    "MoEConfig",
    "MoELayer",
    "MoEAux",
    # router
    "TopKRouter",
    "RouterOutput",
    "topk_routing",
    "sparsemixer_routing",
    "expert_capacity",
    "apply_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
    # dispatch
    "DispatchMap",
    "moe_dispatch_map",
    "moe_dispatch_map_ref",
    "moe_permute",
    "moe_permute_ref",
    "moe_unpermute",
    "moe_unpermute_ref",
    "AllToAllDispatcher",
    "all_to_all",
    # experts
    "GroupedExperts",
    "SharedExpertMLP",
    "grouped_linear",
    "grouped_mm_available",
    # statistics
    "RoutingStats",
    "LayerStepStats",
]
