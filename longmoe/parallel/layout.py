"""Sequence layouts: how a global sequence is sharded over ranks, and which blocks a ring step computes.

With ``P`` ranks, ``contiguous`` gives rank ``r`` tokens ``[r*S/P, (r+1)*S/P)``. ``zigzag`` splits the
sequence into ``2P`` chunks and gives rank ``r`` chunks ``r`` and ``2P-1-r``, so under a causal mask every
rank (and every ring step) does the same amount of work. With packed documents (``cu_seqlens``) each
document is split the same way on its own, into near-equal chunks (no padding to a multiple of 2P).

Every ring algorithm pairs the queries of one rank (the *owner*) with the keys of another rank at each
step. Under a causal mask only part of that pair is visible (:meth:`ShardLayout.segments`):

* contiguous layout: owner ``i`` and key rank ``j``: ``i == j`` causal; ``j < i`` everything; ``j > i`` nothing.
* zigzag layout: ``i == j`` causal over the local 2c tokens; ``j < i`` all queries against the first key
  chunk only; ``j > i`` the second query chunk against all keys. Every step costs the same half block.

Pure: nothing here communicates except :func:`unshard_sequence` (an all-gather, for checks and outputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from longmoe.runtime.distributed import world_and_rank

__all__ = [
    "Layout",
    "LAYOUTS",
    "check_layout",
    "ShardLayout",
    "StepSegment",
    "rows_of",
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


@dataclass(frozen=True, slots=True)
class StepSegment:
    """One attention block of a ring step: the rows of the owner's local queries and of the key rank's
    local keys that interact, and whether the block is causal (diagonal) or fully visible. ``q_rows`` /
    ``kv_rows`` are ``(start, stop)`` local ranges. With packed documents a step has one per document."""

    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]
    causal: bool

    @property
    def num_q(self) -> int:
        return self.q_rows[1] - self.q_rows[0]

    @property
    def num_kv(self) -> int:
        return self.kv_rows[1] - self.kv_rows[0]


def _chunk_sizes(length: int, parts: int) -> list[int]:
    base, rem = divmod(length, parts)
    return [base + (1 if j < rem else 0) for j in range(parts)]


@dataclass(frozen=True)
class ShardLayout:
    """How a (possibly packed) global sequence is sharded over ``world`` ranks.

    Without documents (``doc_lengths`` = one document) this is the plain zigzag/contiguous sharding.
    With packed documents (``cu_seqlens``) every document is sharded on its own: zigzag splits each into
    ``2P`` near-equal chunks (sizes differ by at most one; no padding to a multiple of 2P) and rank ``r``
    holds chunks ``r`` and ``2P-1-r`` of every document; contiguous splits each into ``P`` chunks. A rank's
    local sequence is its chunks of document 0, then of document 1, ... in global order. Attention never
    crosses documents.
    """

    world: int
    layout: str
    doc_lengths: tuple[int, ...]

    @staticmethod
    def make(world: int, layout: str, *, seqlen_local: int | None = None, cu_seqlens=None) -> ShardLayout:
        """From the local length of an unpacked sequence, or from the global ``cu_seqlens`` (ndocs + 1,)."""
        check_layout(layout)
        if cu_seqlens is None:
            return ShardLayout(world, layout, (seqlen_local * world,))
        cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, with >= 2 entries; got {cu}")
        return ShardLayout(world, layout, tuple(b - a for a, b in zip(cu, cu[1:], strict=False)))

    @property
    def packed(self) -> bool:
        return len(self.doc_lengths) != 1

    def _parts(self) -> int:
        return 2 * self.world if self.layout == "zigzag" else self.world

    def _rank_chunks(self, rank: int) -> tuple[int, ...]:
        return (rank, 2 * self.world - 1 - rank) if self.layout == "zigzag" else (rank,)

    @functools.cache  # noqa: B019  (instances are small, immutable and few)
    def doc_rows(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """Per document: (local start, local end, end of its first chunk) on ``rank``."""
        out, off = [], 0
        for length in self.doc_lengths:
            sizes = _chunk_sizes(length, self._parts())
            first, *rest = (sizes[c] for c in self._rank_chunks(rank))
            n = first + sum(rest)
            out.append((off, off + n, off + first))
            off += n
        return tuple(out)

    def local_len(self, rank: int) -> int:
        rows = self.doc_rows(rank)
        return rows[-1][1] if rows else 0

    @functools.cache  # noqa: B019
    def global_index(self, rank: int) -> tuple[int, ...]:
        """Global token index of every local token of ``rank``, in local order."""
        idx, doc_start = [], 0
        for length in self.doc_lengths:
            sizes = _chunk_sizes(length, self._parts())
            starts = [doc_start + sum(sizes[:c]) for c in range(len(sizes))]
            for c in self._rank_chunks(rank):
                idx.extend(range(starts[c], starts[c] + sizes[c]))
            doc_start += length
        return tuple(idx)

    @functools.cache  # noqa: B019
    def segments(self, owner: int, kv_rank: int, causal: bool) -> tuple[StepSegment, ...]:
        """The (query rows of ``owner``) x (key rows of ``kv_rank``) blocks to compute, one per document."""
        out = []
        for (qa, qe, qf), (ka, ke, kf) in zip(self.doc_rows(owner), self.doc_rows(kv_rank), strict=True):
            if qe == qa or ke == ka:
                continue
            if not causal:
                seg = StepSegment((qa, qe), (ka, ke), False)
            elif owner == kv_rank:
                seg = StepSegment((qa, qe), (ka, ke), True)
            elif self.layout == "contiguous":
                seg = StepSegment((qa, qe), (ka, ke), False) if kv_rank < owner else None
            elif kv_rank < owner:
                seg = StepSegment((qa, qe), (ka, kf), False)
            else:
                seg = StepSegment((qf, qe), (ka, ke), False)
            if seg is not None and seg.num_q > 0 and seg.num_kv > 0:
                out.append(seg)
        return tuple(out)


def rows_of(segments) -> tuple[tuple[int, int], ...]:
    """The query row ranges of a step's segments (disjoint, in order)."""
    return tuple(seg.q_rows for seg in segments)


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
