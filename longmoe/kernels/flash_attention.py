"""Triton flash attention (GPU path of longmoe's attention core), forward and backward, returning LSE.

Layout follows flash-attention: ``q: (batch, seqlen_q, nheads, headdim)``,
``k, v: (batch, seqlen_k, nheads_kv, headdim)`` with ``nheads % nheads_kv == 0`` (GQA/MQA: the kernels
index the kv head ``h // (nheads // nheads_kv)``, K/V are never repeated). ``lse: (batch, nheads, seqlen_q)``
is fp32, natural log of the scaled scores. Causal with ``seqlen_q != seqlen_k`` is aligned bottom-right:
query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``. A query row that sees no key gets output 0
and LSE ``-inf`` (never NaN), and zero gradients.

Block sparsity: ``block_mask: (batch, nheads, cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size))``
bool. The launcher turns it (combined with causal at block granularity) into per-row lists of kept block
indices, FlexAttention-style (``count`` + ascending ``index``), so the kernels loop only over kept blocks:
cost scales with the kept fraction, and masked K/V tiles are never loaded. Broadcast (stride-0) batch or head
dims of the mask stay broadcast in the lists.

The backward pass is FA2's: ``delta = rowsum(dout * out)`` (a small preprocess kernel), then one kernel over
(kv tile, batch, kv head) that accumulates dK/dV in registers while looping over the q heads of its GQA group
(no atomics, no per-q-head fp32 buffers), and one kernel over (q tile, batch, q head) for dQ.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the same kernels run in the Triton interpreter, which stores
bf16 as raw uint16: bf16 operands are upcast to fp32 right after loading there (``UPCAST``); on CUDA the dots
run in the input dtype with fp32 accumulators.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention_forward_triton", "flash_attention_backward_triton"]

_LOG2E = 1.4426950408889634
# triton.jit reads TRITON_INTERPRET when it decorates the kernels below, i.e. at this module's import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _flash_attn_fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    start_n,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seqlen_q,
    seqlen_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) step of the online softmax; scores live in the log2 domain."""
    cols = start_n + offs_n
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    cols64 = cols.to(tl.int64)
    k = tl.load(K + cols64[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols64[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    valid = cols[None, :] < seqlen_k
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no visible key so far has m_new = -inf; exp2(-inf - -inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _flash_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KvCount,
    KvIndex,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_om,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_ib,
    stride_ih,
    stride_im,
    nheads,
    group_size,
    seqlen_q,
    seqlen_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    off_hk = off_h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + offs_m.to(tl.int64)[:, None] * stride_qm
        + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_MASK:
        # BLOCK_M divides MASK_BLOCK, so this tile lies in one query block; walk its kept key blocks.
        qb = (pid_m * BLOCK_M) // MASK_BLOCK
        count = tl.load(KvCount + off_b * stride_cb + off_h * stride_ch + qb * stride_cm)
        index = KvIndex + off_b * stride_ib + off_h * stride_ih + qb * stride_im
        for t in range(0, count * (MASK_BLOCK // BLOCK_N)):
            kb = tl.load(index + t // (MASK_BLOCK // BLOCK_N))
            start_n = kb * MASK_BLOCK + (t % (MASK_BLOCK // BLOCK_N)) * BLOCK_N
            acc, m_i, l_i = _flash_attn_fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                K,
                V,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                stride_kn,
                stride_vn,
                seqlen_q,
                seqlen_k,
                qk_scale,
                HEAD_DIM,
                CAUSAL,
                UPCAST,
                INPUT_PRECISION,
            )
    else:
        hi = seqlen_k
        if CAUSAL:
            hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
        for start_n in range(0, hi, BLOCK_N):
            acc, m_i, l_i = _flash_attn_fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                K,
                V,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                stride_kn,
                stride_vn,
                seqlen_q,
                seqlen_k,
                qk_scale,
                HEAD_DIM,
                CAUSAL,
                UPCAST,
                INPUT_PRECISION,
            )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    tl.store(
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=q_mask,
    )
    tl.store(Lse + (off_b * nheads + off_h) * seqlen_q + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_om,
    stride_oh,
    stride_db,
    stride_dm,
    stride_dh,
    nheads,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d], in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + rows64 * stride_om + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + off_b * stride_db + off_h * stride_dh + rows64 * stride_dm + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(Delta + (off_b * nheads + off_h) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _flash_attn_bwd_dkdv_tile(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    Lse,
    Delta,
    start_m,
    offs_m,
    offs_n,
    offs_d,
    stride_qm,
    stride_dom,
    seqlen_q,
    seqlen_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate one q tile's contribution to this program's dK/dV tile (dK still unscaled)."""
    rows = start_m + offs_m
    row_ok = rows < seqlen_q
    rows64 = rows.to(tl.int64)
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + rows64[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Rows that saw no key (lse = -inf) contribute nothing: +inf makes p = exp2(s - inf) = 0, never NaN.
    lse = tl.load(Lse + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # ln -> log2
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    valid = row_ok[:, None] & (offs_n[None, :] < seqlen_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= rows[:, None] + (seqlen_k - seqlen_q))
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    QCount,
    QIndex,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_cb,
    stride_ch,
    stride_cn,
    stride_ib,
    stride_ih,
    stride_in,
    nheads,
    nheads_kv,
    group_size,
    seqlen_q,
    seqlen_k,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads_kv).to(tl.int64)
    off_hk = (pid_bh % nheads_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols64 = offs_n.to(tl.int64)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K + off_b * stride_kb + off_hk * stride_kh + cols64[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_hk * stride_vh + cols64[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The q heads of this kv head's GQA group are summed here, in registers: no atomics, no fp32 buffers.
    for g in range(0, group_size):
        off_h = off_hk * group_size + g
        Qh = Q + off_b * stride_qb + off_h * stride_qh
        DOh = DO + off_b * stride_dob + off_h * stride_doh
        Lseh = Lse + (off_b * nheads + off_h) * seqlen_q
        Deltah = Delta + (off_b * nheads + off_h) * seqlen_q
        if HAS_MASK:
            kb = start_n // MASK_BLOCK
            count = tl.load(QCount + off_b * stride_cb + off_h * stride_ch + kb * stride_cn)
            index = QIndex + off_b * stride_ib + off_h * stride_ih + kb * stride_in
            for t in range(0, count * (MASK_BLOCK // BLOCK_M)):
                qb = tl.load(index + t // (MASK_BLOCK // BLOCK_M))
                start_m = qb * MASK_BLOCK + (t % (MASK_BLOCK // BLOCK_M)) * BLOCK_M
                dk, dv = _flash_attn_bwd_dkdv_tile(
                    dk,
                    dv,
                    k,
                    v,
                    Qh,
                    DOh,
                    Lseh,
                    Deltah,
                    start_m,
                    offs_m,
                    offs_n,
                    offs_d,
                    stride_qm,
                    stride_dom,
                    seqlen_q,
                    seqlen_k,
                    qk_scale,
                    HEAD_DIM,
                    CAUSAL,
                    UPCAST,
                    INPUT_PRECISION,
                )
        else:
            lo = 0
            if CAUSAL:
                # First query row that sees key start_n, rounded down to a tile.
                lo = (tl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M) * BLOCK_M
            for start_m in range(lo, seqlen_q, BLOCK_M):
                dk, dv = _flash_attn_bwd_dkdv_tile(
                    dk,
                    dv,
                    k,
                    v,
                    Qh,
                    DOh,
                    Lseh,
                    Deltah,
                    start_m,
                    offs_m,
                    offs_n,
                    offs_d,
                    stride_qm,
                    stride_dom,
                    seqlen_q,
                    seqlen_k,
                    qk_scale,
                    HEAD_DIM,
                    CAUSAL,
                    UPCAST,
                    INPUT_PRECISION,
                )

    dk = dk * sm_scale
    tl.store(
        DK + off_b * stride_dkb + off_hk * stride_dkh + cols64[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + off_b * stride_dvb + off_hk * stride_dvh + cols64[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _flash_attn_bwd_dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    start_n,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seqlen_q,
    seqlen_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate one kv tile's contribution to this program's dQ tile (still unscaled)."""
    cols = start_n + offs_n
    cols64 = cols.to(tl.int64)
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + cols64[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols64[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    valid = (offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _flash_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    KvCount,
    KvIndex,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dqb,
    stride_dqm,
    stride_dqh,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_ib,
    stride_ih,
    stride_im,
    nheads,
    group_size,
    seqlen_q,
    seqlen_k,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // nheads).to(tl.int64)
    off_h = (pid_bh % nheads).to(tl.int64)
    off_hk = off_h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + (off_b * nheads + off_h) * seqlen_q + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # ln -> log2
    delta = tl.load(Delta + (off_b * nheads + off_h) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_MASK:
        qb = (pid_m * BLOCK_M) // MASK_BLOCK
        count = tl.load(KvCount + off_b * stride_cb + off_h * stride_ch + qb * stride_cm)
        index = KvIndex + off_b * stride_ib + off_h * stride_ih + qb * stride_im
        for t in range(0, count * (MASK_BLOCK // BLOCK_N)):
            kb = tl.load(index + t // (MASK_BLOCK // BLOCK_N))
            start_n = kb * MASK_BLOCK + (t % (MASK_BLOCK // BLOCK_N)) * BLOCK_N
            dq = _flash_attn_bwd_dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                K,
                V,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                stride_kn,
                stride_vn,
                seqlen_q,
                seqlen_k,
                qk_scale,
                HEAD_DIM,
                CAUSAL,
                UPCAST,
                INPUT_PRECISION,
            )
    else:
        hi = seqlen_k
        if CAUSAL:
            hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
        for start_n in range(0, hi, BLOCK_N):
            dq = _flash_attn_bwd_dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                K,
                V,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                stride_kn,
                stride_vn,
                seqlen_q,
                seqlen_k,
                qk_scale,
                HEAD_DIM,
                CAUSAL,
                UPCAST,
                INPUT_PRECISION,
            )

    dq = dq * sm_scale
    tl.store(
        DQ + off_b * stride_dqb + off_h * stride_dqh + rows64[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages). CUDA: the Triton fused-attention tutorial / FA2 defaults
# (forward 128x64; backward 64x64 keeps q, dO, k, v, dK, dV tiles of headdim 128 in registers); not tuned
# here, no machine of this project has a GPU. Interpreter: cost grows with the number of programs and loop
# steps, not with tile area, so it uses tiles as large as the test shapes allow while still exercising
# several tiles per row (seqlen 97 -> 4 tiles of 32).
_CUDA_FWD_TILES = (128, 64)
_CUDA_BWD_TILES = (64, 64)
_INTERPRETER_TILES = (32, 32)


def _pick_tile(preferred: int, seqlen: int, block_size: int | None) -> int:
    """Largest power of two <= preferred (>= 16, the tl.dot minimum) dividing block_size, no larger than
    needed for seqlen."""
    tile = max(16, min(preferred, triton.next_power_of_2(max(seqlen, 1))))
    if block_size is not None:
        while block_size % tile:
            tile //= 2
    return tile


def _launch_config(q: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: int | None, backward: bool):
    interpreted = q.device.type == "cpu"
    if interpreted and not _INTERPRETED:
        raise RuntimeError(
            "Triton flash attention got CPU tensors but runs compiled: set TRITON_INTERPRET=1 before "
            "longmoe.kernels.flash_attention is imported, or use the native/reference backend on CPU"
        )
    bm, bn = _INTERPRETER_TILES if interpreted else (_CUDA_BWD_TILES if backward else _CUDA_FWD_TILES)
    head_dim = q.shape[-1]
    return dict(
        BLOCK_M=_pick_tile(bm, seqlen_q, block_size),
        BLOCK_N=_pick_tile(bn, seqlen_k, block_size),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM=head_dim,
        # The interpreter keeps bf16 as raw uint16 (its dot and arithmetic would be wrong): upcast there.
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        # fp32 inputs follow torch's matmul setting (TF32 off by default) so results match torch fp32.
        INPUT_PRECISION=(
            "tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
        ),
        num_warps=4 if head_dim <= 64 else 8,
        num_stages=2 if backward else 3,
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, seqlen, nheads, headdim); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and headdim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"nheads of q ({q.shape[2]}) must be a multiple of nheads of k/v ({k.shape[2]})")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one dtype of {_SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[3] > 256:
        raise ValueError(f"headdim {q.shape[3]} > 256 is not supported by the Triton kernels")


def _check_block_mask(block_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, block_size: int):
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
        raise ValueError(
            f"block_size must be a positive multiple of 16 (tl.dot's minimum tile); got {block_size}"
        )
    if block_mask is None:
        return
    batch, seqlen_q, nheads, _ = q.shape
    expected = (batch, nheads, triton.cdiv(seqlen_q, block_size), triton.cdiv(k.shape[1], block_size))
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool; got {block_mask.dtype}")
    if tuple(block_mask.shape) != expected:
        raise ValueError(
            f"block_mask must have shape (batch, nheads, cdiv(seqlen_q, block_size), "
            f"cdiv(seqlen_k, block_size)) = {expected} for block_size={block_size}; got {tuple(block_mask.shape)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")


def _block_lists(
    block_mask: torch.Tensor, causal: bool, seqlen_q: int, seqlen_k: int, block_size: int, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept blocks per row of the block mask (rows are q blocks, or k blocks when transpose=True),
    combined with causal at block granularity.

    Returns ``count: (batch, nheads, rows)`` int32 and ``index: (batch, nheads, rows, cols)`` int32, whose
    first ``count`` entries are the kept column blocks in ascending order. Batch/head dims that are broadcast
    (stride 0) in ``block_mask`` stay broadcast. No host synchronisation.
    """
    batch, nheads = block_mask.shape[:2]
    mask = block_mask
    for dim in (0, 1):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    if causal:
        n_qb, n_kb = mask.shape[2:]
        q_last = torch.clamp((torch.arange(n_qb, device=mask.device) + 1) * block_size, max=seqlen_q) - 1
        k_first = torch.arange(n_kb, device=mask.device) * block_size
        mask = mask & (k_first[None, :] <= q_last[:, None] + (seqlen_k - seqlen_q))
    if transpose:
        mask = mask.transpose(-1, -2)
    count = mask.sum(-1, dtype=torch.int32)
    # Stable sort puts the kept blocks first, in ascending block order.
    index = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    index = index.to(torch.int32).contiguous()
    return count.expand(batch, nheads, -1), index.expand(batch, nheads, -1, -1)


def _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, transpose, device):
    if block_mask is None:
        dummy = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device)
        return (dummy, dummy, 0, 0, 0, 0, 0, 0)
    count, index = _block_lists(block_mask, causal, seqlen_q, seqlen_k, block_size, transpose)
    assert index.stride(-1) == 1 or index.shape[-1] == 1  # the kernels read index[..., t] at offset t
    return (count, index, *count.stride(), *index.stride()[:3])


def flash_attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward with Triton.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim), nheads % nheads_kv
    == 0; any strides (the last dim is made contiguous if it is not). block_mask: None (dense) or bool
    (batch, nheads, cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size)); tile (qb, kb) is computed only
    where True (and, when causal, where some query of qb sees some key of kb).

    Returns out: (batch, seqlen_q, nheads, headdim) in ``out_dtype`` (default q's dtype; float32 keeps ring
    partials unrounded), and lse: (batch, nheads, seqlen_q) fp32,
    natural log of the scaled scores; rows with no visible key get out 0 and lse -inf.
    """
    _check_qkv(q, k, v)
    _check_block_mask(block_mask, q, k, block_size)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    # The dense path ignores MASK_BLOCK; a fixed value avoids one compilation per block_size.
    mask_block = block_size if block_mask is not None else 16
    cfg = _launch_config(
        q, seqlen_q, seqlen_k, block_size if block_mask is not None else None, backward=False
    )
    mask_args = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, False, q.device)
    grid = (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * nheads)
    _flash_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        mask_args[0],
        mask_args[1],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        *mask_args[2:],
        nheads,
        nheads // nheads_kv,
        seqlen_q,
        seqlen_k,
        softmax_scale * _LOG2E,
        MASK_BLOCK=mask_block,
        CAUSAL=bool(causal),
        HAS_MASK=block_mask is not None,
        **cfg,
    )
    return out, lse


def flash_attention_backward_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    delta: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward with Triton (FA2 schedule).

    dout, out: (batch, seqlen_q, nheads, headdim); q, k, v as in the forward; lse: (batch, nheads, seqlen_q)
    fp32, natural log -- out and lse are taken as given (for a ring they are the global ones), not
    recomputed. ``delta`` (batch, nheads, seqlen_q) fp32 = rowsum(dout * out) may be given instead of out
    (ring backward sends it instead of out). Rows with lse -inf contribute nothing. Returns dq, dk, dv shaped
    like q, k, v in ``grad_dtype`` (default the input dtype; accumulated in fp32).
    """
    _check_qkv(q, k, v)
    _check_block_mask(block_mask, q, k, block_size)
    if out is None and delta is None:
        raise ValueError(
            "flash_attention_backward_triton needs out or delta = rowsum(dout * out); got neither"
        )
    ref_out = out if out is not None else dout
    if dout.shape != q.shape or ref_out.shape != q.shape:
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(ref_out.shape)} must have q's shape {tuple(q.shape)}"
        )
    if (
        dout.dtype != q.dtype
        or dout.device != q.device
        or ref_out.device != q.device
        or lse.device != q.device
    ):
        raise TypeError(
            f"dout must have q's dtype {q.dtype} and dout, out, lse q's device {q.device}; got dout "
            f"{dout.dtype} on {dout.device}, out on {ref_out.device}, lse on {lse.device}"
        )
    batch, seqlen_q, nheads, head_dim = q.shape
    if lse.shape != (batch, nheads, seqlen_q) or lse.dtype != torch.float32:
        raise ValueError(
            f"lse must be fp32 of shape {(batch, nheads, seqlen_q)}; got {lse.dtype} {tuple(lse.shape)}"
        )
    q, k, v, dout = (_last_dim_contiguous(x) for x in (q, k, v, dout))
    lse = lse.contiguous()
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    gdt = grad_dtype or q.dtype
    dq = torch.empty((batch, seqlen_q, nheads, head_dim), dtype=gdt, device=q.device)
    dk = torch.empty((batch, seqlen_k, nheads_kv, head_dim), dtype=gdt, device=k.device)
    dv = torch.empty((batch, seqlen_k, nheads_kv, head_dim), dtype=gdt, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    mask_block = block_size if block_mask is not None else 16
    cfg = _launch_config(q, seqlen_q, seqlen_k, block_size if block_mask is not None else None, backward=True)
    group_size = nheads // nheads_kv
    qk_scale = softmax_scale * _LOG2E

    if delta is not None:
        if (
            delta.shape != (batch, nheads, seqlen_q)
            or delta.dtype != torch.float32
            or delta.device != q.device
        ):
            raise ValueError(
                f"delta must be fp32 {(batch, nheads, seqlen_q)} on {q.device}; got {delta.dtype} "
                f"{tuple(delta.shape)} on {delta.device}"
            )
        delta = delta.contiguous()
    else:
        out = _last_dim_contiguous(out)
        delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
        pre_block = 64
        _flash_attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, pre_block), batch * nheads)](
            out,
            dout,
            delta,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            nheads,
            seqlen_q,
            HEAD_DIM=head_dim,
            BLOCK_D=cfg["BLOCK_D"],
            BLOCK_M=pre_block,
        )

    q_lists = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, True, q.device)
    _flash_attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg["BLOCK_N"]), batch * nheads_kv)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        q_lists[0],
        q_lists[1],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        *q_lists[2:],
        nheads,
        nheads_kv,
        group_size,
        seqlen_q,
        seqlen_k,
        softmax_scale,
        qk_scale,
        MASK_BLOCK=mask_block,
        CAUSAL=bool(causal),
        HAS_MASK=block_mask is not None,
        **cfg,
    )

    kv_lists = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, False, q.device)
    _flash_attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * nheads)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        kv_lists[0],
        kv_lists[1],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        *kv_lists[2:],
        nheads,
        group_size,
        seqlen_q,
        seqlen_k,
        softmax_scale,
        qk_scale,
        MASK_BLOCK=mask_block,
        CAUSAL=bool(causal),
        HAS_MASK=block_mask is not None,
        **cfg,
    )
    return dq, dk, dv
