"""Sequence sharding for sequence parallelism: contiguous and zigzag layouts.

With ``P`` ranks, ``contiguous`` gives rank ``r`` tokens ``[r*S/P, (r+1)*S/P)``. ``zigzag`` splits the
sequence into ``2P`` chunks and gives rank ``r`` chunks ``r`` and ``2P-1-r``, so under a causal mask every
rank (and every ring step) does the same amount of work.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from longmoe.runtime.distributed import group_rank, group_size

__all__ = [
    "Layout",
    "LAYOUTS",
    "check_layout",
    "shard_sequence",
    "unshard_sequence",
    "shard_positions",
    "shard_bounds",
]

Layout = Literal["zigzag", "contiguous"]
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sequence layout; expected one of {LAYOUTS}")


def _check_divisible(seqlen: int, world: int, layout: str, what: str = "sequence length") -> int:
    parts = 2 * world if layout == "zigzag" else world
    if seqlen % parts != 0:
        raise ValueError(
            f"{what} {seqlen} is not divisible by {parts} (= {'2 * ' if layout == 'zigzag' else ''}world size "
            f"{world}) as layout={layout!r} needs"
        )
    return seqlen // parts


def shard_bounds(seqlen: int, rank: int, world: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """Global ``[start, end)`` ranges of rank ``rank``'s tokens, in local order."""
    check_layout(layout)
    c = _check_divisible(seqlen, world, layout)
    if layout == "contiguous":
        return [(rank * c, (rank + 1) * c)]
    return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]


def shard_positions(seqlen: int, rank: int, world: int, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global token positions of rank ``rank``'s shard, (seqlen / world,) int64 — for RoPE and masks."""
    return torch.cat(
        [torch.arange(a, b, device=device) for a, b in shard_bounds(seqlen, rank, world, layout)]
    )


def shard_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1,
    rank: int | None = None, world_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """This rank's shard of a full sequence.

    x: any tensor with the sequence in ``dim`` (default 1: (batch, seqlen, ...)). ``rank``/``world_size``
    default to the group's; pass them to shard without a process group. Returns a contiguous
    (batch, seqlen / world, ...) tensor.
    """
    check_layout(layout)
    world = group_size(group) if world_size is None else world_size
    r = group_rank(group) if rank is None else rank
    if world < 1:
        raise ValueError(f"world_size must be >= 1; got {world}")
    if not 0 <= r < world:
        raise ValueError(f"rank {r} is outside the group of size {world}")
    pieces = [x.narrow(dim, a, b - a) for a, b in shard_bounds(x.shape[dim], r, world, layout)]
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1
) -> torch.Tensor:
    """All-gather every rank's shard and restore the global token order (the inverse of shard_sequence).

    x: (batch, seqlen / world, ...) shard with the sequence in ``dim``; returns (batch, seqlen, ...) on every
    rank. Not differentiable (use it for checks and outputs).
    """
    check_layout(layout)
    world = group_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    c = x.shape[dim] // 2
    first = [s.narrow(dim, 0, c) for s in shards]
    second = [s.narrow(dim, c, c) for s in shards]
    return torch.cat(first + second[::-1], dim=dim)
