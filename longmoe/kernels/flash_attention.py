"""Triton flash attention (GPU path of longmoe's attention core), forward and backward, returning LSE.

Layout follows flash-attention: ``q: (batch, seqlen_q, heads_q, head_dim)``,
``k, v: (batch, seqlen_k, heads_kv, head_dim)`` with ``heads_q % heads_kv == 0`` (GQA/MQA: the kernels
index the kv head ``h // (heads_q // heads_kv)``, K/V are never repeated). ``lse: (batch, heads_q, seqlen_q)``
is fp32, natural log of the scaled scores. Causal with ``seqlen_q != seqlen_k`` is aligned bottom-right:
query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``. A query row that sees no key gets output 0
and LSE ``-inf`` (never NaN), and zero gradients.

Block sparsity: ``block_mask: (batch, heads_q, cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size))``
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


# fmt: off
@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, Out, Lse, KvCount, KvIndex,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    heads_q, q_per_kv, seqlen_q, seqlen_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    off_hk = off_h // q_per_kv

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # BLOCK_M divides MASK_BLOCK, so this tile lies in one query block (qb); with a mask, tile t is the
    # (t % per_block)-th BLOCK_N slice of the (t // per_block)-th kept key block of qb.
    per_block = MASK_BLOCK // BLOCK_N
    qb = (pid_m * BLOCK_M) // MASK_BLOCK
    index = KvIndex + off_b * stride_ib + off_h * stride_ih + qb * stride_im
    if HAS_MASK:
        n_tiles = tl.load(KvCount + off_b * stride_cb + off_h * stride_ch + qb * stride_cm) * per_block
    else:
        hi = seqlen_k
        if CAUSAL:
            # Keys after the last one this tile's bottom row sees are never loaded (hi <= 0: no tile).
            hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
        n_tiles = tl.cdiv(hi, BLOCK_N)
    for t in range(0, n_tiles):
        if HAS_MASK:
            start_n = tl.load(index + t // per_block) * MASK_BLOCK + (t % per_block) * BLOCK_N
        else:
            start_n = t * BLOCK_N
        # One (BLOCK_M x BLOCK_N) step of the online softmax; scores live in the log2 domain.
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
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
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + rows64[:, None] * stride_om + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + (off_b * heads_q + off_h) * seqlen_q + offs_m, lse, mask=row_ok)
# fmt: on


# --------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------


# fmt: off
@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    Out, DO, Delta, stride_ob, stride_om, stride_oh, stride_db, stride_dm, stride_dh, heads_q, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d], in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows64 * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + rows64 * stride_dm + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (off_b * heads_q + off_h) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, QCount, QIndex,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in,
    heads_q, heads_kv, q_per_kv, seqlen_q, seqlen_k, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_kv).to(tl.int64)
    off_hk = (pid_bh % heads_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols64 = offs_n.to(tl.int64)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + cols64[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + cols64[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # BLOCK_N divides MASK_BLOCK: this kv tile lies in one key block (kb); with a mask, q tile t is the
    # (t % per_block)-th BLOCK_M slice of the (t // per_block)-th kept query block of kb.
    per_block = MASK_BLOCK // BLOCK_M
    kb = start_n // MASK_BLOCK
    lo = 0
    if CAUSAL:
        # First query row that sees key start_n, rounded down to a tile.
        lo = (tl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M) * BLOCK_M
    # The q heads of this kv head's GQA group are summed here, in registers: no atomics, no fp32 buffers.
    for g in range(0, q_per_kv):
        off_h = off_hk * q_per_kv + g
        Qh = Q + off_b * stride_qb + off_h * stride_qh
        DOh = DO + off_b * stride_dob + off_h * stride_doh
        Lseh = Lse + (off_b * heads_q + off_h) * seqlen_q
        Deltah = Delta + (off_b * heads_q + off_h) * seqlen_q
        index = QIndex + off_b * stride_ib + off_h * stride_ih + kb * stride_in
        if HAS_MASK:
            n_tiles = tl.load(QCount + off_b * stride_cb + off_h * stride_ch + kb * stride_cn) * per_block
        else:
            n_tiles = tl.cdiv(seqlen_q - lo, BLOCK_M)  # lo < seqlen_q
        for t in range(0, n_tiles):
            if HAS_MASK:
                start_m = tl.load(index + t // per_block) * MASK_BLOCK + (t % per_block) * BLOCK_M
            else:
                start_m = lo + t * BLOCK_M
            # This q tile's contribution to the dK/dV tile (dK still unscaled).
            rows = start_m + offs_m
            row_ok = rows < seqlen_q
            rows64 = rows.to(tl.int64)
            q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(Qh + rows64[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DOh + rows64[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Rows that saw no key (lse = -inf) contribute nothing: +inf makes p = exp2(s - inf) = 0,
            # never NaN.
            lse = tl.load(Lseh + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # ln -> log2
            delta = tl.load(Deltah + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            valid = row_ok[:, None] & (offs_n[None, :] < seqlen_k)
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= rows[:, None] + (seqlen_k - seqlen_q))
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + cols64[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + cols64[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KvCount, KvIndex,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh,
    stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    heads_q, q_per_kv, seqlen_q, seqlen_k, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    off_hk = off_h // q_per_kv

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom
                 + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + (off_b * heads_q + off_h) * seqlen_q + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # ln -> log2
    delta = tl.load(Delta + (off_b * heads_q + off_h) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Tiles as in the forward kernel.
    per_block = MASK_BLOCK // BLOCK_N
    qb = (pid_m * BLOCK_M) // MASK_BLOCK
    index = KvIndex + off_b * stride_ib + off_h * stride_ih + qb * stride_im
    if HAS_MASK:
        n_tiles = tl.load(KvCount + off_b * stride_cb + off_h * stride_ch + qb * stride_cm) * per_block
    else:
        hi = seqlen_k
        if CAUSAL:
            hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
        n_tiles = tl.cdiv(hi, BLOCK_N)
    for t in range(0, n_tiles):
        if HAS_MASK:
            start_n = tl.load(index + t // per_block) * MASK_BLOCK + (t % per_block) * BLOCK_N
        else:
            start_n = t * BLOCK_N
        # This kv tile's contribution to the dQ tile (still unscaled).
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + cols64[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols64[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        valid = row_ok[:, None] & (cols[None, :] < seqlen_k)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows64[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)
# fmt: on


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages). CUDA: the Triton fused-attention tutorial / FA2 defaults
# (forward 128x64; backward 64x64 keeps q, dO, k, v, dK, dV tiles of head_dim 128 in registers); not tuned
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


def _check_triton_limits(q: torch.Tensor, block_size: int) -> None:
    """What only the Triton kernels cannot do; everything else is checked by the public entry point
    (longmoe.attention.flash_attention's ``_check_inputs`` / ``_check_backward_inputs``)."""
    if q.dtype not in _SUPPORTED_DTYPES:  # the public entry point also accepts fp64
        raise TypeError(f"the Triton kernels support dtypes {_SUPPORTED_DTYPES}; got q {q.dtype}")
    if q.shape[3] > 256:
        raise ValueError(f"head_dim {q.shape[3]} > 256 is not supported by the Triton kernels")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
        raise ValueError(
            f"block_size must be a positive multiple of 16 (tl.dot's minimum tile); got {block_size}"
        )


def _block_lists(
    block_mask: torch.Tensor, causal: bool, seqlen_q: int, seqlen_k: int, block_size: int, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept blocks per row of the block mask (rows are q blocks, or k blocks when transpose=True),
    combined with causal at block granularity.

    Returns ``count: (batch, heads_q, rows)`` int32 and ``index: (batch, heads_q, rows, cols)`` int32, whose
    first ``count`` entries are the kept column blocks in ascending order. Batch/head dims that are broadcast
    (stride 0) in ``block_mask`` stay broadcast. No host synchronisation.
    """
    batch, heads_q = block_mask.shape[:2]
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
    return count.expand(batch, heads_q, -1), index.expand(batch, heads_q, -1, -1)


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

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), heads_q % heads_kv
    == 0; any strides (the last dim is made contiguous if it is not). block_mask: None (dense) or bool
    (batch, heads_q, cdiv(seqlen_q, block_size), cdiv(seqlen_k, block_size)); tile (qb, kb) is computed only
    where True (and, when causal, where some query of qb sees some key of kb).

    Inputs are validated by the public entry point (:func:`longmoe.attention.flash_attention_forward`);
    this launcher checks only the Triton limits (dtype, head_dim <= 256, block_size % 16, CUDA or the
    interpreter).

    Returns out: (batch, seqlen_q, heads_q, head_dim) in ``out_dtype`` (default q's dtype; float32 keeps ring
    partials unrounded), and lse: (batch, heads_q, seqlen_q) fp32, natural log of the scaled scores; rows
    with no visible key get out 0 and lse -inf.
    """
    _check_triton_limits(q, block_size)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    has_mask = block_mask is not None
    # The dense path ignores MASK_BLOCK; a fixed value avoids one compilation per block_size.
    mask_block = block_size if has_mask else 16
    cfg = _launch_config(q, seqlen_q, seqlen_k, block_size if has_mask else None, backward=False)
    kv_lists = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, False, q.device)
    grid = (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads_q)
    _flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, kv_lists[0], kv_lists[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *kv_lists[2:],
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, softmax_scale * _LOG2E,
        MASK_BLOCK=mask_block, CAUSAL=bool(causal), HAS_MASK=has_mask, **cfg,
    )  # fmt: skip
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

    dout, out: (batch, seqlen_q, heads_q, head_dim); q, k, v as in the forward; lse: (batch, heads_q,
    seqlen_q) fp32, natural log -- out and lse are taken as given (for a ring they are the global ones), not
    recomputed. ``delta`` (batch, heads_q, seqlen_q) fp32 = rowsum(dout * out) may be given instead of out
    (ring backward sends it instead of out). Rows with lse -inf contribute nothing. Returns dq, dk, dv shaped
    like q, k, v in ``grad_dtype`` (default the input dtype; accumulated in fp32).

    Inputs are validated by the public entry point (:func:`longmoe.attention.flash_attention_backward`,
    which also passes lse and delta as fp32); this launcher checks only the Triton limits and that lse and
    delta are on q's device, which the entry point does not check.
    """
    _check_triton_limits(q, block_size)
    for name, t in (("lse", lse), ("delta", delta)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    q, k, v, dout = (_last_dim_contiguous(x) for x in (q, k, v, dout))
    lse = lse.contiguous()
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    gdt = grad_dtype or q.dtype
    dq = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=gdt, device=q.device)
    dk = torch.empty((batch, seqlen_k, heads_kv, head_dim), dtype=gdt, device=k.device)
    dv = torch.empty((batch, seqlen_k, heads_kv, head_dim), dtype=gdt, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    has_mask = block_mask is not None
    mask_block = block_size if has_mask else 16
    cfg = _launch_config(q, seqlen_q, seqlen_k, block_size if has_mask else None, backward=True)
    q_per_kv = heads_q // heads_kv
    qk_scale = softmax_scale * _LOG2E
    consts = dict(MASK_BLOCK=mask_block, CAUSAL=bool(causal), HAS_MASK=has_mask, **cfg)

    if delta is not None:
        delta = delta.contiguous()
    else:
        out = _last_dim_contiguous(out)
        delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
        pre_block = 64
        _flash_attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, pre_block), batch * heads_q)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads_q, seqlen_q,
            HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=pre_block,
        )  # fmt: skip

    q_lists = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, True, q.device)
    _flash_attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg["BLOCK_N"]), batch * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, q_lists[0], q_lists[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], *q_lists[2:],
        heads_q, heads_kv, q_per_kv, seqlen_q, seqlen_k, softmax_scale, qk_scale, **consts,
    )  # fmt: skip

    kv_lists = _mask_args(block_mask, causal, seqlen_q, seqlen_k, block_size, False, q.device)
    _flash_attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads_q)](
        q, k, v, dout, lse, delta, dq, kv_lists[0], kv_lists[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        *kv_lists[2:], heads_q, q_per_kv, seqlen_q, seqlen_k, softmax_scale, qk_scale, **consts,
    )  # fmt: skip
    return dq, dk, dv
