"""Merging attention partials computed over disjoint key sets (ring steps, sparse/dense splits).

If ``(out_a, lse_a)`` is attention of some queries over key set A and ``(out_b, lse_b)`` over a disjoint
key set B, attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

evaluated in fp32 in the stable form used by ring-flash-attention:

    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)
    lse = lse_a - logsigmoid(lse_a - lse_b)

A side whose LSE is ``-inf`` saw no key and contributes nothing; both ``-inf`` stays (0, -inf), no NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merge_attention_partials", "merge_attention_partials_", "merge_attention_partials_ref"]


def _check(out: torch.Tensor, lse: torch.Tensor, name_out: str, name_lse: str) -> None:
    if out.dim() != 4:
        raise ValueError(f"{name_out} must be (batch, seqlen, heads, head_dim); got shape {tuple(out.shape)}")
    b, s, h, _ = out.shape
    if tuple(lse.shape) != (b, h, s):
        raise ValueError(
            f"{name_lse} must be (batch, heads, seqlen) = {(b, h, s)} to match {name_out}; got {tuple(lse.shape)}"
        )
    if not lse.is_floating_point():
        raise TypeError(f"{name_lse} must be floating point; got {lse.dtype}")


def merge_attention_partials(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials over disjoint key sets.

    Args:
        out: (batch, seqlen, heads, head_dim), any floating dtype; the running partial.
        lse: (batch, heads, seqlen), its log-sum-exp (``-inf`` where it saw no key).
        block_out: (batch, seqlen, heads, head_dim), the new partial.
        block_lse: (batch, heads, seqlen), its log-sum-exp.

    Returns:
        ``(out, lse)``: (batch, seqlen, heads, head_dim) fp32 and (batch, heads, seqlen) fp32. fp64 inputs
        stay fp64 (the oracle in tests). Differentiable through autograd.
    """
    _check(out, lse, "out", "lse")
    _check(block_out, block_lse, "block_out", "block_lse")
    if out.shape != block_out.shape:
        raise ValueError(f"block_out shape {tuple(block_out.shape)} must equal out shape {tuple(out.shape)}")
    if out.device != block_out.device or lse.device != out.device or block_lse.device != out.device:
        raise ValueError(
            f"out, lse, block_out, block_lse must share a device; got {out.device}, {lse.device}, "
            f"{block_out.device}, {block_lse.device}"
        )
    acc = (
        torch.float64
        if torch.float64 in (out.dtype, lse.dtype, block_out.dtype, block_lse.dtype)
        else torch.float32
    )
    out, lse, block_out, block_lse = (t.to(acc) for t in (out, lse, block_out, block_lse))
    # (B, H, S) -> (B, S, H, 1) to broadcast over head_dim.
    la = lse.transpose(1, 2).unsqueeze(-1)
    lb = block_lse.transpose(1, 2).unsqueeze(-1)
    a_empty = torch.isneginf(la)
    b_empty = torch.isneginf(lb)
    # Where both are empty, lb - la is NaN: weight 0 keeps out (zeros) unchanged.
    w = torch.sigmoid(torch.where(a_empty & b_empty, torch.full_like(la, float("-inf")), lb - la))
    new_out = out - w * (out - block_out)
    new_lse = torch.where(torch.isneginf(lse), block_lse, lse - F.logsigmoid(lse - block_lse))
    return new_out, new_lse


def merge_attention_partials_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In-place :func:`merge_attention_partials` for the running side of a ring: one pass over ``out``.

    out: (batch, seqlen, heads, head_dim) fp32 (or fp64), updated in place (a view such as ``out[:, a:b]``
    is fine); lse: (batch, heads, seqlen) of the same float dtype, updated in place; block_out / block_lse:
    the new partial, any floating dtype. ``out + w * (block_out - out)`` with ``w = sigmoid(block_lse -
    lse)`` is exactly the stable update, evaluated by ``torch.lerp`` in one fused pass (the functional form
    makes ~10 passes, which dominated ring steps on CPU).
    """
    _check(out, lse, "out", "lse")
    _check(block_out, block_lse, "block_out", "block_lse")
    if out.shape != block_out.shape:
        raise ValueError(f"block_out shape {tuple(block_out.shape)} must equal out shape {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise TypeError(
            f"in-place merge needs fp32/fp64 out and lse of one dtype; got {out.dtype} and {lse.dtype}"
        )
    bl = block_lse.to(lse.dtype)
    both_empty = torch.isneginf(lse) & torch.isneginf(bl)
    w = torch.sigmoid(torch.where(both_empty, torch.full_like(lse, float("-inf")), bl - lse))
    new_lse = torch.where(torch.isneginf(lse), bl, lse - F.logsigmoid(lse - bl))
    out.lerp_(block_out.to(out.dtype), w.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)


def merge_attention_partials_ref(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for a list of partials: ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) out_i``.

    outs: each (batch, seqlen, heads, head_dim); lses: each (batch, heads, seqlen). Computed in fp64.
    """
    lse_all = torch.stack([x.double() for x in lses])  # (n, B, H, S)
    lse = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - lse)  # NaN where every partial is -inf
    w = torch.where(torch.isneginf(lse), torch.zeros_like(w), w)
    out = sum(wi.transpose(1, 2).unsqueeze(-1) * o.double() for wi, o in zip(w, outs, strict=True))
    return out, lse
