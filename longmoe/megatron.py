"""Megatron-core integration (optional: ``pip install longmoe[megatron]``, megatron-core 0.16.1).

:func:`gpt_layer_spec` is Megatron-core's local GPT layer spec (``get_gpt_layer_local_spec``) with two
submodules replaced:

* ``core_attention`` -> :class:`SequenceParallelCoreAttention`: longmoe sequence-parallel attention
  (TokenRing, KV ring, Ulysses or ``"auto"``) over the context-parallel group that Megatron passes in
  ``pg_collection.cp``. Megatron shards the sequence for CP in the zigzag layout
  (``get_batch_on_this_cp_rank``: rank r holds chunks r and 2 CP - 1 - r), which is longmoe's ``"zigzag"``.
* ``mlp`` -> :class:`LongmoeMoE`: a :class:`longmoe.moe.MoELayer` over Megatron's expert-parallel group,
  with its :class:`~longmoe.moe.MoEConfig` mapped from the ``TransformerConfig`` (:func:`moe_config_from`).

Topology. Megatron folds expert parallelism into data x context parallelism: with world 4, CP 2 and EP 2,
the EP groups are the CP groups ({0, 1} and {2, 3}) and ranks {0, 2} are data-parallel replicas of each
other (their expert-data-parallel group is {0, 2} as well). Gradients of non-expert parameters are reduced
over DP x CP; expert parameters are marked ``allreduce=False`` so Megatron's DDP reduces them over the
expert-data-parallel group only.

The wrapper does the three things a user would otherwise lose silently: it routes ``aux.loss`` into backward
with Megatron's ``MoEAuxLossAutoScaler`` (so the balancing and z losses train the router, scaled like the
main loss), marks expert parameters ``allreduce=False``, and gives ``sharded_state_dict`` with expert rows
as ShardedTensors over EP (so ``dist_checkpointing`` saves every expert, not rank 0's as "replicated").

This module imports megatron-core on use; ``import longmoe`` does not need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longmoe.attention import XAttentionConfig, flash_attention
from longmoe.moe import MoEConfig, MoELayer
from longmoe.parallel import sequence_parallel_attention

__all__ = ["SequenceParallelCoreAttention", "LongmoeMoE", "gpt_layer_spec", "moe_config_from"]  # noqa: F822 (lazy)

_ALGORITHMS = ("auto", "token_ring", "kv_ring", "ulysses")


def _megatron():
    try:
        import megatron.core  # noqa: F401, PLC0415
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "longmoe.megatron needs megatron-core: pip install 'longmoe[megatron]' (megatron-core==0.16.1)"
        ) from exc
    from megatron.core.transformer.module import MegatronModule  # noqa: PLC0415

    return MegatronModule


# ----------------------------------------------------------------------------------------------- config
# TransformerConfig fields with a longmoe MoEConfig equivalent are mapped; the ones below are rejected by
# name when set to anything but their default, since silently ignoring them would train another model.
_UNSUPPORTED_MOE = {
    "moe_router_topk_scaling_factor": None,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_pad_expert_input_to_capacity": False,
    "moe_input_jitter_eps": None,
    "moe_token_dropping": False,
    "moe_expert_capacity_factor_for_packed": None,
    "add_bias_linear": False,
    "moe_shared_expert_overlap": False,
    "tensor_model_parallel_size": 1,
    "expert_tensor_parallel_size": 1,
    "moe_latent_size": None,
}


def moe_config_from(config: Any, *, expert_parallel_group: dist.ProcessGroup | None = None) -> MoEConfig:
    """The :class:`~longmoe.moe.MoEConfig` for a megatron-core ``TransformerConfig``.

    Mapped: ``hidden_size``; ``moe_ffn_hidden_size`` -> ``ffn_hidden_size``; ``num_moe_experts``;
    ``moe_router_topk`` -> ``top_k``; ``moe_router_score_function``; ``moe_router_pre_softmax`` (False:
    softmax over the top-k logits = longmoe's ``normalize_topk=True``; True: softmax over all experts, not
    renormalised); ``moe_router_dtype`` (None: the input dtype; ``"fp32"``: float32);
    ``moe_router_load_balancing_type`` ``"aux_loss"`` / ``"none"`` with ``moe_aux_loss_coeff``;
    ``moe_z_loss_coeff``; ``moe_router_enable_expert_bias`` with ``moe_router_bias_update_rate``;
    ``moe_expert_capacity_factor`` and ``moe_token_drop_policy``; ``moe_shared_expert_intermediate_size``
    and ``moe_shared_expert_gate``; ``gated_linear_unit`` + silu -> ``"swiglu"``, gelu (no GLU) ->
    ``"gelu"``; ``init_method_std``. Anything with no equivalent raises ``ValueError`` naming the field.
    """
    for name, default in _UNSUPPORTED_MOE.items():
        value = getattr(config, name, default)
        if value != default:
            raise ValueError(
                f"TransformerConfig.{name}={value!r} has no longmoe MoE equivalent; expected {default!r}"
            )
    if not config.num_moe_experts:
        raise ValueError(
            f"TransformerConfig.num_moe_experts={config.num_moe_experts!r}: expected >= 1 experts"
        )
    balance = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    if isinstance(balance, list):
        raise ValueError(f"TransformerConfig.moe_router_load_balancing_type={balance!r}: expected one type")
    if balance not in ("aux_loss", "none"):
        raise ValueError(
            f"TransformerConfig.moe_router_load_balancing_type={balance!r}: expected 'aux_loss' or 'none' "
            "(seq_aux_loss, global_aux_loss and sinkhorn have no longmoe equivalent)"
        )
    act, glu = config.activation_func, config.gated_linear_unit
    if glu and act is F.silu:
        activation = "swiglu"
    elif not glu and act is F.gelu:
        activation = "gelu"
    else:
        raise ValueError(
            f"TransformerConfig.activation_func={getattr(act, '__name__', act)!r} with gated_linear_unit={glu}: "
            "expected silu with gated_linear_unit=True (SwiGLU) or gelu without"
        )
    score = getattr(config, "moe_router_score_function", "softmax")
    pre_softmax = bool(getattr(config, "moe_router_pre_softmax", False))
    if score == "sigmoid" and pre_softmax:
        raise ValueError("TransformerConfig.moe_router_pre_softmax=True applies to softmax scores only")
    router_dtype = getattr(config, "moe_router_dtype", None)
    if router_dtype not in (None, "fp32"):
        raise ValueError(f"TransformerConfig.moe_router_dtype={router_dtype!r}: expected None or 'fp32'")
    bias_rate = None
    if getattr(config, "moe_router_enable_expert_bias", False):
        bias_rate = float(config.moe_router_bias_update_rate)
    shared = getattr(config, "moe_shared_expert_intermediate_size", None)
    return MoEConfig(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
        num_experts=config.num_moe_experts,
        top_k=config.moe_router_topk,
        score_function=score,
        router_dtype="float32" if router_dtype == "fp32" else "input",
        normalize_topk=not pre_softmax,
        capacity_factor=getattr(config, "moe_expert_capacity_factor", None),
        drop_policy=getattr(config, "moe_token_drop_policy", "probs"),
        aux_loss_coeff=float(config.moe_aux_loss_coeff or 0.0) if balance == "aux_loss" else 0.0,
        z_loss_coeff=float(getattr(config, "moe_z_loss_coeff", None) or 0.0),
        expert_bias_update_rate=bias_rate,
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(getattr(config, "moe_shared_expert_gate", False)) and shared is not None,
        activation=activation,
        expert_parallel_group=expert_parallel_group,
        init_method_std=config.init_method_std,
    )


# -------------------------------------------------------------------------------------------- attention
def _causal(attn_mask_type) -> bool:
    from megatron.core.transformer.enums import AttnMaskType  # noqa: PLC0415

    if attn_mask_type == AttnMaskType.causal:
        return True
    if attn_mask_type == AttnMaskType.no_mask:
        return False
    raise ValueError(
        f"attn_mask_type={attn_mask_type!r} is not supported by longmoe attention; expected "
        "AttnMaskType.causal or AttnMaskType.no_mask (bottom-right causal, padding and arbitrary masks are not)"
    )


def _check_attention(algorithm: str, sparse) -> None:
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"attention={algorithm!r}: expected one of {_ALGORITHMS}")
    if sparse is None:
        return
    if not isinstance(sparse, XAttentionConfig):
        raise TypeError(f"sparse={sparse!r}: expected a longmoe.attention.XAttentionConfig or None")
    if algorithm not in ("auto", "ulysses"):
        raise ValueError(
            f"attention={algorithm!r} with sparse: block-sparse attention across CP ranks runs under Ulysses only; "
            "expected 'auto' or 'ulysses'"
        )


def _core_attention_class():
    MegatronModule = _megatron()

    class SequenceParallelCoreAttention(MegatronModule):
        """Megatron ``core_attention`` backed by longmoe sequence-parallel attention over ``pg_collection.cp``.

        forward: query (s_local, b, heads_q, d), key/value (s_local, b, heads_kv, d) in Megatron's
        zigzag CP shards -> (s_local, b, heads_q * d). ``algorithm``: ``"auto"`` (the cost model's
        cheapest), ``"token_ring"``, ``"kv_ring"`` or ``"ulysses"``. With one CP rank it is plain
        :func:`longmoe.attention.flash_attention`. ``sparse`` (a :class:`~longmoe.attention.XAttentionConfig`)
        makes it XAttention block-sparse: Ulysses across CP ranks (``algorithm`` ``"auto"`` or ``"ulysses"``),
        plain :func:`~longmoe.attention.xattention` on one. Packed sequences (``packed_seq_params`` in the ``thd``
        format, one sample) map to ``cu_seqlens``; attention dropout, explicit masks and mask types other
        than causal / no-mask raise.
        """

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, *, algorithm="auto",
                     timeout_s=120.0, sparse=None):  # fmt: skip
            super().__init__(config=config)
            _check_attention(algorithm, sparse)
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            if dropout:
                raise ValueError(
                    f"attention_dropout={dropout}: longmoe attention has no dropout; expected 0.0"
                )
            if getattr(config, "window_size", None) is not None:
                raise ValueError(
                    f"TransformerConfig.window_size={config.window_size!r}: sliding windows are not supported"
                )
            if attention_type != "self":
                raise ValueError(f"attention_type={attention_type!r}: expected 'self'")
            self.causal = _causal(attn_mask_type)
            if pg_collection is None:
                from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: PLC0415

                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
            self.group = pg_collection.cp
            self.layer_number = layer_number
            self.attn_mask_type = attn_mask_type
            self.softmax_scale = softmax_scale
            self.algorithm = algorithm
            self.timeout_s = timeout_s
            self.sparse = sparse

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):  # fmt: skip
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported by longmoe attention; expected None")
            causal = self.causal if attn_mask_type is None else _causal(attn_mask_type)
            if attention_mask is not None and not causal:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} with a non-causal mask type: explicit "
                    "masks are not supported; expected None"
                )
            cu = None
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd" or query.shape[1] != 1:
                    raise ValueError(
                        f"packed_seq_params: qkv_format={packed_seq_params.qkv_format!r} with batch {query.shape[1]}; "
                        "expected 'thd' with one packed sample"
                    )
                cu = packed_seq_params.cu_seqlens_q
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # (b, s, h, d)
            world = 1 if self.group is None else dist.get_world_size(self.group)
            if world == 1:
                if cu is not None:
                    raise ValueError(
                        "packed_seq_params with one CP rank: use longmoe.attention.flash_attention per doc"
                    )
                if self.sparse is not None:
                    out = self.sparse(q, k, v, causal=causal, softmax_scale=self.softmax_scale)
                else:
                    out = flash_attention(q, k, v, causal=causal, softmax_scale=self.softmax_scale)
            else:
                out = sequence_parallel_attention(
                    q, k, v, group=self.group, causal=causal, softmax_scale=self.softmax_scale, layout="zigzag",
                    algorithm=self.algorithm, timeout_s=self.timeout_s, cu_seqlens=cu, sparse=self.sparse,
                )  # fmt: skip
            s, b = query.shape[0], query.shape[1]
            return out.transpose(0, 1).reshape(s, b, -1)

    return SequenceParallelCoreAttention


# -------------------------------------------------------------------------------------------------- MoE
def _moe_class():
    MegatronModule = _megatron()

    class LongmoeMoE(MegatronModule):
        """Megatron ``mlp`` submodule: a :class:`longmoe.moe.MoELayer` over the expert-parallel group.

        forward(hidden (s, b, hidden_size), padding_mask=None) -> (output (s, b, hidden_size), None).
        ``padding_mask`` (b, s) bool, True at padding, is not supported (raises) since longmoe routes
        every token. After forward, ``self.last_aux`` holds the layer's :class:`longmoe.moe.MoEAux`.
        """

        def __init__(self, config, pg_collection=None, **_unused):
            super().__init__(config=config)
            if pg_collection is None:
                from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: PLC0415

                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["ep", "expt_dp"])
            self.ep_group = pg_collection.ep
            self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
            ep = 1 if self.ep_group is None else dist.get_world_size(self.ep_group)
            cfg = moe_config_from(config, expert_parallel_group=self.ep_group if ep > 1 else None)
            device = None if config.use_cpu_initialization else torch.accelerator.current_accelerator()
            self.moe = MoELayer(cfg, device=device, dtype=config.params_dtype)
            for p in self.moe.experts.parameters():
                p.allreduce = False  # Megatron DDP: reduce over expert-DP only, never across experts
            self.last_aux = None

        def forward(self, hidden_states, padding_mask=None):
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: PLC0415

            if padding_mask is not None and bool(padding_mask.any()):
                raise ValueError(
                    "padding_mask with padded positions: longmoe MoE routes every token; expected none"
                )
            out, aux = self.moe(hidden_states)
            self.last_aux = aux
            if self.training and aux.loss.requires_grad:
                out = MoEAuxLossAutoScaler.apply(out, aux.loss)
            return out, None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """Expert rows as ShardedTensors over EP (axis 0 = global expert index), replicated over
            expert-DP; router and shared expert replicated over DP x CP."""
            from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: PLC0415
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: PLC0415

            ep_rank = 0 if self.ep_group is None else dist.get_rank(self.ep_group)
            ep_size = 1 if self.ep_group is None else dist.get_world_size(self.ep_group)
            edp_rank = 0 if self.expt_dp_group is None else dist.get_rank(self.expt_dp_group)
            state = self.moe.state_dict(prefix="", keep_vars=True)
            experts = {k: v for k, v in state.items() if k.startswith("experts.")}
            rest = {k: v for k, v in state.items() if not k.startswith("experts.")}
            out = make_sharded_tensors_for_checkpoint(rest, prefix + "moe.", sharded_offsets=sharded_offsets)
            axis = len(sharded_offsets)
            for name, t in experts.items():
                out[prefix + "moe." + name] = ShardedTensor.from_rank_offsets(
                    prefix + "moe." + name, t, *sharded_offsets, (axis, ep_rank, ep_size),
                    replica_id=(0, 0, edp_rank), prepend_axis_num=axis,
                )  # fmt: skip
            return out

    return LongmoeMoE


_CLASSES: dict[str, type] = {}


def __getattr__(name):
    if name in ("SequenceParallelCoreAttention", "LongmoeMoE"):
        if name not in _CLASSES:
            _CLASSES[name] = (
                _core_attention_class() if name == "SequenceParallelCoreAttention" else _moe_class()
            )
        return _CLASSES[name]
    raise AttributeError(f"module 'longmoe.megatron' has no attribute {name!r}")


def gpt_layer_spec(
    *,
    attention: str = "auto",
    moe: bool = True,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    timeout_s: float = 120.0,
    sparse: XAttentionConfig | None = None,
):
    """A megatron-core GPT transformer-layer ``ModuleSpec``: ``get_gpt_layer_local_spec`` with
    ``core_attention`` = :class:`SequenceParallelCoreAttention` (``attention``: ``"auto"``, ``"token_ring"``,
    ``"kv_ring"`` or ``"ulysses"``) and, with ``moe``, ``mlp`` = :class:`LongmoeMoE` (the config's
    ``num_moe_experts`` must be set). ``normalization``/``qk_layernorm`` as Megatron's spec. ``sparse`` (a
    :class:`~longmoe.attention.XAttentionConfig`): XAttention block-sparse core attention (Ulysses across CP
    ranks, so ``attention`` must be ``"auto"`` or ``"ulysses"``)."""
    _megatron()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: PLC0415
    from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: PLC0415

    _check_attention(attention, sparse)
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    sub = spec.submodules
    attn = sub.self_attention.submodules
    attn = dataclasses.replace(
        attn,
        core_attention=ModuleSpec(
            module=__getattr__("SequenceParallelCoreAttention"),
            params={"algorithm": attention, "timeout_s": timeout_s, "sparse": sparse},
        ),  # fmt: skip
    )
    self_attention = ModuleSpec(module=sub.self_attention.module, params=dict(sub.self_attention.params),
                                submodules=attn)  # fmt: skip
    changes = {"self_attention": self_attention}
    if moe:
        changes["mlp"] = ModuleSpec(module=__getattr__("LongmoeMoE"))
        # Megatron's key map folds pre_mlp_layernorm into the dense MLP's fused linear; our MLP is not that.
        changes["sharded_state_dict_keys_map"] = {
            k: v for k, v in sub.sharded_state_dict_keys_map.items() if not k.startswith("pre_mlp_layernorm")
        }
    return ModuleSpec(
        module=spec.module, params=dict(spec.params), submodules=dataclasses.replace(sub, **changes)
    )
