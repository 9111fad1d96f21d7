"""Expert-parallel token exchange: ``all_to_all_single`` with variable split sizes, and its inverse.

Experts are sharded contiguously: rank ``r`` of the expert-parallel group holds global experts
``[r * L, (r + 1) * L)`` with ``L = num_experts / ep_size``. After the local permute, the rows of a rank's
tokens are sorted by global expert, so the rows bound for rank ``r`` are one contiguous block. Then:

1. ``all_to_all_single`` of the per-expert counts ``(ep, L)`` tells every rank how many rows it receives from
   each source for each of its local experts;
2. ``all_to_all_single`` of the rows with those split sizes (a rank may send or receive 0 rows; NCCL on CUDA,
   gloo on CPU: the process group's backend decides, nothing here names a device);
3. the received rows arrive grouped by (source rank, local expert); a stable sort by local expert
   (the same dispatch-map kernel, ``topk = 1``) makes every local expert's rows contiguous.

``combine`` inverts 3 then 2. Both exchanges are autograd functions whose backward is the reverse exchange,
so every rank takes part in the backward collectives even when it holds no rows. Collectives block at most
for the process group's timeout (``init_from_env(timeout_s=...)``, ``spawn(timeout_s=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longmoe.moe.permute import DispatchMap, moe_dispatch_map, moe_permute, moe_unpermute

__all__ = ["all_to_all", "AllToAllFunction", "AllToAllDispatcher", "DispatchState"]


def _all_to_all_single(out, x, output_splits, input_splits, group, what: str) -> None:
    """``dist.all_to_all_single`` whose failures (timeouts, dead peers) name the rank, the group and the traffic."""
    try:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    except RuntimeError as err:  # gloo/NCCL timeouts and peer failures (DistBackendError is a RuntimeError)
        g = dist.group.WORLD if group is None else group
        raise RuntimeError(
            f"MoE all_to_all_single ({what}) failed on rank {dist.get_rank(g)} of the expert-parallel group "
            f"(size {dist.get_world_size(g)}, global ranks {dist.get_process_group_ranks(g)}): sending "
            f"{input_splits or 'equal splits of'} {tuple(x.shape)}, expecting {output_splits or tuple(out.shape)}; "
            f"a peer that never joins the exchange fails it after the group's timeout. Cause: {err}"
        ) from err


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    _all_to_all_single(out, x, output_splits, input_splits, group, "token rows")
    return out


class AllToAllFunction(torch.autograd.Function):
    """Rows ``x[sum(input_splits[:r]) : ...]`` go to rank r; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, dout):
        output_splits, input_splits = ctx.splits
        return _exchange(dout, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Variable-size all-to-all of rows, with autograd.

    x: (sum(input_splits), *rest); ``input_splits[r]`` rows go to rank r of ``group``, ``output_splits[r]``
    rows come from it. Returns (sum(output_splits), *rest), blocks sorted by source rank.
    """
    if len(output_splits) != len(input_splits):
        raise ValueError(
            f"output_splits has {len(output_splits)} entries but input_splits has {len(input_splits)}"
        )
    if sum(input_splits) != x.shape[0]:
        raise ValueError(
            f"input_splits={input_splits} sums to {sum(input_splits)}; expected x rows {x.shape[0]}"
        )
    return AllToAllFunction.apply(x, list(output_splits), list(input_splits), group)


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

    def exchange_counts(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """tokens_per_expert: (num_experts,) int64 rows this rank routes to each global expert.
        Returns (ep_size, num_local_experts) int64: rows each source rank sends to each local expert."""
        send = tokens_per_expert.reshape(self.ep_size, self.num_local_experts).contiguous()
        recv = torch.empty_like(send)
        _all_to_all_single(recv, send, None, None, self.group, "per-expert counts")
        return recv

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
        rows = all_to_all(x, output_splits, input_splits, self.group)
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
            y = moe_unpermute(y, state.regroup, backend=self.backend)  # exact inverse (unit weights, topk=1)
        return all_to_all(y, state.input_splits, state.output_splits, self.group)
