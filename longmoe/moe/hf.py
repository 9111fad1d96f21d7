"""Hugging Face interop: MoE blocks of Mixtral-, Qwen2-MoE-, OLMoE- and PhiMoE-style models into :class:`MoELayer` and back.

Written against transformers 5.x, whose experts are fused 3-D parameters: ``experts.gate_up_proj
(E, 2 * ffn, H)`` (gate rows first) and ``experts.down_proj (E, H, ffn)`` - the same layout as
:class:`~longmoe.moe.experts.GroupedExperts`, so weights are copied without reshaping.

=================  ==========================  =====================================================
family             router                      MoEConfig
=================  ==========================  =====================================================
``mixtral``        ``gate.weight``             softmax, top-k renormalised
``qwen2_moe``      ``gate.weight``             softmax, ``normalize_topk = norm_topk_prob``, shared
                                               expert (``gate_proj``/``up_proj``/``down_proj``) with a
                                               sigmoid ``shared_expert_gate``
``olmoe``          ``gate.weight``             softmax, ``normalize_topk = norm_topk_prob`` (fine-grained:
                                               64 experts, top-8, narrow experts; no shared expert)
``phimoe``         ``router.weight``           ``sparsemixer`` top-2, ``sparsemixer_eps =
                                               router_jitter_noise``
=================  ==========================  =====================================================

In eval mode the layer's output equals the Hugging Face block's (up to summation order). Training-time
extras of the Hugging Face blocks are not reproduced: Mixtral's and PhiMoE's multiplicative input jitter, and
PhiMoE's Gumbel-sampled expert choice with its Heun's-method gradient estimator (see
:func:`~longmoe.moe.router.sparsemixer_routing`).

    layer = moe_layer_from_hf(model.model.layers[0].mlp, model.config)   # MoELayer with the same weights
    replace_hf_moe_blocks(model)                                        # every MoE block runs on longmoe
"""

from __future__ import annotations

import torch
from torch import nn

from longmoe.moe.config import MoEConfig
from longmoe.moe.layer import MoEAux, MoELayer

__all__ = [
    "HF_MOE_FAMILIES",
    "moe_config_from_hf",
    "hf_block_state_dict",
    "moe_layer_from_hf",
    "load_moe_layer_into_hf",
    "HFMoEBlock",
    "replace_hf_moe_blocks",
]

HF_MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "olmoe", "phimoe")
"""``model_type`` values of the supported Hugging Face configs."""

_BLOCK_CLASSES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "PhimoeSparseMoeBlock": "phimoe",
}
_ROUTER = {"mixtral": "gate", "qwen2_moe": "gate", "olmoe": "gate", "phimoe": "router"}


def _family(hf_config) -> str:
    family = getattr(hf_config, "model_type", None)
    if family not in HF_MOE_FAMILIES:
        raise ValueError(
            f"hf_config.model_type={family!r} is not supported; expected one of {HF_MOE_FAMILIES}"
        )
    return family


def moe_config_from_hf(hf_config, **overrides) -> MoEConfig:
    """The :class:`MoEConfig` of one MoE block of a Hugging Face config (``overrides`` replace fields, e.g.
    ``expert_parallel_group``, ``capacity_factor``, ``aux_loss_coeff``)."""
    family = _family(hf_config)
    if hf_config.hidden_act != "silu":
        raise ValueError(
            f"hf_config.hidden_act={hf_config.hidden_act!r}: the Hugging Face experts are gated, and MoELayer's gated "
            "activation is SwiGLU; expected 'silu'"
        )
    kw: dict = dict(
        hidden_size=hf_config.hidden_size, top_k=hf_config.num_experts_per_tok, activation="swiglu"
    )
    if family == "mixtral":
        kw.update(ffn_hidden_size=hf_config.intermediate_size, num_experts=hf_config.num_local_experts)
    elif family == "qwen2_moe":
        kw.update(
            ffn_hidden_size=hf_config.moe_intermediate_size,
            num_experts=hf_config.num_experts,
            normalize_topk=bool(hf_config.norm_topk_prob),
            shared_expert_ffn_hidden_size=hf_config.shared_expert_intermediate_size,
            shared_expert_gate=True,
        )
    elif family == "olmoe":
        kw.update(
            ffn_hidden_size=hf_config.intermediate_size,
            num_experts=hf_config.num_experts,
            normalize_topk=bool(hf_config.norm_topk_prob),
        )
    else:
        kw.update(
            ffn_hidden_size=hf_config.intermediate_size,
            num_experts=hf_config.num_local_experts,
            score_function="sparsemixer",
            sparsemixer_eps=float(hf_config.router_jitter_noise),
        )
    if getattr(hf_config, "initializer_range", None) is not None:
        kw["init_method_std"] = float(hf_config.initializer_range)
    kw.update(overrides)
    return MoEConfig(**kw)


