"""Parallelism as functions over a validated config and device meshes, for users without Megatron-core.

In torchtitan's style: a :class:`ParallelConfig` (validated, the same on every rank or an error naming the
field and the ranks), device meshes built from it (:func:`build_meshes`), and appliers that rewrite a model
in place, composed in this order::

    meshes = build_meshes(config)                       # collective
    apply_expert_parallel(model, meshes.experts, config) # each rank keeps its experts of the full weights
    apply_sequence_parallel(model, meshes.dense, config) # attention cores -> sequence-parallel attention
    tokens, positions = shard_batch(batch, meshes.dense, config)
    logits, aux_loss, _ = model(tokens, positions)
    ...backward...
    sync_gradients(model, meshes)                        # DP/SP all-reduce, expert grads over expert replicas

(:func:`parallelize` does the first three.) Topology: the world is ``dp x sp`` ranks, row-major, so a
sequence-parallel group is ``sp`` consecutive ranks; the expert-parallel groups are ``ep`` consecutive
ranks too, folded into the same world as Megatron-core folds EP into DP x CP. With world 4, SP 2 and EP 2
the EP groups equal the SP groups, and ranks {0, 2} hold the same experts (expert data-parallel replicas).

Models: :class:`longmoe.models.LlamaMoE` (its ``CoreAttention`` modules and ``MoELayer`` MLPs), and Hugging
Face models whose MoE blocks were replaced by longmoe's (:func:`longmoe.moe.hf.replace_hf_moe_blocks`), whose
attention is switched to the ``"longmoe_sequence_parallel"`` attention function (pass ``position_ids``
from :func:`shard_batch`; padding masks are not supported across shards).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from longmoe.attention import XAttentionConfig
from longmoe.attention.xattention import HEAD_SELECTIONS, SELECTIONS
from longmoe.moe import MoELayer
from longmoe.parallel import (
    ALGORITHM_CHOICES,
    LAYOUTS,
    SequenceParallelAttention,
    sequence_parallel_attention,
    shard_positions,
    shard_sequence,
)
from longmoe.runtime import check_same_across_ranks, group_device, world_and_rank

__all__ = [
    "ParallelConfig",
    "ParallelMeshes",
    "build_meshes",
    "apply_sequence_parallel",
    "apply_expert_parallel",
    "parallelize",
    "shard_batch",
    "sync_gradients",
    "full_state_dict",
    "HF_SEQUENCE_PARALLEL",
]

HF_SEQUENCE_PARALLEL = "longmoe_sequence_parallel"
"""The Hugging Face ``attn_implementation`` name :func:`apply_sequence_parallel` switches HF models to."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How a model is split over the ranks of the job."""

    sequence_parallel_size: int = 1
    """Ranks that share one sequence (SP / context parallelism); divides the world size."""
    expert_parallel_size: int = 1
    """Ranks that share one MoE layer's experts (EP); divides the world size and every layer's num_experts."""
    algorithm: str = "auto"
    """Sequence-parallel attention: one of ``longmoe.parallel.ALGORITHM_CHOICES``."""
    layout: str = "zigzag"
    """How sequences are sharded: ``"zigzag"`` (balanced causal work) or ``"contiguous"``."""
    timeout_s: float = 120.0
    """Bound on every wait of the sequence-parallel attention and of the setup checks."""
    sparse: XAttentionConfig | None = None
    """XAttention block-sparse attention (:class:`~longmoe.attention.XAttentionConfig`) in every attention
    layer: whole sequences per rank under Ulysses (``algorithm`` ``"auto"`` or ``"ulysses"``), plain
    :func:`~longmoe.attention.xattention` with ``sequence_parallel_size=1``. None: dense attention."""

    def __post_init__(self):
        for name in ("sequence_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name}={value!r}: expected an int >= 1")
        if self.algorithm not in ALGORITHM_CHOICES:
            raise ValueError(
                f"ParallelConfig.algorithm={self.algorithm!r}: expected one of {ALGORITHM_CHOICES}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"ParallelConfig.layout={self.layout!r}: expected one of {LAYOUTS}")
        if not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s={self.timeout_s!r}: expected seconds > 0")
        if self.sparse is not None:
            if not isinstance(self.sparse, XAttentionConfig):
                raise TypeError(
                    f"ParallelConfig.sparse={self.sparse!r}: expected a longmoe.attention.XAttentionConfig or None"
                )
            if self.algorithm not in ("auto", "ulysses"):
                raise ValueError(
                    f"ParallelConfig.algorithm={self.algorithm!r} with sparse: block-sparse attention across "
                    "sequence shards runs under Ulysses only; expected 'auto' or 'ulysses'"
                )

    def data_parallel_size(self, world_size: int) -> int:
        """``world_size / sequence_parallel_size``, after checking that both sizes divide the world."""
        for name in ("sequence_parallel_size", "expert_parallel_size"):
            if world_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} does not divide world_size={world_size}")
        return world_size // self.sequence_parallel_size


