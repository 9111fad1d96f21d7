"""XAttention (arXiv 2503.16428): antidiagonal block scoring and block-sparse attention.

The sum of each ``stride x stride`` tile's antidiagonal is a cheap proxy for the tile's attention mass.
Regrouping keys as ``K_r[j] = concat_i K[j*S + i]`` and queries in reverse as ``Q_r[r] = concat_i
Q[r*S + S-1-i]`` turns every antidiagonal sum into one entry of ``Q_r K_r^T`` (inner dimension ``S*d``,
cost about ``L^2 d / S``). Scaled by ``1/(sqrt(d) * S)``, masked causally on the stride grid and
softmax-normalised per row in fp32, the entries are summed over each ``(block/S) x (block/S)`` sub-grid to
give block scores; per (head, query block) the highest-scoring key blocks are kept until their share of
the row reaches the threshold (the block that crosses it is kept). Causal rows always keep the first key
block (attention sink) and their diagonal block.

This module holds the estimator (per-head block scores from the C++ op ``longmoe::xattn_block_scores``
on CPU, the Triton kernel ``longmoe.kernels.xattention`` on CUDA, or the pure-PyTorch math; then the GQA
group mean and the selection, shared by every backend), its reference ``xattention_estimate_ref``, the
block-sparse attention entry on top of the attention core's block mask, and ``xattention`` combining both.

Conventions: q ``(batch, seqlen_q, heads_q, head_dim)``, k/v ``(batch, seqlen_k, heads_kv, head_dim)``.
Queries are at absolute positions ``q_offset .. q_offset + seqlen_q - 1`` (default ``seqlen_k - seqlen_q``:
the last query sees the last key, as the attention core aligns causal). With GQA the estimator scores each
query head against its KV head and averages the block scores of the heads that share a KV head (the
group), so one mask serves the group and the KV tiles it skips are skipped for all of its query heads.
"""

from __future__ import annotations

import math

import torch

from longmoe.attention.flash_attention import flash_attention
from longmoe.runtime.backend import select_backend
from longmoe.runtime.native import register_fake

__all__ = ["xattention_estimate", "xattention_estimate_ref", "block_sparse_attention", "xattention"]


def _check_estimate_args(q, k, stride, block_size, threshold, causal, q_offset):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, seqlen, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"heads_q={q.shape[2]} must be a multiple of heads_kv={k.shape[2]}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int; got {stride!r}")
    if not isinstance(block_size, int) or block_size < 1 or block_size % stride:
        raise ValueError(f"block_size={block_size!r} must be a positive multiple of stride={stride}")
    heads = q.shape[2]
    if isinstance(threshold, torch.Tensor):
        if threshold.shape not in ((heads,), ()):
            raise ValueError(
                f"threshold tensor must have shape (heads_q,) = ({heads},); got {tuple(threshold.shape)}"
            )
        bad = (threshold <= 0) | (threshold > 1) | torch.isnan(threshold)
        if bool(bad.any()):
            raise ValueError(f"threshold values must be in (0, 1]; got {threshold.tolist()}")
    elif not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    if q_offset is not None and (not isinstance(q_offset, int) or q_offset < 0):
        raise ValueError(f"q_offset must be a non-negative int; got {q_offset!r}")


