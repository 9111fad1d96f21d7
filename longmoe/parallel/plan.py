"""Which part of a ring step's attention is computed: shared by TokenRing, the KV ring and the cost model.

Every ring algorithm pairs the queries of one rank (the *owner*) with the keys of another rank at each
step. Under a causal mask only part of that pair is visible:

* contiguous layout: owner ``i`` and key rank ``j``: ``i == j`` causal; ``j < i`` everything; ``j > i`` nothing.
* zigzag layout (rank ``r`` holds chunks ``r`` and ``2P-1-r``): ``i == j`` causal over the local 2c tokens;
  ``j < i`` all queries against the first key chunk only; ``j > i`` the second query chunk against all
  keys. Every step costs the same half block, which is why zigzag balances causal work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "LAYOUTS",
    "check_layout",
    "ShardLayout",
    "StepPlan",
    "rows_of",
    "check_sequence_parallel_inputs",
    "world_and_rank",
    "group_key",
]


LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sequence layout; expected one of {LAYOUTS}")


_PINNED_GROUPS: dict[int, object] = {}


def group_key(group: dist.ProcessGroup | None) -> int:
    """A cache key for ``group`` (0 for the default group). The group is kept alive by the cache, so its
    ``id`` can never be reused by a different group while a cached entry refers to it."""
    if group is None:
        return 0
    _PINNED_GROUPS.setdefault(id(group), group)
    return id(group)


def world_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) for ``group=None`` without an initialised process group
    (single-process use of the sequence-parallel functions)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    g = dist.group.WORLD if group is None else group
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group")
    return world, rank


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Rows of the owner's local queries and of the key rank's local keys that interact, and whether the
    pair is causal (diagonal) or fully visible. ``q_rows``/``kv_rows`` are ``(start, stop)`` local ranges.
    With packed documents a step is a list of these, one per document."""

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
    def segments(self, owner: int, kv_rank: int, causal: bool) -> tuple[StepPlan, ...]:
        """The (query rows of ``owner``) x (key rows of ``kv_rank``) blocks to compute, one per document."""
        out = []
        for (qa, qe, qf), (ka, ke, kf) in zip(self.doc_rows(owner), self.doc_rows(kv_rank), strict=True):
            if qe == qa or ke == ka:
                continue
            if not causal:
                seg = StepPlan((qa, qe), (ka, ke), False)
            elif owner == kv_rank:
                seg = StepPlan((qa, qe), (ka, ke), True)
            elif self.layout == "contiguous":
                seg = StepPlan((qa, qe), (ka, ke), False) if kv_rank < owner else None
            elif kv_rank < owner:
                seg = StepPlan((qa, qe), (ka, kf), False)
            else:
                seg = StepPlan((qf, qe), (ka, ke), False)
            if seg is not None and seg.num_q > 0 and seg.num_kv > 0:
                out.append(seg)
        return tuple(out)


