"""Sequence sharding for sequence parallelism: contiguous and zigzag layouts, packed documents too.

With ``P`` ranks, ``contiguous`` gives rank ``r`` tokens ``[r*S/P, (r+1)*S/P)``. ``zigzag`` splits the
sequence into ``2P`` chunks and gives rank ``r`` chunks ``r`` and ``2P-1-r``, so under a causal mask every
rank (and every ring step) does the same amount of work. With packed documents (``cu_seqlens``) each
document is split the same way on its own, into near-equal chunks (no padding to a multiple of 2P); see
:class:`longmoe.parallel.plan.ShardLayout`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from longmoe.parallel.plan import LAYOUTS, ShardLayout, check_layout, world_and_rank

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


def _check_divisible(seqlen: int, world: int, layout: str, what: str = "sequence length") -> int:
    parts = 2 * world if layout == "zigzag" else world
    if seqlen % parts != 0:
        raise ValueError(
            f"{what} {seqlen} is not divisible by {parts} (= {'2 * ' if layout == 'zigzag' else ''}world size "
            f"{world}) as layout={layout!r} needs; pack it as documents with cu_seqlens to shard any length"
        )
    return seqlen // parts


def _layout(seqlen: int, world: int, layout: str, cu_seqlens) -> ShardLayout:
    check_layout(layout)
    if world < 1:
        raise ValueError(f"world_size must be >= 1; got {world}")
    if cu_seqlens is not None:
        shard = ShardLayout.make(world, layout, cu_seqlens=cu_seqlens)
        if sum(shard.doc_lengths) != seqlen:
            raise ValueError(
                f"cu_seqlens covers {sum(shard.doc_lengths)} tokens but the sequence has {seqlen}"
            )
        return shard
    return ShardLayout.make(
        world, layout, seqlen_local=_check_divisible(seqlen, world, layout) * (2 if layout == "zigzag" else 1)
    )


def shard_bounds(seqlen: int, rank: int, world: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """Global ``[start, end)`` ranges of rank ``rank``'s tokens, in local order (unpacked sequences)."""
    check_layout(layout)
    c = _check_divisible(seqlen, world, layout)
    if layout == "contiguous":
        return [(rank * c, (rank + 1) * c)]
    return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]


def shard_positions(
    seqlen: int, rank: int, world: int, layout: str = "zigzag", device=None, *, cu_seqlens=None
) -> torch.Tensor:
    """Global token indices of rank ``rank``'s shard, (local tokens,) int64, in local order — for RoPE
    and masks. With ``cu_seqlens`` subtract each document's start for per-document positions."""
    shard = _layout(seqlen, world, layout, cu_seqlens)
    return torch.tensor(shard.global_index(rank), dtype=torch.int64, device=device)


def shard_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1,
    rank: int | None = None, world_size: int | None = None, cu_seqlens=None,
) -> torch.Tensor:  # fmt: skip
    """This rank's shard of a full sequence.

    x: any tensor with the sequence in ``dim`` (default 1: (batch, seqlen, ...)). ``rank``/``world_size``
    default to the group's; pass them to shard without a process group. ``cu_seqlens``: global (ndocs + 1,)
    offsets of packed documents (each sharded on its own). Returns a contiguous (batch, local, ...) tensor.
    """
    w, r = world_and_rank(group)
    world = w if world_size is None else world_size
    r = r if rank is None else rank
    if not 0 <= r < max(world, 1):
        raise ValueError(f"rank {r} is outside the group of size {world}")
    shard = _layout(x.shape[dim], world, layout, cu_seqlens)
    if not shard.packed:
        pieces = [x.narrow(dim, a, b - a) for a, b in shard_bounds(x.shape[dim], r, world, layout)]
        return torch.cat(pieces, dim=dim).contiguous()
    index = torch.tensor(shard.global_index(r), dtype=torch.int64, device=x.device)
    return x.index_select(dim, index).contiguous()


def unshard_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1,
    cu_seqlens=None,
) -> torch.Tensor:  # fmt: skip
    """All-gather every rank's shard and restore the global token order (the inverse of shard_sequence).

    x: (batch, local, ...) shard with the sequence in ``dim``; returns (batch, seqlen, ...) on every rank.
    Not differentiable (use it for checks and outputs).
    """
    world, _ = world_and_rank(group)
    if cu_seqlens is None:
        seqlen = x.shape[dim] * world
        shard = _layout(seqlen, world, layout, None)
    else:
        shard = ShardLayout.make(world, layout, cu_seqlens=cu_seqlens)
    lengths = [shard.local_len(r) for r in range(world)]
    longest = max(lengths)
    padded = x
    if x.shape[dim] < longest:  # all_gather needs equal sizes: pad, gather, then trim
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    shards = [torch.empty_like(padded) for _ in range(world)]
    if world == 1:
        shards = [padded]
    else:
        dist.all_gather(shards, padded.contiguous(), group=group)
    local = torch.cat([s.narrow(dim, 0, n) for s, n in zip(shards, lengths, strict=True)], dim=dim)
    index = torch.cat([torch.tensor(shard.global_index(r), dtype=torch.int64) for r in range(world)])
    out = torch.empty_like(local)
    out.index_copy_(dim, index.to(x.device), local)
    return out