@dataclass(slots=True)
class ParallelMeshes:
    """``dense``: ranks as (dp, sp), row-major; ``experts``: the same ranks as (expert_dp, ep). None in one
    process. ``world``, ``dp``: sizes."""

    dense: object | None
    experts: object | None
    world: int
    dp: int


def build_meshes(config: ParallelConfig) -> ParallelMeshes:
    """The device meshes of ``config`` over the default group (collective: every rank calls it once).

    First one bounded all-gather checks that every rank passed the same config: a difference raises on
    every rank, naming the field and the ranks, instead of hanging in a mismatched collective.
    """
    world, _ = world_and_rank(None)
    dp = config.data_parallel_size(world)
    if world == 1:
        return ParallelMeshes(None, None, 1, 1)
    fields = dict(sequence_parallel_size=config.sequence_parallel_size,
                  expert_parallel_size=config.expert_parallel_size,
                  algorithm=ALGORITHM_CHOICES.index(config.algorithm), layout=LAYOUTS.index(config.layout),
                  **_sparse_fields(config.sparse))  # fmt: skip
    names = dict(algorithm=ALGORITHM_CHOICES, layout=LAYOUTS, sparse_selection=SELECTIONS,
                 sparse_head_selection=HEAD_SELECTIONS)  # fmt: skip
    check_same_across_ranks(fields, None, what="ParallelConfig", timeout_s=config.timeout_s,
                            describe=lambda n, v: repr(names[n][v]) if n in names else v)  # fmt: skip
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415  (only with a process group)

    device_type = group_device(None).type
    ranks = torch.arange(world)
    dense = DeviceMesh(
        device_type, ranks.view(dp, config.sequence_parallel_size), mesh_dim_names=("dp", "sp")
    )
    ep = config.expert_parallel_size
    experts = DeviceMesh(device_type, ranks.view(world // ep, ep), mesh_dim_names=("expert_dp", "ep"))
    return ParallelMeshes(dense, experts, world, dp)


def _sparse_fields(sparse: XAttentionConfig | None) -> dict[str, int]:
    """``ParallelConfig.sparse`` as ints for the cross-rank check (thresholds and sharpness as CRCs of their fp64
    bytes)."""
    if sparse is None:
        return dict(sparse=0)
    tau = torch.as_tensor(sparse.threshold, dtype=torch.float64).flatten()
    sharp = torch.tensor([sparse.sharpness], dtype=torch.float64)
    return dict(sparse=1, sparse_threshold_crc=zlib.crc32(tau.numpy().tobytes()), sparse_stride=sparse.stride,
                sparse_block_size=sparse.block_size, sparse_selection=SELECTIONS.index(sparse.selection),
                sparse_head_selection=HEAD_SELECTIONS.index(sparse.head_selection),
                sparse_sharpness_crc=zlib.crc32(sharp.numpy().tobytes()))  # fmt: skip


def _group(mesh, dim: str):
    return None if mesh is None else mesh.get_group(dim)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def apply_expert_parallel(model: nn.Module, mesh, config: ParallelConfig) -> nn.Module:
    """Shard every :class:`~longmoe.moe.MoELayer` of ``model`` over ``mesh["ep"]``: each rank keeps its
    ``num_experts / ep`` experts of the layer's current (full) weights; routers, shared experts and
    everything else stay replicated. In place; returns ``model``. No-op with ``expert_parallel_size=1``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoELayer)}
    if config.expert_parallel_size == 1 or mesh is None:
        return model
    if not layers:
        raise ValueError(
            "apply_expert_parallel: the model has no longmoe MoELayer (replace HF MoE blocks first)"
        )
    group = _group(mesh, "ep")
    for name, layer in layers.items():
        cfg = layer.config
        if cfg.num_experts % config.expert_parallel_size:
            raise ValueError(
                f"{name}: num_experts={cfg.num_experts} is not divisible by expert_parallel_size="
                f"{config.expert_parallel_size}"
            )
        weight = layer.router.weight
        sharded = MoELayer(
            _replace(cfg, expert_parallel_group=group), device=weight.device, dtype=weight.dtype,
            backend=layer.backend,
        )  # fmt: skip
        sharded.load_state_dict(layer.state_dict())  # a full state dict: this rank's expert rows are kept
        parent, attr = _parent(model, name)
        setattr(parent, attr, sharded)
    return model


def _replace(cfg, **changes):
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(cfg, **changes)


def apply_sequence_parallel(model: nn.Module, mesh, config: ParallelConfig, *, stats=None) -> nn.Module:
    """Make ``model``'s attention sequence-parallel over ``mesh["sp"]``. In place; returns ``model``.

    :class:`longmoe.models.CoreAttention` modules become causal
    :class:`~longmoe.parallel.SequenceParallelAttention`; a Hugging Face model is switched to the
    ``"longmoe_sequence_parallel"`` attention function. The model must then be fed sequence shards and
    their global positions (:func:`shard_batch`). ``stats`` (a :class:`longmoe.runtime.CommStats`) collects
    the bytes the attention of every layer moves. With ``config.sparse`` every attention becomes XAttention
    (under Ulysses across shards); otherwise a no-op with ``sequence_parallel_size=1``.
    """
    from longmoe.models import CoreAttention  # noqa: PLC0415

    if config.sequence_parallel_size == 1 or mesh is None:
        if config.sparse is not None:
            _apply_local_sparse(model, config.sparse, CoreAttention)
        return model

    group = _group(mesh, "sp")
    cores = [n for n, m in model.named_modules() if isinstance(m, CoreAttention)]
    for name in cores:
        parent, attr = _parent(model, name)
        setattr(parent, attr, SequenceParallelAttention(group=group, causal=True, layout=config.layout,
                                                        algorithm=config.algorithm, timeout_s=config.timeout_s,
                                                        stats=stats, sparse=config.sparse))  # fmt: skip
    if cores:
        return model
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "_attn_implementation"):
        raise ValueError(
            f"apply_sequence_parallel: {type(model).__name__} has neither longmoe CoreAttention modules nor a "
            "Hugging Face attention implementation to switch"
        )
    _register_hf()
    for m in model.modules():
        if hasattr(m, "num_key_value_groups"):  # HF attention modules
            m.longmoe_sequence_parallel = dict(group=group, algorithm=config.algorithm, layout=config.layout,
                                               timeout_s=config.timeout_s, stats=stats, sparse=config.sparse)  # fmt: skip
    model.set_attn_implementation(HF_SEQUENCE_PARALLEL)
    return model


def _apply_local_sparse(model: nn.Module, sparse: XAttentionConfig, core_cls) -> None:
    """Whole sequences on this rank: XAttention in every :class:`~longmoe.models.CoreAttention`, or a Hugging
    Face model switched to the ``"longmoe_xattention"`` attention function with ``sparse``'s settings."""
    cores = [m for m in model.modules() if isinstance(m, core_cls)]
    for m in cores:
        m.sparse = sparse
    if cores:
        return
    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise ValueError(
            f"apply_sequence_parallel: {type(model).__name__} has neither longmoe CoreAttention modules nor a "
            "Hugging Face attention implementation to switch"
        )
    from longmoe.attention.hf import register_hf_attention, set_xattention_thresholds  # noqa: PLC0415

    register_hf_attention()
    set_xattention_thresholds(model, sparse.threshold, stride=sparse.stride, block_size=sparse.block_size,
                              selection=sparse.selection, head_selection=sparse.head_selection,
                              sharpness=sparse.sharpness)  # fmt: skip
    model.set_attn_implementation("longmoe_xattention")


def _hf_sequence_parallel_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function over sequence shards: query (batch, heads_q, seqlen_local, head_dim),
    key/value (batch, heads_kv, seqlen_local, head_dim) -> ((batch, seqlen_local, heads_q, head_dim), None)."""
    if dropout and module.training:
        raise NotImplementedError(
            f"{HF_SEQUENCE_PARALLEL}: attention dropout is not supported; got {dropout}"
        )
    settings = getattr(module, "longmoe_sequence_parallel", None)
    if settings is None:
        raise RuntimeError(
            f"{HF_SEQUENCE_PARALLEL}: call longmoe.parallelize.apply_sequence_parallel on the model"
        )
    causal = kw.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    out = sequence_parallel_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal, softmax_scale=scaling,
        **settings,
    )  # fmt: skip
    return out, None


def _no_mask(*args, **kwargs):
    """Mask builder for the sequence-parallel attention: causality is handled across shards by the
    attention itself, so no (local, wrong) mask is built."""
    return None


def _register_hf() -> None:
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(HF_SEQUENCE_PARALLEL, _hf_sequence_parallel_forward)
    AttentionMaskInterface.register(HF_SEQUENCE_PARALLEL, _no_mask)


def parallelize(model: nn.Module, config: ParallelConfig, *, stats=None) -> ParallelMeshes:
    """Build the meshes and apply expert then sequence parallelism to ``model`` (in place); return the meshes."""
    meshes = build_meshes(config)
    apply_expert_parallel(model, meshes.experts, config)
    apply_sequence_parallel(model, meshes.dense, config, stats=stats)
    return meshes


def shard_batch(tokens: torch.Tensor, mesh, config: ParallelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a global batch: its data-parallel rows, then its sequence shard.

    tokens: (global_batch, seqlen), the same on every rank; global_batch divisible by the data-parallel
    size, seqlen by ``2 * sequence_parallel_size`` (zigzag) or ``sequence_parallel_size``. Returns
    ``(tokens (global_batch / dp, seqlen / sp), positions (seqlen / sp,) int64)`` (the global positions for
    RoPE). Works for any (batch, seqlen, ...) tensor, e.g. the targets.
    """
    if mesh is None:
        return tokens, torch.arange(tokens.shape[1], device=tokens.device)
    dp, sp = mesh.size(0), mesh.size(1)
    dp_rank, sp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    if tokens.shape[0] % dp:
        raise ValueError(f"global batch {tokens.shape[0]} is not divisible by the data-parallel size {dp}")
    rows = tokens.shape[0] // dp
    mine = tokens[dp_rank * rows : (dp_rank + 1) * rows]
    local = shard_sequence(mine, None, config.layout, rank=sp_rank, world_size=sp)
    positions = shard_positions(tokens.shape[1], sp_rank, sp, config.layout, device=tokens.device)
    return local, positions


@torch.no_grad()
def sync_gradients(model: nn.Module, meshes: ParallelMeshes) -> None:
    """All-reduce gradients as data parallelism needs, after ``backward``.

    The loss of every rank must be its *local* sum divided by the token count of its whole sequence
    (so the SP ranks' losses add up to the sequence's) and the DP replicas are averaged: replicated
    parameters are summed over every rank and divided by ``dp``; expert parameters, which exist once per
    expert-parallel group, are summed over their replicas (``mesh["expert_dp"]``) and divided by ``dp``.
    """
    if meshes.world == 1:
        return
    expert_group = meshes.experts.get_group("expert_dp") if meshes.experts is not None else None
    sharded = {id(p) for m in model.modules() if isinstance(m, MoELayer) and m.dispatcher is not None
               for p in m.experts.parameters()}  # fmt: skip
    for p in model.parameters():
        if p.grad is None:
            continue
        dist.all_reduce(p.grad, group=expert_group if id(p) in sharded else None)
        p.grad.div_(meshes.dp)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective over each expert-parallel group): expert rows of every MoE layer
    all-gathered, so that one process can load it (``model.load_state_dict`` of an unsharded model, or of a
    sharded one, which keeps its own rows)."""
    sd = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, MoELayer) and layer.dispatcher is not None:
            for key, value in layer.full_state_dict().items():
                sd[f"{name}.{key}"] = value
    return sd
