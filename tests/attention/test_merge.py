"""Merging attention partials over disjoint key chunks equals one-shot attention, -inf rows included."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention import (
    flash_attention_forward,
    flash_attention_ref,
    merge_attention_partials,
    merge_attention_partials_,
    merge_attention_partials_ref,
)
from tests.oracle import assert_within_oracle, attention64


def masked_partial(q, k, v, visible):
    """fp64 attention of q over the keys where ``visible`` (Sq, Sk) is True: (out, lse), -inf rows -> 0."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def chunk_bounds(n, length, gen):
    cuts = sorted(torch.randperm(length - 1, generator=gen)[: n - 1].add(1).tolist())
    return list(zip([0, *cuts], [*cuts, length], strict=True))


@pytest.mark.parametrize("n_chunks", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_merge_chunks_equals_one_shot(n_chunks, causal):
    gen = torch.Generator().manual_seed(n_chunks)
    b, s, h, d = 2, 61, 3, 16
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64, generator=gen) for _ in range(3))
    full, full_lse = flash_attention_ref(q, k, v, causal=causal)
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(s).unsqueeze(0)
    out = torch.zeros_like(q)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float64)
    outs, lses = [], []
    for lo, hi in chunk_bounds(n_chunks, s, gen):
        vis = (j >= lo) & (j < hi) & ((j <= i) if causal else True)
        po, pl = masked_partial(q, k, v, vis)
        if causal and lo > 0:
            assert torch.isneginf(pl[:, :, :lo]).all()  # rows before the chunk see nothing in it
        outs.append(po)
        lses.append(pl)
        out, lse = merge_attention_partials(out, lse, po, pl)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=1e-10, atol=1e-12)
    ref_out, ref_lse = merge_attention_partials_ref(outs, lses)
    torch.testing.assert_close(ref_out, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref_lse, full_lse, rtol=1e-10, atol=1e-12)


def test_merge_neg_inf_cases():
    out = torch.zeros(1, 3, 1, 4)
    lse = torch.tensor([[[float("-inf"), float("-inf"), 0.5]]])
    bo = torch.ones(1, 3, 1, 4)
    bl = torch.tensor([[[float("-inf"), 1.0, float("-inf")]]])
    m, ml = merge_attention_partials(out, lse, bo, bl)
    assert not torch.isnan(m).any() and not torch.isnan(ml).any()
    assert torch.isneginf(ml[0, 0, 0]) and (m[0, 0] == 0).all()  # both empty: stays (0, -inf)
    assert ml[0, 0, 1] == 1.0 and (m[0, 1] == 1).all()  # running side empty: takes the block
    assert ml[0, 0, 2] == 0.5 and (m[0, 2] == 0).all()  # block empty: unchanged
    # gradients stay finite through -inf rows
    bo.requires_grad_(True)
    m, ml = merge_attention_partials(out, lse, bo, bl)
    m.sum().backward()
    assert torch.isfinite(bo.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_native_partials(dtype):
    """Partials from the native kernel over key chunks, merged in fp32, match one-shot attention."""
    q = torch.randn(2, 150, 4, 64, dtype=dtype)
    k = torch.randn(2, 333, 2, 64, dtype=dtype)
    v = torch.randn(2, 333, 2, 64, dtype=dtype)
    out = torch.zeros(2, 150, 4, 64)
    lse = torch.full((2, 4, 150), float("-inf"))
    for lo, hi in ((0, 100), (100, 101), (101, 333)):
        po, pl = flash_attention_forward(q, k[:, lo:hi], v[:, lo:hi])
        out, lse = merge_attention_partials(out, lse, po, pl)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    o64, l64 = attention64(q, k, v)
    same, same_lse = flash_attention_ref(q, k, v, upcast=False)
    # The merged result is never worse than twice the same-dtype one-shot reference.
    assert_within_oracle("merged out", out, same, o64, dtype)
    assert_within_oracle("merged lse", lse, same_lse, l64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_merge_equals_functional(dtype):
    """merge_attention_partials_ (one lerp pass, used by the rings) == the functional stable form, -inf
    rows and views included."""
    out = torch.randn(2, 50, 3, 16, dtype=dtype)
    lse = torch.randn(2, 3, 50, dtype=dtype)
    bo = torch.randn(2, 50, 3, 16).bfloat16()
    bl = torch.randn(2, 3, 50)
    lse[:, :, :5] = float("-inf")
    out[:, :5] = 0
    bl[:, :, 3:8] = float("-inf")
    bo[:, 3:8] = 0
    ref_out, ref_lse = merge_attention_partials(out, lse, bo, bl)
    o, l = out.clone(), lse.clone()
    merge_attention_partials_(o[:, 2:], l[:, :, 2:], bo[:, 2:], bl[:, :, 2:])  # through views
    merge_attention_partials_(o[:, :2], l[:, :, :2], bo[:, :2], bl[:, :, :2])
    assert not torch.isnan(o).any() and not torch.isnan(l).any()
    torch.testing.assert_close(o, ref_out.to(dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l, ref_lse.to(dtype), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="in-place merge needs fp32/fp64"):
        merge_attention_partials_(out.bfloat16(), lse, bo, bl)
