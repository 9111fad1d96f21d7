"""One entry point for sequence-parallel attention, a drop-in module and an SDPA-shaped function."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from longmoe.attention import XAttentionConfig
from longmoe.parallel.cost_model import (
    ALGORITHMS,
    AttentionShape,
    Topology,
    choose_algorithm,
    ulysses_applies,
)
from longmoe.parallel.kv_ring import kv_ring_attention
from longmoe.parallel.layout import check_layout
from longmoe.parallel.measure import measure_topology, profile_compute
from longmoe.parallel.token_ring import token_ring_attention
from longmoe.parallel.ulysses import ulysses_attention
from longmoe.runtime.distributed import group_device, group_key, world_and_rank
from longmoe.runtime.exchanger import CommStats

__all__ = [
    "ALGORITHM_CHOICES",
    "autotune_algorithm",
    "sequence_parallel_attention",
    "select_algorithm",
    "SequenceParallelAttention",
    "sequence_parallel_sdpa",
]

ALGORITHM_CHOICES: tuple[str, ...] = ("auto", "autotune", *ALGORITHMS)
"""What ``algorithm=`` takes: a cost-model pick, a timed pick, or one algorithm by name."""


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHM_CHOICES:
        raise ValueError(f"algorithm={algorithm!r}; expected one of {ALGORITHM_CHOICES}")


_TUNED: dict[tuple, tuple[str, dict[str, float]]] = {}


def autotune_algorithm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    layout: str = "zigzag",
    backward: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> tuple[str, dict[str, float]]:
    """Time every candidate algorithm once on these shards (collective) and return the fastest and the
    times; cached per (shapes, dtype, causal, layout, documents, backward, group), like cuDNN's benchmark
    mode. Every rank gets the same answer (times are all-reduced with MAX).

    Use it where the cost model's guess is not good enough (on CPU ranks the per-step overheads of the ring
    algorithms are not in the model); ``algorithm="autotune"`` calls it.
    """
    import time

    world, _ = world_and_rank(group)
    if backward is None:
        backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    docs = None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens.tolist())
    key = (
        tuple(q.shape),
        tuple(k.shape),
        q.dtype,
        bool(causal),
        layout,
        docs,
        bool(backward),
        group_key(group),
        world,
    )
    if key in _TUNED:
        return _TUNED[key]
    if world == 1:
        _TUNED[key] = ("token_ring", {"token_ring": 0.0})
        return _TUNED[key]
    candidates = ["token_ring", "kv_ring"]
    hq, hkv = q.shape[2], k.shape[2]
    if cu_seqlens is None and hq % world == 0 and (hkv % world == 0 or world % hkv == 0):
        candidates.append("ulysses")
    times: dict[str, float] = {}
    qd, kd, vd = (t.detach() for t in (q, k, v))
    for alg in candidates:

        def run(alg=alg):
            kw = dict(group=group, causal=causal, layout=layout, algorithm=alg, cu_seqlens=cu_seqlens,
                      softmax_scale=softmax_scale)  # fmt: skip
            if backward:
                leaves = [t.clone().requires_grad_() for t in (qd, kd, vd)]
                sequence_parallel_attention(*leaves, **kw).sum().backward()
            else:
                with torch.no_grad():
                    sequence_parallel_attention(qd, kd, vd, **kw)

        run()  # warm-up: second process group, kernel caches
        dist.barrier(group=group)
        t0 = time.perf_counter()
        run()
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=group_device(group))
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times[alg] = elapsed.item()
    _TUNED[key] = (min(times, key=times.get), times)
    return _TUNED[key]


def select_algorithm(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    layout: str = "zigzag",
    topology: Topology | None = None,
    backward: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    measure_compute: bool = True,
) -> tuple[str, dict[str, float]]:
    """The algorithm ``algorithm="auto"`` runs for these shards, and the estimated seconds of each.

    q: (batch, seqlen_local, heads_q, head_dim); k: (batch, seqlen_local, heads_kv, head_dim).
    ``topology`` defaults to one measured on ``group`` (collective, cached). With ``measure_compute`` the
    kernel calls each algorithm would make are timed once per shape (collective, cached; about one ring
    pass of compute, see :func:`longmoe.parallel.profile_compute`), otherwise compute is costed at the
    topology's FLOP rate. ``backward`` defaults to whether autograd will need gradients. With packed
    documents (``cu_seqlens``) only the ring algorithms are candidates.
    """
    world, _ = world_and_rank(group)
    if world == 1:
        return "token_ring", {"token_ring": 0.0}
    shape = AttentionShape(
        world_size=world, batch=q.shape[0], seqlen_local=q.shape[1], heads_q=q.shape[2], heads_kv=k.shape[2],
        head_dim=q.shape[3], dtype=q.dtype, causal=bool(causal), layout=layout,
        cu_seqlens=None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens.tolist()),
    )  # fmt: skip
    topo = topology if topology is not None else measure_topology(group)
    if backward is None:
        backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    candidates = ALGORITHMS
    if cu_seqlens is not None or not ulysses_applies(shape):
        candidates = ("token_ring", "kv_ring")
    profile = None
    if measure_compute:
        profile = profile_compute(shape, group, backward=backward, algorithms=candidates, device=q.device)
    return choose_algorithm(shape, topo, backward=backward, candidates=candidates, profile=profile)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    algorithm: Literal["auto", "autotune", "token_ring", "kv_ring", "ulysses"] = "auto",
    return_lse: bool = False,
    topology: Topology | None = None,
    timeout_s: float = 120.0,
    cu_seqlens: torch.Tensor | None = None,
    stats: CommStats | None = None,
    check_finite: bool = False,
    sparse: XAttentionConfig | None = None,
):
    """Attention over sequence shards with TokenRing, the KV ring or Ulysses (``"auto"``: the cost model's
    cheapest for these shapes and ``topology``; ``"autotune"``: the fastest when timed once on these shapes,
    cached). Every rank of ``group`` calls it.

    q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim) shards made
    with :func:`longmoe.parallel.shard_sequence` in ``layout``; packed documents: batch 1 and the global
    ``cu_seqlens`` (TokenRing and the KV ring). Returns out like q (and lse (batch, heads_q, seqlen_local)
    fp32 with ``return_lse``); differentiable. ``timeout_s`` bounds every wait of the ring algorithms and
    the entry check; ``stats`` (a :class:`longmoe.runtime.CommStats`) receives the bytes moved;
    ``check_finite`` raises on every rank if any rank's inputs hold a NaN or infinity. ``sparse`` (a
    :class:`~longmoe.attention.XAttentionConfig`) makes it XAttention block-sparse: Ulysses only (each rank
    then holds whole sequences of its heads, so the masks are the single-process ones); ``"auto"`` and
    ``"autotune"`` pick Ulysses, and a ring algorithm raises (the sparse rings are not built yet).
    """
    check_layout(layout)
    _check_algorithm(algorithm)
    algorithm = _sparse_algorithm(algorithm, sparse, cu_seqlens)
    if algorithm == "auto":
        algorithm, _ = select_algorithm(
            q, k, group=group, causal=causal, layout=layout, topology=topology, cu_seqlens=cu_seqlens
        )
    elif algorithm == "autotune":
        algorithm, _ = autotune_algorithm(
            q,
            k,
            v,
            group=group,
            causal=causal,
            layout=layout,
            cu_seqlens=cu_seqlens,
            softmax_scale=softmax_scale,
        )
    kw = dict(group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, return_lse=return_lse,
              timeout_s=timeout_s, stats=stats, check_finite=check_finite)  # fmt: skip
    if algorithm == "token_ring":
        return token_ring_attention(q, k, v, cu_seqlens=cu_seqlens, **kw)
    if algorithm == "kv_ring":
        return kv_ring_attention(q, k, v, cu_seqlens=cu_seqlens, **kw)
    if cu_seqlens is not None:
        raise ValueError(
            "algorithm='ulysses' does not take packed documents (cu_seqlens); use 'token_ring' or 'kv_ring'"
        )
    return ulysses_attention(q, k, v, sparse=sparse, **kw)


def _sparse_algorithm(algorithm: str, sparse: XAttentionConfig | None, cu_seqlens) -> str:
    """The algorithm that runs ``sparse`` attention: Ulysses (``auto`` / ``autotune`` resolve to it)."""
    if sparse is None:
        return algorithm
    if not isinstance(sparse, XAttentionConfig):
        raise TypeError(f"sparse={sparse!r}: expected a longmoe.attention.XAttentionConfig or None")
    if algorithm not in ("auto", "autotune", "ulysses"):
        raise ValueError(
            f"algorithm={algorithm!r} with sparse=XAttentionConfig(...): block-sparse attention across sequence "
            "shards runs under Ulysses only; expected 'ulysses' or 'auto'"
        )
    if cu_seqlens is not None:
        raise ValueError(
            "sparse=XAttentionConfig(...) does not take packed documents (cu_seqlens); expected None"
        )
    return "ulysses"


class SequenceParallelAttention(nn.Module):
    """Drop-in attention core over sequence shards: ``forward(q, k, v)`` with flash-attention layout.

    Replace ``flash_attn_func(q, k, v, causal=True)`` (or an SDPA call on transposed tensors) by
    ``SequenceParallelAttention(causal=True)`` in a model whose activations are sharded along the sequence
    with ``shard_sequence``. ``causal`` defaults to False, as in SDPA and every other longmoe function.
    ``last_algorithm`` records what ``"auto"`` chose; ``stats`` (a :class:`longmoe.runtime.CommStats`, shared
    by several modules if you like) accumulates the bytes every call moves. ``sparse`` (a
    :class:`~longmoe.attention.XAttentionConfig`) makes it XAttention block-sparse under Ulysses (see
    :func:`sequence_parallel_attention`).
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        causal: bool = False,
        softmax_scale: float | None = None,
        layout: str = "zigzag",
        algorithm: str = "auto",
        topology: Topology | None = None,
        timeout_s: float = 120.0,
        stats: CommStats | None = None,
        sparse: XAttentionConfig | None = None,
    ):
        super().__init__()
        check_layout(layout)
        _check_algorithm(algorithm)
        _sparse_algorithm(algorithm, sparse, None)
        self.sparse = sparse
        self.group, self.causal, self.softmax_scale = group, causal, softmax_scale
        self.layout, self.algorithm, self.topology, self.timeout_s = layout, algorithm, topology, timeout_s
        self.stats = stats
        self.last_algorithm: str | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim);
        cu_seqlens: global (ndocs + 1,) offsets for packed documents (batch 1)."""
        alg = _sparse_algorithm(self.algorithm, self.sparse, cu_seqlens)
        if alg == "auto":
            alg, _ = select_algorithm(
                q, k, group=self.group, causal=self.causal, layout=self.layout, topology=self.topology,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
        elif alg == "autotune":
            alg, _ = autotune_algorithm(
                q, k, v, group=self.group, causal=self.causal, layout=self.layout, cu_seqlens=cu_seqlens,
                softmax_scale=self.softmax_scale,
            )  # fmt: skip
        self.last_algorithm = alg
        return sequence_parallel_attention(
            q, k, v, group=self.group, causal=self.causal, softmax_scale=self.softmax_scale, layout=self.layout,
            algorithm=alg, timeout_s=self.timeout_s, cu_seqlens=cu_seqlens, stats=self.stats, sparse=self.sparse,
        )  # fmt: skip

    def extra_repr(self) -> str:
        sparse = "" if self.sparse is None else f", sparse={self.sparse}"
        return f"algorithm={self.algorithm!r}, layout={self.layout!r}, causal={self.causal}{sparse}"


def sequence_parallel_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    algorithm: str = "auto",
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` over sequence shards.

    query: (batch, heads_q, seqlen_local, head_dim); key, value: (batch, heads_kv, seqlen_local, head_dim),
    SDPA's layout; returns (batch, heads_q, seqlen_local, head_dim). Swap it in for SDPA with
    ``functools.partial(sequence_parallel_sdpa, group=..., layout=...)``. Arbitrary ``attn_mask`` and dropout
    are not supported across shards and raise.
    """
    if attn_mask is not None:
        raise ValueError(
            "sequence_parallel_sdpa: attn_mask is not supported across sequence shards; use is_causal"
        )
    if dropout_p != 0.0:
        raise ValueError(f"sequence_parallel_sdpa: dropout_p must be 0.0; got {dropout_p}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA, as with SDPA"
        )
    out = sequence_parallel_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), group=group, causal=is_causal,
        softmax_scale=scale, layout=layout, algorithm=algorithm,
    )  # fmt: skip
    return out.transpose(1, 2)
