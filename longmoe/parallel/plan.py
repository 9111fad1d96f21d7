"""Which part of a ring step's attention is computed: shared by TokenRing, the KV ring and the cost model.

Every ring algorithm pairs the queries of one rank (the *owner*) with the keys of another rank at each
step. Under a causal mask only part of that pair is visible:

* contiguous layout: owner ``i`` and key rank ``j``: ``i == j`` causal; ``j < i`` everything; ``j > i`` nothing.
* zigzag layout (rank ``r`` holds chunks ``r`` and ``2P-1-r``): ``i == j`` causal over the local 2c tokens;
  ``j < i`` all queries against the first key chunk only; ``j > i`` the second query chunk against all
  keys. Every step costs the same half block, which is why zigzag balances causal work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longmoe.parallel.sharding import check_layout

__all__ = ["StepPlan", "step_plan", "check_sequence_parallel_inputs", "world_and_rank"]


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
    pair is causal (diagonal) or fully visible. ``q_rows``/``kv_rows`` are ``(start, stop)`` local ranges."""

    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]
    causal: bool

    @property
    def num_q(self) -> int:
        return self.q_rows[1] - self.q_rows[0]

    @property
    def num_kv(self) -> int:
        return self.kv_rows[1] - self.kv_rows[0]


def step_plan(owner: int, kv_rank: int, seqlen_local: int, causal: bool, layout: str) -> StepPlan | None:
    """The work of (queries of ``owner``) x (keys of ``kv_rank``); None when nothing is visible."""
    full = (0, seqlen_local)
    if not causal:
        return StepPlan(full, full, False)
    if owner == kv_rank:
        return StepPlan(full, full, True)
    if layout == "contiguous":
        return StepPlan(full, full, False) if kv_rank < owner else None
    half = seqlen_local // 2
    if kv_rank < owner:
        return StepPlan(full, (0, half), False)
    return StepPlan((half, seqlen_local), full, False)


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
) -> None:
    """Validate local shards; with ``across_ranks`` also check every rank passed the same shapes and dtype.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim). The
    cross-rank check is one all-gather of 8 integers; it turns a mismatch (which would otherwise hang or
    corrupt the ring) into an error on every rank naming the rank that differs.
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
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(
            f"layout='zigzag' needs an even local sequence (two chunks per rank, global length divisible by "
            f"2 * world size = {2 * world}); got seqlen_local={q.shape[1]}"
        )
    if not across_ranks or world == 1:
        return
    code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = torch.tensor([*q.shape, k.shape[2], code, layout == "zigzag"], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    names = ["batch", "seqlen_local", "heads_q", "head_dim", "heads_kv", "dtype", "layout"]
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