def _block_scores_ref(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool, off: int
) -> torch.Tensor:
    """Per-query-head block scores (batch, heads_q, nqb, nkb) before GQA averaging, in fp32 (fp64 for fp64).

    The math every backend implements (``torch.ops.longmoe.xattn_block_scores``,
    ``longmoe.kernels.xattention``); ``off`` is the resolved absolute position of the first query.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = stride
    # Pad the sequences to multiples of the block size; padded keys are masked, padded queries dropped.
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    lq_p, lk_p = nqb * block_size, nkb * block_size
    qp = torch.zeros(b, lq_p, hq, d, dtype=acc, device=q.device)
    kp = torch.zeros(b, lk_p, hkv, d, dtype=acc, device=k.device)
    qp[:, :lq] = q.to(acc)
    kp[:, :lk] = k.to(acc)
    group = hq // hkv
    kp = kp.repeat_interleave(group, dim=2) if group > 1 else kp
    # Regroup: key group j = concat of K rows jS..jS+S-1; query group r = rows rS+S-1..rS (reversed).
    kr = kp.view(b, lk_p // s, s, hq, d).permute(0, 3, 1, 2, 4).reshape(b, hq, lk_p // s, s * d)
    qr = qp.view(b, lq_p // s, s, hq, d).flip(2).permute(0, 3, 1, 2, 4).reshape(b, hq, lq_p // s, s * d)
    scores = torch.matmul(qr, kr.transpose(-1, -2)) / (math.sqrt(d) * s)  # (B, H, Lq/S, Lk/S)
    gq = torch.arange(lq_p // s, device=q.device)
    gk = torch.arange(lk_p // s, device=q.device)
    visible = (gk * s < lk)[None, :].expand(gq.numel(), -1)  # padded keys
    if causal:
        # A key group is visible to a query group if its first key is at or before the group's last query.
        visible = visible & (gk[None, :] * s <= (off + gq[:, None] * s + s - 1))
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    real_q = gq * s < lq  # query groups holding at least one real query (padding groups are dropped)
    probs = torch.nan_to_num(probs, nan=0.0) * real_q[:, None]  # rows with no visible key group: 0
    r = block_size // s
    blocks = probs.view(b, hq, nqb, r, nkb, r).sum(dim=(3, 5))  # (B, H, nqb, nkb)
    # Average over the block's real query groups, so a block row is a distribution over key blocks.
    return blocks / real_q.view(nqb, r).sum(-1).clamp(min=1).to(acc)[:, None]


def _group_mean(blocks: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(batch, heads_q, nqb, nkb) per-head scores -> the mean over each KV group, repeated per query head."""
    b, hq = blocks.shape[:2]
    group = hq // heads_kv
    if group == 1:
        return blocks
    return blocks.view(b, heads_kv, group, *blocks.shape[2:]).mean(2).repeat_interleave(group, dim=1)


def _select_blocks(
    blocks: torch.Tensor,
    threshold: float | torch.Tensor,
    causal: bool,
    off: int,
    seqlen_q: int,
    block_size: int,
) -> torch.Tensor:
    """Bool mask like ``blocks``: per row, the top blocks until their share reaches ``threshold`` (the block
    that crosses it is kept); causal rows also keep the sink (first) and their diagonal key block."""
    b, hq, nqb, nkb = blocks.shape
    dev, acc = blocks.device, blocks.dtype
    # Selection: descending order, keep while the mass before a block is below the threshold.
    tau = threshold if isinstance(threshold, torch.Tensor) else torch.tensor(float(threshold))
    tau = tau.to(device=dev, dtype=acc).reshape(-1, 1, 1) if tau.dim() == 1 else tau.to(dev, acc)
    sorted_scores, order = torch.sort(blocks, dim=-1, descending=True)
    before = torch.cumsum(sorted_scores, dim=-1) - sorted_scores
    total = sorted_scores.sum(-1, keepdim=True)
    keep_sorted = (before < tau * total) & (sorted_scores > 0)
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if causal:
        qb = torch.arange(nqb, device=dev)
        last_q = torch.clamp(off + (qb + 1) * block_size - 1, max=off + seqlen_q - 1)
        diag = torch.div(last_q, block_size, rounding_mode="floor").clamp(max=nkb - 1)
        has_keys = off + qb * block_size >= 0  # every query block with a visible key keeps sink and diagonal
        mask[..., 0] |= has_keys
        mask.scatter_(-1, diag.view(1, 1, -1, 1).expand(b, hq, -1, 1), True)
    return mask