def hf_block_state_dict(block: nn.Module, hf_config) -> dict[str, torch.Tensor]:
    """A Hugging Face MoE block's weights under :class:`MoELayer`'s (unsharded) state-dict keys."""
    family = _family(hf_config)
    sd = {
        "router.weight": getattr(block, _ROUTER[family]).weight.detach(),
        "experts.linear_fc1": block.experts.gate_up_proj.detach(),
        "experts.linear_fc2": block.experts.down_proj.detach(),
    }
    if family == "qwen2_moe":
        se = block.shared_expert
        sd["shared_expert.linear_fc1.weight"] = torch.cat((se.gate_proj.weight, se.up_proj.weight)).detach()
        sd["shared_expert.linear_fc2.weight"] = se.down_proj.weight.detach()
        sd["shared_expert_gate.weight"] = block.shared_expert_gate.weight.detach()
    return sd


def moe_layer_from_hf(block: nn.Module, hf_config, *, backend: str | None = None, **overrides) -> MoELayer:
    """A :class:`MoELayer` holding the weights of the Hugging Face MoE ``block`` (same device and dtype).

    ``overrides`` go to :func:`moe_config_from_hf`; with ``expert_parallel_group`` the layer keeps only its
    rank's experts (every rank passes the full block).
    """
    cfg = moe_config_from_hf(hf_config, **overrides)
    ref = block.experts.gate_up_proj
    layer = MoELayer(cfg, device=ref.device, dtype=ref.dtype, backend=backend)
    layer.load_state_dict(hf_block_state_dict(block, hf_config), strict=True)
    return layer.train(block.training)


@torch.no_grad()
def load_moe_layer_into_hf(layer: MoELayer, block: nn.Module, hf_config) -> nn.Module:
    """Copy ``layer``'s weights into the Hugging Face MoE ``block`` (in place; returns it). An expert-parallel
    layer gathers its experts first (collective over its group)."""
    family = _family(hf_config)
    sd = layer.full_state_dict()
    getattr(block, _ROUTER[family]).weight.copy_(sd["router.weight"])
    block.experts.gate_up_proj.copy_(sd["experts.linear_fc1"])
    block.experts.down_proj.copy_(sd["experts.linear_fc2"])
    if family == "qwen2_moe":
        se, ffn = block.shared_expert, block.shared_expert.gate_proj.weight.shape[0]
        fc1 = sd["shared_expert.linear_fc1.weight"]
        se.gate_proj.weight.copy_(fc1[:ffn])
        se.up_proj.weight.copy_(fc1[ffn:])
        se.down_proj.weight.copy_(sd["shared_expert.linear_fc2.weight"])
        block.shared_expert_gate.weight.copy_(sd["shared_expert_gate.weight"])
    return block


class HFMoEBlock(nn.Module):
    """Drop-in for a Hugging Face MoE block: ``forward(hidden_states (batch, seq, H)) -> (batch, seq, H)``, as
    the decoder layer expects; the :class:`MoEAux` of the last forward is kept in :attr:`last_aux` (add
    ``last_aux.loss`` to the training loss when using the auxiliary losses)."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.last_aux: MoEAux | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, self.last_aux = self.moe(hidden_states)
        return out


def replace_hf_moe_blocks(
    model: nn.Module, *, backend: str | None = None, **overrides
) -> dict[str, HFMoEBlock]:
    """Swap every Mixtral/Qwen2-MoE/OLMoE/PhiMoE sparse MoE block inside ``model`` for an :class:`HFMoEBlock` with the
    same weights. ``overrides`` go to :func:`moe_config_from_hf`. Returns the new blocks by module path."""
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError(
            f"replace_hf_moe_blocks(model={type(model).__name__}): expected a transformers model with .config"
        )
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in _BLOCK_CLASSES]
    if not targets:
        raise ValueError(
            f"replace_hf_moe_blocks(): no {sorted(_BLOCK_CLASSES)} inside {type(model).__name__}; expected at least one"
        )
    new = {}
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = HFMoEBlock(moe_layer_from_hf(block, hf_config, backend=backend, **overrides))
        setattr(parent, attr, wrapped)
        new[name] = wrapped
    return new
