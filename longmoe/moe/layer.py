"""``MoELayer``: router -> permute -> (all-to-all) -> grouped experts -> (all-to-all back) -> unpermute.

Data through one forward, for ``T`` local tokens, ``E`` experts, ``k`` experts per token:

1. the router computes fp32 scores, the top-k gating weights ``probs (T, k)`` and experts ``(T, k)``, applies
   capacity (dropped slots get expert -1), and the auxiliary losses;
2. :func:`~longmoe.moe.permute.moe_dispatch_map` sorts the ``T * k`` slots by expert and
   :func:`~longmoe.moe.permute.moe_permute` gathers the token rows into that order;
3. with expert parallelism, :class:`~longmoe.moe.dispatcher.AllToAllDispatcher` sends every row to the rank
   holding its expert (and regroups received rows by local expert); with ``dispatch_chunks > 1`` the rows
   are sorted (chunk, rank, expert) and each chunk's exchange overlaps the previous chunk's experts;
4. :class:`~longmoe.moe.experts.GroupedExperts` runs all local experts in one grouped pass;
5. the inverse exchange, then :func:`~longmoe.moe.permute.moe_unpermute` puts rows back in token order and
   sums each token's ``k`` expert outputs weighted by ``probs`` (fp32 accumulation);
6. an optional shared expert (optionally sigmoid-gated) is added.

Dropped slots contribute 0; a token with every slot dropped comes out as 0, which the residual connection
around the layer turns into "passes through unchanged". Drops are counted in :attr:`MoEAux.dropped_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from longmoe.moe.config import MoEConfig
from longmoe.moe.dispatcher import AllToAllDispatcher
from longmoe.moe.experts import GroupedExperts, SharedExpertMLP
from longmoe.moe.permute import moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.moe.router import TopKRouter, router_entropy

__all__ = ["MoEAux", "MoELayer"]


@dataclass(slots=True)
class MoEAux:
    """Auxiliary outputs of one :class:`MoELayer` forward (this rank's tokens).

    loss: () ``aux_loss_coeff * load_balancing_loss + z_loss_coeff * z_loss``: add it to the training loss.
    load_balancing_loss: () unweighted Switch/GShard loss (1 at perfect balance).
    z_loss: () unweighted router z-loss, or None when ``z_loss_coeff`` is 0 (not computed).
    tokens_per_expert: (num_experts,) int64 slots each expert processed (after capacity).
    routed_tokens_per_expert: (num_experts,) int64 slots routed to each expert before capacity.
    dropped_tokens: () int64 slots dropped by capacity.
    router_entropy: () mean entropy (nats) of the tokens' score distributions (no gradient).
    num_tokens: tokens in this forward.

    The ``*_tokens*`` counters count routed *slots* (one per token and routing choice, ``num_tokens *
    top_k`` in all), as Megatron-core's ``tokens_per_expert`` does: a token routed to two experts counts once
    for each, and a dropped slot is one choice of a token, not the whole token.
    """

    loss: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor | None
    tokens_per_expert: torch.Tensor
    routed_tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    router_entropy: torch.Tensor
    num_tokens: int


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP block.

    Args:
        config: the :class:`~longmoe.moe.MoEConfig`. With ``expert_parallel_group`` set, this rank holds only its
            ``num_experts / ep_size`` experts; every rank of the group must call forward (and backward) together.
        device, dtype: of the parameters (router scores are still computed in fp32).
        backend: force the dispatch kernels' backend (``"native"``, ``"triton"``, ``"reference"``); default by
            device, see :mod:`longmoe.runtime.backend`.

    ``forward(hidden_states)`` takes ``(..., hidden_size)`` and returns ``(output, aux)``: output of the same
    shape and dtype, aux a :class:`MoEAux`.

    State dict keys are the same with and without expert parallelism: ``router.weight (E, H)``,
    ``router.expert_bias (E,)`` (aux-loss-free balancing only), ``experts.linear_fc1 (E_local, fc1_rows, H)``,
    ``experts.linear_fc2 (E_local, H, ffn)``, ``shared_expert.linear_fc{1,2}.weight``, ``shared_expert_gate.weight``.
    An expert-parallel layer saves its own rows and loads either its own rows or a full checkpoint;
    :meth:`full_state_dict` gathers a full one.
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None, backend: str | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer(config={type(config).__name__}): expected a longmoe.moe.MoEConfig")
        self.config = config
        self.backend = backend
        self.router = TopKRouter(config, device=device, dtype=dtype)
        self.experts = GroupedExperts(config, device=device, dtype=dtype)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_ffn_hidden_size is not None:
            self.shared_expert = SharedExpertMLP(
                config, config.shared_expert_ffn_hidden_size, device=device, dtype=dtype
            )
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(
                    config.hidden_size, 1, bias=False, device=device, dtype=dtype
                )
                nn.init.normal_(self.shared_expert_gate.weight, std=config.init_method_std)
        self.dispatcher = None
        if config.expert_parallel_size > 1:
            self.dispatcher = AllToAllDispatcher(
                config.num_experts, config.expert_parallel_group, backend=backend
            )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """hidden_states: (..., hidden_size) -> (output (..., hidden_size), :class:`MoEAux`)."""
        cfg = self.config
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            got = (
                hidden_states.dtype
                if isinstance(hidden_states, torch.Tensor)
                else type(hidden_states).__name__
            )
            raise TypeError(f"hidden_states must be a floating tensor; got {got}")
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"hidden_states last dim={hidden_states.shape[-1] if hidden_states.dim() else None} "
                f"(shape {tuple(hidden_states.shape)}) does not match MoEConfig.hidden_size={cfg.hidden_size}"
            )
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, cfg.hidden_size)

        route = self.router(x)
        chunks = cfg.dispatch_chunks if self.dispatcher is not None else 1
        if chunks > 1:  # rows in (chunk, destination rank, local expert) order: one block per chunk
            pos = self.dispatcher.chunk_order(chunks).to(route.expert_ids.device)
            ids = route.expert_ids
            dmap = moe_dispatch_map(torch.where(ids >= 0, pos[ids.clamp(min=0).long()], -1), cfg.num_experts,
                                    backend=self.backend)  # fmt: skip
            tokens_per_expert = dmap.tokens_per_expert[pos]  # back to global expert order
        else:
            dmap = moe_dispatch_map(route.expert_ids, cfg.num_experts, backend=self.backend)
            tokens_per_expert = dmap.tokens_per_expert
        if self.dispatcher is None and self.experts.gathers(x, self.backend):
            out = self.experts.forward_tokens(x, dmap, route.probs)  # no permuted copy of x (CPU)
        else:
            rows = moe_permute(x, dmap, backend=self.backend)
            if self.dispatcher is None:
                y = self.experts(rows, dmap.tokens_per_expert)
            elif chunks > 1:
                y = self.dispatcher.run_chunked(rows, tokens_per_expert, self.experts, chunks)
            else:
                local_rows, local_counts, state = self.dispatcher.dispatch(rows, dmap.tokens_per_expert)
                y = self.dispatcher.combine(self.experts(local_rows, local_counts), state)
            out = moe_unpermute(y.to(x.dtype), dmap, route.probs, backend=self.backend)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared

        with torch.no_grad():
            entropy = router_entropy(route.scores.detach())
            dropped = route.routed_tokens_per_expert.sum() - dmap.tokens_per_expert.sum()
        loss = cfg.aux_loss_coeff * route.load_balancing_loss
        if route.z_loss is not None:
            loss = loss + cfg.z_loss_coeff * route.z_loss
        aux = MoEAux(
            loss=loss,
            load_balancing_loss=route.load_balancing_loss,
            z_loss=route.z_loss,
            tokens_per_expert=tokens_per_expert,
            routed_tokens_per_expert=route.routed_tokens_per_expert,
            dropped_tokens=dropped,
            router_entropy=entropy,
            num_tokens=x.shape[0],
        )
        return out.view(shape), aux

    def update_expert_bias(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step (call after the optimizer step); see
        :meth:`~longmoe.moe.router.TopKRouter.update_expert_bias`. Returns the all-reduced load (num_experts,)."""
        return self.router.update_expert_bias(group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the unsharded layer: expert rows all-gathered over the expert-parallel group
        (collective: every rank of the group must call it). Without expert parallelism, ``state_dict()``."""
        sd = self.state_dict()
        if self.dispatcher is None:
            return sd
        group, ep = self.config.expert_parallel_group, self.config.expert_parallel_size
        for name in ("experts.linear_fc1", "experts.linear_fc2"):
            local = sd[name].contiguous()
            parts = [torch.empty_like(local) for _ in range(ep)]
            dist.all_gather(parts, local, group=group)
            sd[name] = torch.cat(parts)
        return sd

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden_size}, experts={c.num_experts}, top_k={c.top_k}, score={c.score_function}, "
            f"capacity_factor={c.capacity_factor}, ep_size={c.expert_parallel_size}"
        )
