"""Collectives shared by the parallel algorithms: one autograd all-to-all, and a bounded cross-rank check.

* :func:`all_to_all`: rows of ``x`` go to the ranks of a group (equal slices, or variable ``splits``),
  with autograd (the backward is the reverse exchange). Ulysses' sequence<->head re-sharding and the MoE
  expert-parallel dispatch both use it. A failure names this rank, the group's global ranks, what was
  exchanged, and the cause.
* :func:`check_same_across_ranks`: one all-gather of a few integers that turns a rank disagreeing with
  the others (a shape, a dtype, a config field) into an error on every rank naming the field, the values
  and the ranks, instead of a hang or silently wrong results.

Tensors of a collective live on the group's device (:func:`longmoe.runtime.group_device`: CUDA for NCCL,
CPU for gloo). Waits that take ``timeout_s`` are bounded by it; the others by the group's own timeout.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from longmoe.runtime.distributed import group_device, world_and_rank

__all__ = ["CollectiveError", "all_to_all", "AllToAllFunction", "check_same_across_ranks"]


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names this rank, the group and the operation."""


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(dist.group.WORLD if group is None else group)


def _all_to_all_single(out, x, output_splits, input_splits, group, what: str) -> None:
    """``dist.all_to_all_single`` whose failures (timeouts, dead peers) name the rank, the group and the traffic."""
    try:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    except RuntimeError as err:  # gloo/NCCL timeouts and peer failures (DistBackendError is a RuntimeError)
        world, rank = world_and_rank(group)
        raise CollectiveError(
            f"all_to_all ({what}) failed on rank {rank} of the group (size {world}, global ranks "
            f"{_group_ranks(group)}): sending {input_splits or 'equal splits of'} {tuple(x.shape)}, expecting "
            f"{output_splits or tuple(out.shape)}; a peer that never joins the exchange fails it after the "
            f"group's timeout. Cause: {err}"
        ) from err


def _exchange(x: torch.Tensor, output_splits, input_splits, group, what: str) -> torch.Tensor:
    x = x.contiguous()
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)  # contiguous, unlike empty_like
    _all_to_all_single(out, x, output_splits, input_splits, group, what)
    return out


class AllToAllFunction(torch.autograd.Function):
    """Rows ``x[sum(input_splits[:r]) : ...]`` go to rank r (equal slices when the splits are None);
    the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, what):
        ctx.splits, ctx.group, ctx.what = (output_splits, input_splits), group, what
        return _exchange(x, output_splits, input_splits, group, what)

    @staticmethod
    def backward(ctx, dout):
        output_splits, input_splits = ctx.splits
        return (
            _exchange(dout, input_splits, output_splits, ctx.group, f"{ctx.what}, backward"),
            None,
            None,
            None,
            None,
        )


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    what: str = "rows",
) -> torch.Tensor:
    """All-to-all of rows, with autograd.

    x: (rows, *rest). With splits: ``input_splits[r]`` rows go to rank r of ``group`` and
    ``output_splits[r]`` rows come from it; returns (sum(output_splits), *rest), blocks in source-rank
    order. Without splits: rows split in P equal slices, slice r to rank r; returns x's shape, slice r
    from rank r. ``what`` names the traffic in error messages.
    """
    world, _ = world_and_rank(group)
    if (output_splits is None) != (input_splits is None):
        raise ValueError(
            f"output_splits={output_splits} and input_splits={input_splits}: give both or neither"
        )
    if output_splits is None:
        if x.shape[0] % world:
            raise ValueError(
                f"x has {x.shape[0]} rows; equal all_to_all needs a multiple of the group size {world}"
            )
    else:
        if len(output_splits) != world or len(input_splits) != world:
            raise ValueError(
                f"output_splits has {len(output_splits)} and input_splits {len(input_splits)} entries; expected "
                f"one per rank of the group ({world})"
            )
        if sum(input_splits) != x.shape[0]:
            raise ValueError(
                f"input_splits={list(input_splits)} sums to {sum(input_splits)}; expected x rows {x.shape[0]}"
            )
        output_splits, input_splits = list(output_splits), list(input_splits)
    if world == 1:
        return x
    return AllToAllFunction.apply(x, output_splits, input_splits, group, what)


def check_same_across_ranks(
    fields: dict[str, int],
    group: dist.ProcessGroup | None = None,
    *,
    what: str,
    timeout_s: float | None = None,
    describe=None,
) -> None:
    """Raise on every rank if any rank of ``group`` passed different ``fields`` (name -> int).

    One all-gather of ``len(fields)`` int64 on the group's device, waited for at most ``timeout_s`` (None:
    the group's timeout). ``describe(name, value)`` turns a value into text for the message (a dtype code
    into a dtype, say). The error names ``what``, the field, this rank's value and the other rank's.

    Raises:
        ValueError: a field differs; every rank raises (each names the first rank that differs from it).
        CollectiveError: a peer did not join within ``timeout_s``, or the collective failed.
    """
    world, rank = world_and_rank(group)
    if world == 1:
        return
    names = list(fields)
    mine = torch.tensor([int(fields[n]) for n in names], dtype=torch.int64, device=group_device(group))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    try:
        work = dist.all_gather(everyone, mine, group=group, async_op=True)
        if timeout_s is None:
            work.wait()
        elif work.wait(timeout=datetime.timedelta(seconds=timeout_s)) is False:
            raise RuntimeError(f"timed out after {timeout_s} s")
    except RuntimeError as err:
        raise CollectiveError(
            f"rank {rank}: checking {what} across the group (size {world}, global ranks {_group_ranks(group)}) "
            f"failed{'' if timeout_s is None else f' within {timeout_s} s'}: a rank did not join (dead, stalled, "
            f"or not calling the same function). Cause: {err}"
        ) from err
    show = describe or (lambda _name, value: value)
    values = mine.tolist()
    for other, theirs in enumerate(t.tolist() for t in everyone):
        for name, a, b in zip(names, values, theirs, strict=True):
            if a != b:
                raise ValueError(
                    f"rank {rank}: {what} differ across ranks: {name} is {show(name, a)} here but "
                    f"{show(name, b)} on rank {other}"
                )