@torch.no_grad()
def xattention_estimate_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    threshold: float | torch.Tensor = 0.9,
    causal: bool = True,
    q_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antidiagonal block scores and the selected block mask, in plain PyTorch (fp32, fp64 for fp64 inputs).

    Args:
        q: (batch, seqlen_q, heads_q, head_dim); k: (batch, seqlen_k, heads_kv, head_dim).
        stride: antidiagonal length S; block_size: a multiple of S.
        threshold: keep-mass fraction in (0, 1], a float or a (heads_q,) tensor of per-head thresholds
            (with GQA each query head applies its own threshold to its group's averaged scores).
        causal: mask future key groups, aligned at ``q_offset``.
        q_offset: absolute position of the first query (default ``seqlen_k - seqlen_q``).

    Returns:
        block_scores: (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)) fp32 (fp64),
            each row a distribution over key blocks (rows with no visible key are 0); with GQA the scores
            are averaged over the query heads of a KV group and repeated for each of them.
        block_mask: bool, same shape, the tiles to compute.
    """
    _check_estimate_args(q, k, stride, block_size, threshold, causal, q_offset)
    lq, lk = q.shape[1], k.shape[1]
    off = lk - lq if q_offset is None else q_offset
    blocks = _group_mean(_block_scores_ref(q, k, stride, block_size, causal, off), k.shape[2])
    return blocks, _select_blocks(blocks, threshold, causal, off, lq, block_size)


@torch.no_grad()
@register_fake("xattn_block_scores")
def _xattn_block_scores_fake(q, k, stride, block_size, causal, q_offset):
    """Fake (meta) kernel of the C++ op, for torch.compile: (batch, heads_q, q blocks, k blocks) fp32."""
    nqb, nkb = -(-q.shape[1] // block_size), -(-k.shape[1] // block_size)
    return q.new_empty((q.shape[0], q.shape[2], nqb, nkb), dtype=torch.float32)


def xattention_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    threshold: float | torch.Tensor = 0.9,
    causal: bool = True,
    q_offset: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores and block mask (see :func:`xattention_estimate_ref` for shapes and semantics).

    The per-head block scores come from ``torch.ops.longmoe.xattn_block_scores`` (C++, CPU tensors), the
    Triton kernel ``longmoe.kernels.xattention`` (CUDA, or CPU under ``TRITON_INTERPRET=1`` when
    ``backend='triton'``) or the reference math, chosen by :func:`longmoe.runtime.select_backend`; fp64
    inputs always take the reference math (the kernels compute in fp32). The GQA group mean and the
    selection are shared PyTorch code. Scores are fp32 (fp64 for fp64 inputs).
    """
    _check_estimate_args(q, k, stride, block_size, threshold, causal, q_offset)
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(
            f"q and k must share dtype and device; got {q.dtype}/{q.device} and {k.dtype}/{k.device}"
        )
    lq, lk = q.shape[1], k.shape[1]
    off = lk - lq if q_offset is None else q_offset
    name = select_backend(q, backend=backend)
    if name in ("native", "triton") and q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        name = "reference"  # the kernels compute in fp32; fp64 is the test oracle's dtype
    if name == "native":
        blocks = torch.ops.longmoe.xattn_block_scores(q, k, stride, block_size, bool(causal), off)
    elif name == "triton":
        from longmoe.kernels.xattention import xattn_block_scores_triton  # noqa: PLC0415

        blocks = xattn_block_scores_triton(q, k, stride, block_size, bool(causal), off)
    else:
        blocks = _block_scores_ref(q, k, stride, block_size, causal, off)
    blocks = _group_mean(blocks, k.shape[2])
    return blocks, _select_blocks(blocks, threshold, causal, off, lq, block_size)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention over the tiles ``block_mask`` keeps (masked tiles are skipped, not computed), with autograd.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim); block_mask: bool
    (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)). Returns out like q (and lse
    (batch, heads_q, seqlen_q) fp32). An all-ones mask equals dense attention.
    """
    return flash_attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, block_mask=block_mask,
        block_size=block_size, backend=backend,
    )  # fmt: skip


def xattention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float | torch.Tensor = 0.9,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_density: bool = False,
    backend: str | None = None,
):
    """XAttention: estimate the block mask (no gradient), then block-sparse attention (with autograd).

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim). Returns out like q,
    and with ``return_density`` the kept fraction of the causally visible tiles (a float). ``backend``
    (``native`` / ``triton`` / ``reference``) forces one for both the estimate and the attention.
    """
    _, mask = xattention_estimate(q.detach(), k.detach(), stride=stride, block_size=block_size,
                                  threshold=threshold, causal=causal, backend=backend)  # fmt: skip
    out = block_sparse_attention(
        q, k, v, mask, block_size=block_size, causal=causal, softmax_scale=softmax_scale, backend=backend
    )
    if not return_density:
        return out
    visible = _visible_tiles(q.shape[1], k.shape[1], block_size, causal, q.device)
    kept = (mask & visible).sum().item()
    return out, kept / max(visible.sum().item() * q.shape[0] * q.shape[2], 1)


def _visible_tiles(lq: int, lk: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """(nqb, nkb) bool: tiles holding at least one (query, key) pair the causal mask lets through."""
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    off = lk - lq
    last_q = torch.clamp(off + (torch.arange(nqb, device=device) + 1) * block_size - 1, max=off + lq - 1)
    first_k = torch.arange(nkb, device=device) * block_size
    return first_k[None, :] <= last_q[:, None]
