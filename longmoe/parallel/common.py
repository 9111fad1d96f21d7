"""What every sequence-parallel algorithm shares: the entry-point checks and the autograd Function.

* :func:`check_sequence_parallel_inputs`: local shard shapes, GQA, dtypes, the packed-document layout,
  and (one bounded all-gather of 8 integers on the group's device) that every rank passed the same
  global shapes; a rank that differs gets an error naming the field and the rank, never a hang.
* :func:`prepare_ring_call`: those checks plus the softmax scale, as TokenRing and the KV ring enter.
* :class:`RingFunction`: autograd for an algorithm given as a forward and a backward function.

Ulysses uses the checks too, so this module is shared by all three algorithms, not by the rings only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longmoe.attention.flash_attention import check_finite_inputs
from longmoe.parallel.layout import ShardLayout, check_layout
from longmoe.runtime.collectives import check_same_across_ranks
from longmoe.runtime.distributed import world_and_rank

__all__ = ["check_sequence_parallel_inputs", "prepare_ring_call", "RingFunction"]


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS_CODE = {"zigzag": 1, "contiguous": 0}


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
    timeout_s: float | None = None,
    check_finite: bool = False,
) -> ShardLayout:
    """Validate local shards; with ``across_ranks`` also check every rank passed the same shapes and dtype.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim). The
    cross-rank check is one all-gather of 8 integers on the group's device, waited for at most
    ``timeout_s`` (None: the group's timeout); it turns a mismatch (which would otherwise hang or corrupt
    the ring) into an error on every rank naming the rank that differs. With packed documents
    (``cu_seqlens``, the global (ndocs + 1,) offsets) batch must be 1 and the local length must be the one
    the per-document sharding gives this rank. With ``check_finite`` a NaN or infinity in this rank's q/k/v
    raises on this rank (naming it and the tensor) and, through the cross-rank check, on every other rank
    (naming the rank that has it), so no rank is left waiting in the ring. Returns the :class:`ShardLayout`.
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
    nonfinite = check_finite and not all(bool(torch.isfinite(t).all()) for t in (q, k, v))
    if not across_ranks or world == 1:
        if nonfinite:
            _raise_nonfinite(q, k, v, rank)
        return shard
    docs = hash(shard.doc_lengths) & 0x7FFFFFFF  # same documents everywhere (Python int hash: deterministic)
    fields = dict(batch=q.shape[0], seqlen=sum(shard.doc_lengths), heads_q=q.shape[2], head_dim=q.shape[3],
                  heads_kv=k.shape[2], dtype=_DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
                  layout=LAYOUTS_CODE[layout], cu_seqlens=docs)  # fmt: skip
    if check_finite:
        fields["nonfinite_inputs"] = int(nonfinite)
    show = lambda name, x: (_DTYPES[x] if x >= 0 else "other") if name == "dtype" else x
    try:
        check_same_across_ranks(
            fields, group, what="sequence-parallel inputs (every rank must pass shards of one global batch)",
            timeout_s=timeout_s, describe=show,
        )  # fmt: skip
    except ValueError:
        if not nonfinite:
            raise
        # this rank's own problem is the one to report here; the others name this rank
    if nonfinite:
        _raise_nonfinite(q, k, v, rank)
    return shard


def _raise_nonfinite(q, k, v, rank: int) -> None:
    try:
        check_finite_inputs(q=q, k=k, v=v)
    except ValueError as exc:
        raise ValueError(f"rank {rank}: {exc}") from None


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
    timeout_s: float | None = None,
    check_finite: bool = False,
) -> tuple[ShardLayout, float]:
    """The checks every ring algorithm's entry point makes: the layout, the shards (across ranks with
    ``check_ranks``) and the softmax scale. Returns the shard layout and the scale (default
    ``1/sqrt(head_dim)``). q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local,
    heads_kv, head_dim)."""
    check_layout(layout)
    world, rank = world_and_rank(group)
    shard = check_sequence_parallel_inputs(
        q, k, v, group, world, rank, layout, across_ranks=check_ranks, cu_seqlens=cu_seqlens, timeout_s=timeout_s,
        check_finite=check_finite,
    )  # fmt: skip
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
