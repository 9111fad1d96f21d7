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

**Chunked dispatch** (:meth:`AllToAllDispatcher.run_chunked`, ``MoEConfig.dispatch_chunks = C``): the local
experts are split into ``C`` contiguous ranges, and the layer permutes rows in (chunk, destination rank,
expert) order (:meth:`AllToAllDispatcher.chunk_order`), so each chunk's rows for every rank are one block.
The counts travel once; then every chunk's rows leave in its own asynchronous all-to-all, all posted at
once; chunk ``c``'s experts run as soon as its rows have arrived, and its outputs leave asynchronously while
chunk ``c + 1`` computes. The backward runs each chunk's exchanges synchronously (the reverse all-to-all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longmoe.moe.permute import DispatchMap, moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.runtime.collectives import CollectiveError, all_to_all
from longmoe.runtime.distributed import world_and_rank

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


class _AsyncAllToAll(torch.autograd.Function):
    """Forward: post ``all_to_all_single`` and return its (not yet filled) output; the caller waits on the
    work appended to ``works`` before reading it. Backward: the reverse exchange, synchronously."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, what, works):
        ctx.splits, ctx.group, ctx.what = (output_splits, input_splits), group, what
        x = x.contiguous()
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        works.append(
            (dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=True), x)
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        output_splits, input_splits = ctx.splits
        return all_to_all(dout, input_splits, output_splits, ctx.group, what=f"{ctx.what}, backward"), *[
            None
        ] * 5


def _wait(works: list, group, what: str) -> None:
    work, _ = works.pop(0)
    try:
        work.wait()
    except RuntimeError as err:
        world, rank = world_and_rank(group)
        raise CollectiveError(
            f"all_to_all ({what}) failed on rank {rank} of the expert-parallel group (size {world}, global ranks "
            f"{dist.get_process_group_ranks(group)}); a peer that never joins fails it after the group's "
            f"timeout. Cause: {err}"
        ) from err


def _chunk_bounds(num_local: int, chunks: int) -> list[int]:
    """Local-expert boundaries of ``chunks`` near-equal contiguous ranges: chunk c is [b[c], b[c + 1])."""
    return [c * num_local // chunks for c in range(chunks + 1)]


def _chunk_order(num_experts: int, ep_size: int, chunks: int) -> torch.Tensor:
    """(num_experts,) int64: the position of global expert e in (chunk, rank, local expert) order."""
    local = num_experts // ep_size
    b = _chunk_bounds(local, chunks)
    order = [r * local + le for c in range(chunks) for r in range(ep_size) for le in range(b[c], b[c + 1])]
    pos = torch.empty(num_experts, dtype=torch.int64)
    pos[torch.tensor(order, dtype=torch.int64)] = torch.arange(num_experts)
    return pos


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
        rows, regroup = self._regroup(rows, recv)
        local_counts = recv.sum(0)
        return rows, local_counts, DispatchState(input_splits, output_splits, regroup)

    def _regroup(self, rows: torch.Tensor, recv: torch.Tensor) -> tuple[torch.Tensor, DispatchMap | None]:
        """rows received in (source rank, local expert) order, ``recv[src, e]`` of each; returns them in
        (local expert, source) order and the map that undoes it (None when one expert or one rank: already
        expert-major)."""
        experts = recv.shape[1]
        if experts == 1 or self.ep_size == 1:
            return rows, None
        local_ids = torch.arange(experts, device=rows.device).repeat(self.ep_size)
        ids = torch.repeat_interleave(local_ids, recv.reshape(-1).to(rows.device), output_size=rows.shape[0])
        regroup = moe_dispatch_map(ids[:, None], experts, backend=self.backend)
        return moe_permute(rows, regroup, backend=self.backend), regroup

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y: (num_received, hidden) expert outputs in :meth:`dispatch`'s row order.
        Returns (num_rows, hidden) in the order of dispatch's input ``x``."""
        if state.regroup is not None:
            y = moe_unpermute(y, state.regroup, backend=self.backend)  # exact inverse (unit weights, top_k=1)
        off_rank = sum(state.output_splits) - state.output_splits[self.rank]
        self.bytes_sent += off_rank * math.prod(y.shape[1:]) * y.element_size()
        return all_to_all(y, state.input_splits, state.output_splits, self.group, what="MoE expert outputs")

    def chunk_order(self, chunks: int) -> torch.Tensor:
        """(num_experts,) int64 ``pos``: sort rows by ``pos[expert]`` (chunk, destination rank, local expert)
        for :meth:`run_chunked`. ``chunks`` = 1 is the identity."""
        return _chunk_order(self.num_experts, self.ep_size, chunks)

    def run_chunked(self, x: torch.Tensor, counts: torch.Tensor, experts, chunks: int) -> torch.Tensor:
        """Expert-parallel pass in ``chunks`` overlapped exchanges.

        x: (num_rows, hidden) sorted by :meth:`chunk_order`; counts: (num_experts,) int64 rows of each global
        expert, indexed by global expert id; experts: this rank's :class:`~longmoe.moe.GroupedExperts` (its
        :meth:`~longmoe.moe.GroupedExperts.split` runs each chunk's experts). Returns (num_rows, out) in x's
        order.
        """
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must be (num_experts={self.num_experts},); got {tuple(counts.shape)}")
        L, P = self.num_local_experts, self.ep_size
        if not 1 <= chunks <= L:
            raise ValueError(f"chunks={chunks}: expected 1..{L} (the local experts per rank)")
        send = counts.reshape(P, L).contiguous()
        recv = self.exchange_counts(counts).cpu()  # (P, L): rows from each source for each local expert
        send_host = send.cpu()
        b = _chunk_bounds(L, chunks)
        plans = [
            (send_host[:, b[c] : b[c + 1]].sum(1).tolist(), recv[:, b[c] : b[c + 1]].sum(1).tolist())
            for c in range(chunks)
        ]
        sizes = [sum(in_s) for in_s, _ in plans]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows; counts add up to {sum(sizes)}")
        # split, not slicing: its backward concatenates the chunks' gradients once, where each slice's
        # backward would allocate and zero a full-size gradient.
        blocks = torch.split(x, sizes)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        passes = experts.split(b)
        arrivals: list = []
        received = [
            _AsyncAllToAll.apply(blk, out_s, in_s, self.group, f"MoE token rows, chunk {c}", arrivals)
            for c, (blk, (in_s, out_s)) in enumerate(zip(blocks, plans, strict=True))
        ]  # every chunk's rows posted at once
        departures: list = []
        outputs = []
        for c, (in_s, out_s) in enumerate(plans):
            self.bytes_sent += (sum(in_s) - in_s[self.rank]) * row_bytes
            _wait(arrivals, self.group, f"MoE token rows, chunk {c}")
            rows = received[c]
            chunk_recv = recv[:, b[c] : b[c + 1]]
            rows, regroup = self._regroup(rows, chunk_recv)
            y = passes[c](rows, chunk_recv.sum(0).to(counts.device))
            if regroup is not None:
                y = moe_unpermute(y, regroup, backend=self.backend)
            self.bytes_sent += (sum(out_s) - out_s[self.rank]) * math.prod(y.shape[1:]) * y.element_size()
            outputs.append(
                _AsyncAllToAll.apply(y, in_s, out_s, self.group, f"MoE expert outputs, chunk {c}", departures)
            )
        for c in range(chunks):
            _wait(departures, self.group, f"MoE expert outputs, chunk {c}")
        return torch.cat(outputs) if chunks > 1 else outputs[0]
