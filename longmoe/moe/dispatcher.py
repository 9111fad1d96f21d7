"""Expert-parallel token exchange: ``all_to_all_single`` with variable split sizes, and its inverse.

Experts are sharded contiguously: rank ``r`` of the expert-parallel group holds global experts
``[r * L, (r + 1) * L)`` with ``L = num_experts / ep_size``. After the local permute, the rows of a rank's
tokens are sorted by global expert, so the rows bound for rank ``r`` are one contiguous block. Then:

1. ``all_to_all_single`` of the per-expert counts ``(ep, L)`` tells every rank how many rows it receives from
   each source for each of its local experts;
2. ``all_to_all_single`` of the rows with those split sizes (a rank may send or receive 0 rows; NCCL on CUDA,
   gloo on CPU: the process group's backend decides, nothing here names a device);
3. the received rows arrive grouped by (source rank, local expert); a stable sort by local expert
   (the same dispatch-map kernel, ``top_k = 1``) makes every local expert's rows contiguous.

``combine`` inverts 3 then 2. Both exchanges use the one autograd all-to-all of ``longmoe.runtime``
(:func:`longmoe.runtime.all_to_all`, shared with Ulysses), whose backward is the reverse exchange,
so every rank takes part in the backward collectives even when it holds no rows. Collectives block at most
for the process group's timeout (``init_from_env(timeout_s=...)``, ``spawn(timeout_s=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longmoe.moe.permute import DispatchMap, moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.runtime.collectives import all_to_all

__all__ = ["all_to_all", "AllToAllDispatcher", "DispatchState"]


@dataclass(slots=True)
class DispatchState:
    """What :meth:`AllToAllDispatcher.combine` needs to invert a dispatch.

    input_splits / output_splits: rows sent to / received from each rank. regroup: dispatch map of the
    stable sort of received rows by local expert (None when the received order is already expert-major).
    """

    input_splits: list[int]
    output_splits: list[int]
    regroup: DispatchMap | None


class AllToAllDispatcher:
    """Sends expert-sorted rows to the ranks holding their experts and brings the results back.

    Args:
        num_experts: global number of experts (divisible by the group size).
        group: the expert-parallel process group.
        backend: kernel backend for the regrouping permute (None: by device).
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup, *, backend: str | None = None):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.backend = backend
        self.bytes_sent = 0
        """Bytes this rank sent to other ranks (token rows and expert outputs; forward), for logs."""

    def exchange_counts(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """tokens_per_expert: (num_experts,) int64 rows this rank routes to each global expert.
        Returns (ep_size, num_local_experts) int64: rows each source rank sends to each local expert."""
        send = tokens_per_expert.reshape(self.ep_size, self.num_local_experts).contiguous()
        return all_to_all(send, group=self.group, what="MoE per-expert counts")

    def dispatch(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """x: (num_rows, hidden) sorted by global expert; tokens_per_expert: (num_experts,) int64.

        Returns ``(rows, local_tokens_per_expert, state)``: rows (num_received, hidden) sorted by local expert,
        local_tokens_per_expert (num_local_experts,) int64, and the state for :meth:`combine`.
        """
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must be (num_experts={self.num_experts},); got {tuple(tokens_per_expert.shape)}"
            )
        recv = self.exchange_counts(tokens_per_expert)
        input_splits = tokens_per_expert.reshape(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv_host = recv.cpu()
        output_splits = recv_host.sum(1).tolist()
        rows = all_to_all(x, output_splits, input_splits, self.group, what="MoE token rows")
        self.bytes_sent += (
            (sum(input_splits) - input_splits[self.rank]) * math.prod(x.shape[1:]) * x.element_size()
        )
        regroup = None
        if self.num_local_experts > 1 and self.ep_size > 1:
            local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
            ids = torch.repeat_interleave(local_ids, recv.reshape(-1), output_size=rows.shape[0])
            regroup = moe_dispatch_map(ids[:, None], self.num_local_experts, backend=self.backend)
            rows = moe_permute(rows, regroup, backend=self.backend)
        local_counts = recv.sum(0)
        return rows, local_counts, DispatchState(input_splits, output_splits, regroup)

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y: (num_received, hidden) expert outputs in :meth:`dispatch`'s row order.
        Returns (num_rows, hidden) in the order of dispatch's input ``x``."""
        if state.regroup is not None:
            y = moe_unpermute(y, state.regroup, backend=self.backend)  # exact inverse (unit weights, top_k=1)
        off_rank = sum(state.output_splits) - state.output_splits[self.rank]
        self.bytes_sent += off_rank * math.prod(y.shape[1:]) * y.element_size()
        return all_to_all(y, state.input_splits, state.output_splits, self.group, what="MoE expert outputs")
