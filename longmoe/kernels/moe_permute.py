"""Triton MoE token dispatch (GPU path of :mod:`longmoe.moe.permute`): permute, unpermute, probs gradient.

Contract (shared with the C++ kernels and the PyTorch reference): slot ``s = t * top_k + j``;
``src_slot (num_rows,)`` int64 is the slot of every expert-sorted row, ``row_map (num_tokens, top_k)`` int64
the row of every slot (-1 if dropped).

* permute: one program per (row, hidden block): ``out[i] = x[src_slot[i] // top_k]``, optionally times
  ``probs.flat[src_slot[i]]`` computed in the accumulation dtype and rounded once.
* unpermute: one program per (token, hidden block) sums its ``top_k`` rows in order ``j = 0..top_k-1`` in
  fp32 (fp64 for fp64) and stores once: no atomics, so the result is deterministic.
* probs gradient: one program per slot, a dot product over hidden.

Dropped slots are masked loads that add -0.0, the additive identity, so they change nothing.
Under ``TRITON_INTERPRET=1`` (CPU tensors) the same kernels run in the Triton interpreter (fp32/fp16/fp64;
the interpreter stores bf16 as raw uint16, so bf16 is exercised on GPUs only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["moe_permute_triton", "moe_unpermute_triton", "moe_unpermute_probs_grad_triton"]


@triton.jit
def _moe_permute_kernel(
    X,
    SRC,
    P,
    OUT,
    hidden,
    stride_x,
    stride_o,
    TOPK: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    slot = tl.load(SRC + row)
    x = tl.load(X + (slot // TOPK) * stride_x + offs, mask=mask, other=0.0)
    if HAS_PROBS:
        w = tl.load(P + slot)
        x = x.to(ACC) * w
    tl.store(OUT + row * stride_o + offs, x.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_unpermute_kernel(
    Y,
    ROW_MAP,
    P,
    OUT,
    hidden,
    stride_y,
    stride_o,
    TOPK: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    # Start from -0.0, the additive identity, and add -0.0 for dropped slots: one kept unit-weight slot
    # is reproduced bit for bit (signed zeros included). A token with no kept slot stores +0.
    acc = tl.full([BLOCK_H], -0.0, dtype=ACC)
    kept = 0
    for j in tl.static_range(TOPK):
        r = tl.load(ROW_MAP + tok * TOPK + j)
        keep = mask & ((offs * 0 + r) >= 0)  # a vector mask: the interpreter rejects scalar & vector masks
        y = tl.load(Y + tl.maximum(r, 0) * stride_y + offs, mask=keep, other=-0.0).to(ACC)
        if HAS_PROBS:
            y = tl.where(keep, tl.load(P + tok * TOPK + j) * y, -0.0)
        acc += y
        kept += (r >= 0).to(tl.int32)
    acc = tl.where((offs * 0 + kept) > 0, acc, 0.0)
    tl.store(OUT + tok * stride_o + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_probs_grad_kernel(
    DOUT,
    Y,
    ROW_MAP,
    DP,
    hidden,
    stride_d,
    stride_y,
    TOPK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    r = tl.load(ROW_MAP + slot)
    row = tl.maximum(r, 0)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for h0 in range(0, hidden, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < hidden
        d = tl.load(DOUT + (slot // TOPK) * stride_d + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + row * stride_y + offs, mask=mask & ((offs * 0 + r) >= 0), other=0.0).to(ACC)
        acc += d * y
    tl.store(DP + slot, tl.sum(acc, axis=0))


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _block_h(hidden: int) -> int:
    # One program covers up to 1024 columns: a 4 KiB fp32 row per load keeps the GPU's memory pipes busy
    # and the grid small; wider rows split over the second grid axis.
    return min(1024, triton.next_power_of_2(max(hidden, 16)))


def moe_permute_triton(
    x: torch.Tensor, src_slot: torch.Tensor, top_k: int, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (num_tokens, hidden); src_slot: (num_rows,) int64; probs: None or (num_tokens, top_k).
    Returns (num_rows, hidden) in x's dtype."""
    x = x.contiguous()
    rows, hidden = src_slot.shape[0], x.shape[1]
    out = x.new_empty((rows, hidden))
    if rows == 0 or hidden == 0:
        return out
    acc_t, acc_tl = _acc(x.dtype)
    p = probs.to(acc_t).contiguous() if probs is not None else x  # x: any valid pointer when unused
    block = _block_h(hidden)
    _moe_permute_kernel[(rows, triton.cdiv(hidden, block))](
        x, src_slot.contiguous(), p, out, hidden, x.stride(0), out.stride(0),
        TOPK=top_k, HAS_PROBS=probs is not None, ACC=acc_tl, BLOCK_H=block,
    )  # fmt: skip
    return out


def moe_unpermute_triton(
    y: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """y: (num_rows, hidden); row_map: (num_tokens, top_k) int64; probs: None or (num_tokens, top_k).
    Returns (num_tokens, hidden) in y's dtype."""
    y = y.contiguous()
    tokens, top_k = row_map.shape
    hidden = y.shape[1]
    if y.shape[0] == 0 or tokens == 0 or hidden == 0:
        return y.new_zeros((tokens, hidden))
    out = y.new_empty((tokens, hidden))
    acc_t, acc_tl = _acc(y.dtype)
    p = probs.to(acc_t).contiguous() if probs is not None else y
    block = _block_h(hidden)
    _moe_unpermute_kernel[(tokens, triton.cdiv(hidden, block))](
        y, row_map.contiguous(), p, out, hidden, y.stride(0), out.stride(0),
        TOPK=top_k, HAS_PROBS=probs is not None, ACC=acc_tl, BLOCK_H=block,
    )  # fmt: skip
    return out


def moe_unpermute_probs_grad_triton(
    dout: torch.Tensor, y: torch.Tensor, row_map: torch.Tensor
) -> torch.Tensor:
    """dout: (num_tokens, hidden); y: (num_rows, hidden); row_map: (num_tokens, top_k) int64.
    Returns dprobs (num_tokens, top_k) in fp32 (fp64 for fp64 y)."""
    acc_t, acc_tl = _acc(y.dtype)
    tokens, top_k = row_map.shape
    if y.shape[0] == 0 or tokens == 0:
        return torch.zeros((tokens, top_k), dtype=acc_t, device=y.device)
    dout, y = dout.contiguous(), y.contiguous()
    out = torch.empty((tokens, top_k), dtype=acc_t, device=y.device)
    _moe_probs_grad_kernel[(tokens * top_k,)](
        dout, y, row_map.contiguous(), out, y.shape[1], dout.stride(0), y.stride(0),
        TOPK=top_k, ACC=acc_tl, BLOCK_H=_block_h(y.shape[1]),
    )  # fmt: skip
    return out