def rows_of(segments) -> tuple[tuple[int, int], ...]:
    """The query row ranges of a step's segments (disjoint, in order)."""
    return tuple(seg.q_rows for seg in segments)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check_sequence_parallel_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    world: int,
    rank: int,
    layout: str,
    *,
    across_ranks: bool = True,
    cu_seqlens=None,
) -> ShardLayout:
    """Validate local shards; with ``across_ranks`` also check every rank passed the same shapes and dtype.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim). The
    cross-rank check is one all-gather of 8 integers; it turns a mismatch (which would otherwise hang or
    corrupt the ring) into an error on every rank naming the rank that differs. With packed documents
    (``cu_seqlens``, the global (ndocs + 1,) offsets) batch must be 1 and the local length must be the one
    the per-document sharding gives this rank. Returns the :class:`ShardLayout`.
    """
    check_layout(layout)
    if world < 1:
        raise ValueError(f"group has size {world}; sequence parallelism needs at least 1 rank")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be (batch, seqlen_local, heads, head_dim); got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seqlen_local and head_dim "
            "(sequence parallelism shards queries and keys alike)"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"heads_q={q.shape[2]} must be a multiple of heads_kv={k.shape[2]} (GQA/MQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None:
        shard = ShardLayout.make(world, layout, cu_seqlens=cu_seqlens)
        if q.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1; got batch={q.shape[0]}")
        if q.shape[1] != shard.local_len(rank):
            raise ValueError(
                f"rank {rank}: q has {q.shape[1]} tokens but cu_seqlens (total {sum(shard.doc_lengths)} tokens in "
                f"{len(shard.doc_lengths)} documents) gives this rank {shard.local_len(rank)}; shard with "
                "shard_sequence(x, group, layout, cu_seqlens=cu_seqlens)"
            )
    else:
        if layout == "zigzag" and q.shape[1] % 2 != 0:
            raise ValueError(
                f"layout='zigzag' needs an even local sequence (two chunks per rank, global length divisible "
                f"by 2 * world size = {2 * world}); got seqlen_local={q.shape[1]}"
            )
        shard = ShardLayout.make(world, layout, seqlen_local=q.shape[1])
    if not across_ranks or world == 1:
        return shard
    code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    total = sum(shard.doc_lengths)
    docs = hash(shard.doc_lengths) & 0x7FFFFFFF  # same documents everywhere (Python int hash: deterministic)
    mine = torch.tensor([q.shape[0], total, q.shape[2], q.shape[3], k.shape[2], code, layout == "zigzag", docs],
                        dtype=torch.int64)  # fmt: skip
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    names = ["batch", "seqlen", "heads_q", "head_dim", "heads_kv", "dtype", "layout", "cu_seqlens"]
    for other, theirs in enumerate(everyone):
        diff = [n for n, a, b in zip(names, mine.tolist(), theirs.tolist(), strict=True) if a != b]
        if diff:
            field = diff[0]
            a, b = mine[names.index(field)].item(), theirs[names.index(field)].item()
            if field == "dtype":
                a, b = _DTYPES[a] if a >= 0 else "other", _DTYPES[b] if b >= 0 else "other"
            raise ValueError(
                f"rank {rank}: sequence-parallel inputs differ across ranks: {field} is {a} here but {b} on "
                f"rank {other} (every rank must pass shards of one global batch)"
            )
    return shard


def prepare_ring_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: str,
    softmax_scale: float | None,
    *,
    check_ranks: bool,
    cu_seqlens=None,
) -> tuple[ShardLayout, float]:
    """The checks every ring algorithm's entry point makes: the layout, the shards (across ranks with
    ``check_ranks``) and the softmax scale. Returns the shard layout and the scale (default
    ``1/sqrt(head_dim)``). q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local,
    heads_kv, head_dim)."""
    check_layout(layout)
    world, rank = world_and_rank(group)
    shard = check_sequence_parallel_inputs(
        q, k, v, group, world, rank, layout, across_ranks=check_ranks, cu_seqlens=cu_seqlens
    )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0; got {softmax_scale!r}")
    return shard, scale


class RingFunction(torch.autograd.Function):
    """Autograd for a ring algorithm given as a forward and a backward function.

    ``forward_fn(q, k, v, **fwd_kw) -> (out fp32, lse)`` and ``backward_fn(dout, q, k, v, out, lse,
    **bwd_kw) -> (dq, dk, dv)``; q: (batch, seqlen_local, heads_q, head_dim), k/v: (batch, seqlen_local,
    heads_kv, head_dim), lse: (batch, heads_q, seqlen_local) fp32 (returned, not differentiable). The
    output is cast to q's dtype and saved for the backward with q, k, v and lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, forward_fn, backward_fn, fwd_kw: dict, bwd_kw: dict):
        out32, lse = forward_fn(q, k, v, **fwd_kw)
        out = out32.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_fn, ctx.bwd_kw = backward_fn, bwd_kw
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(dout.contiguous(), q, k, v, out, lse, **ctx.bwd_kw)
        return dq, dk, dv, None, None, None, None
