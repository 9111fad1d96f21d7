"""Triton XAttention antidiagonal block scorer (GPU path of ``longmoe.attention.xattention_estimate``).

Layout: ``q: (batch, seqlen_q, nheads, headdim)``, ``k: (batch, seqlen_k, nheads_kv, headdim)`` with
``nheads % nheads_kv == 0`` (GQA/MQA: the kernel indexes the kv head ``h // (nheads // nheads_kv)``; K is
never repeated). Output: per-query-head block scores ``(batch, nheads, cdiv(seqlen_q, block_size),
cdiv(seqlen_k, block_size))`` fp32, exactly the reference's ``blocks`` before GQA averaging (see
``longmoe.attention.xattention``).

One program per (query block, batch * head). With stride S and R = block_size / S groups per block, the
antidiagonal scores of a (query block, key block) tile are ``Q_r K_r^T = sum_i Q_i K_i^T`` where ``Q_i`` are
the rows ``r*S + S-1-i`` of the block's query groups and ``K_i`` the rows ``j*S + i`` of the key groups:
S strided ``[R, D] x [D, R]`` dots, so nothing is regrouped in memory. The softmax over each query group's
visible key groups takes two passes over the key blocks (running max and sum, then the normalised
probabilities summed per key block), recomputing the dots instead of storing an ``(L/S)``-wide row.

Under ``TRITON_INTERPRET=1`` (CPU tensors) bf16/fp16 operands are upcast to fp32 right after loading (the
interpreter keeps bf16 as raw uint16 and its fp16 dot is not fp32-accumulated); on CUDA the dots run in
the input dtype with fp32 accumulators.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["xattn_block_scores_triton"]

_LOG2E = 1.4426950408889634
# triton.jit reads TRITON_INTERPRET when it decorates the kernel below, i.e. at this module's import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _xattn_tile_scores(
    Q,
    K,
    rows,
    cols,
    offs_d,
    row_ok,
    col_ok,
    stride_qm,
    stride_kn,
    seqlen_q,
    seqlen_k,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Antidiagonal sums of the (query groups ``rows``, key groups ``cols``) tile: [BLOCK_R, BLOCK_R] fp32."""
    acc = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    d_ok = offs_d < HEAD_DIM
    for i in range(STRIDE):
        qpos = rows * STRIDE + (STRIDE - 1 - i)
        kpos = cols * STRIDE + i
        qm = (row_ok & (qpos < seqlen_q))[:, None] & d_ok[None, :]
        km = (col_ok & (kpos < seqlen_k))[:, None] & d_ok[None, :]
        q = tl.load(Q + qpos[:, None] * stride_qm + offs_d[None, :], mask=qm, other=0.0)
        k = tl.load(K + kpos[:, None] * stride_kn + offs_d[None, :], mask=km, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _xattn_block_scores_kernel(
    Q,
    K,
    Out,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_ob,
    stride_oh,
    stride_om,
    seqlen_q,
    seqlen_k,
    n_kblocks,
    q_offset,
    group,
    nheads,
    qk_scale_log2,
    STRIDE: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    Out += b.to(tl.int64) * stride_ob + h * stride_oh + qb * stride_om
    R: tl.constexpr = GROUPS_PER_BLOCK
    BS: tl.constexpr = STRIDE * GROUPS_PER_BLOCK
    offs = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rows = qb * R + offs
    row_ok = (offs < R) & (rows * STRIDE < seqlen_q)  # real query groups (padding groups are dropped)
    n_rows = tl.minimum(R, (seqlen_q + STRIDE - 1) // STRIDE - qb * R)
    if CAUSAL:
        # Key blocks up to the one holding the last key group visible to the block's last real group.
        last = q_offset + (qb * R + n_rows - 1) * STRIDE + STRIDE - 1
        n_kb = tl.minimum((tl.maximum(last, -1) + BS) // BS, n_kblocks)
    else:
        n_kb = n_kblocks
    # Pass 1: running max and sum of exp per query group (base 2).
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for kb in range(0, n_kb):
        cols = kb * R + offs
        col_ok = (offs < R) & (cols * STRIDE < seqlen_k)
        s = _xattn_tile_scores(Q, K, rows, cols, offs_d, row_ok, col_ok, stride_qm, stride_kn, seqlen_q, seqlen_k,
                               STRIDE, HEAD_DIM, BLOCK_R, UPCAST, INPUT_PRECISION)  # fmt: skip
        vis = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] * STRIDE <= q_offset + rows[:, None] * STRIDE + STRIDE - 1)
        s = tl.where(vis, s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # Pass 2: normalised probabilities summed per key block, averaged over the block's real query groups.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # rows with no visible key group: 0
    for kb in range(0, n_kb):
        cols = kb * R + offs
        col_ok = (offs < R) & (cols * STRIDE < seqlen_k)
        s = _xattn_tile_scores(Q, K, rows, cols, offs_d, row_ok, col_ok, stride_qm, stride_kn, seqlen_q, seqlen_k,
                               STRIDE, HEAD_DIM, BLOCK_R, UPCAST, INPUT_PRECISION)  # fmt: skip
        vis = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] * STRIDE <= q_offset + rows[:, None] * STRIDE + STRIDE - 1)
        p = tl.where(vis, tl.exp2(s * qk_scale_log2 - m_safe[:, None]) * inv_l[:, None], 0.0)
        tl.store(Out + kb, tl.sum(tl.sum(p, 1), 0) / n_rows)


def xattn_block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    stride: int,
    block_size: int,
    causal: bool,
    q_offset: int,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Per-query-head block scores (batch, nheads, cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size)) fp32.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_kv, headdim); ``q_offset`` is the
    absolute position of the first query (resolved by the caller; may be negative); ``softmax_scale`` the
    attention's logit scale (default ``1/sqrt(headdim)``), the antidiagonal sums are scaled by
    ``softmax_scale / stride``. Arguments are checked by ``longmoe.attention.xattention_estimate``.
    """
    interpreted = q.device.type == "cpu"
    if interpreted and not _INTERPRETED:
        raise RuntimeError(
            "Triton XAttention scorer got CPU tensors but runs compiled: set TRITON_INTERPRET=1 before "
            "longmoe.kernels.xattention is imported, or use the native/reference backend on CPU"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    nqb, nkb = triton.cdiv(lq, block_size), triton.cdiv(lk, block_size)
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    r = block_size // stride
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    scale_log2 = _LOG2E * scale / stride
    _xattn_block_scores_kernel[(nqb, b * hq)](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lq, lk, nkb, q_offset, hq // hkv, hq, scale_log2,
        STRIDE=stride,
        GROUPS_PER_BLOCK=r,
        HEAD_DIM=d,
        BLOCK_R=max(16, triton.next_power_of_2(r)),  # tl.dot needs >= 16 rows and columns
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        CAUSAL=bool(causal),
        UPCAST=interpreted and q.dtype != torch.float32,
        # fp32 inputs follow torch's matmul setting (TF32 off by default) so results match torch fp32.
        INPUT_PRECISION="tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee",
        num_warps=4,
    )  # fmt: skip
    return out
