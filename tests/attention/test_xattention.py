"""XAttention: the antidiagonal estimator against a direct fp64 computation, selection rules, and the
block-sparse attention it drives (threshold 1.0 equals dense; needles are found)."""

from __future__ import annotations

import math

import pytest
import torch

from longmoe.attention import flash_attention
from longmoe.attention.xattention import block_sparse_attention, xattention, xattention_estimate_ref


def direct_block_scores(q, k, stride, block_size, causal, q_offset=None):
    """fp64, by definition: every stride x stride tile's antidiagonal sum of q k^T, causal on the stride
    grid, softmax per query group, summed over block sub-grids, averaged over the block's (real) query
    groups and over the query heads of a KV group."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    off = lk - lq if q_offset is None else q_offset
    s, g = stride, hq // hkv
    nq, nk = -(-lq // s), -(-lk // s)
    out = torch.zeros(b, hq, -(-lq // block_size), -(-lk // block_size), dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            full = q[bb, :, h].double() @ k[bb, :, h // g].double().T  # (lq, lk)
            anti = torch.full((nq, nk), float("-inf"), dtype=torch.float64)
            for r in range(nq):
                for j in range(nk):
                    if j * s >= lk or (causal and j * s > off + r * s + s - 1):
                        continue
                    tot = 0.0
                    for i in range(s):
                        qi, kj = r * s + s - 1 - i, j * s + i
                        if qi < lq and kj < lk:
                            tot += full[qi, kj].item()
                    anti[r, j] = tot / (math.sqrt(d) * s)
            p = torch.softmax(anti, -1).nan_to_num(0.0)
            rb = block_size // s
            for qb in range(out.shape[2]):
                for kb in range(out.shape[3]):
                    rows = p[qb * rb : (qb + 1) * rb]  # the block's real query groups only
                    out[bb, h, qb, kb] = rows[:, kb * rb : (kb + 1) * rb].sum() / rows.shape[0]
    if g > 1:
        out = out.view(b, hkv, g, *out.shape[2:]).mean(2).repeat_interleave(g, 1)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 64, 64, 2, 2), (3, 40, 72, 4, 1), (2, 37, 53, 4, 2)], ids=str)
def test_estimator_matches_direct_definition(shape, causal):
    b, lq, lk, hq, hkv = shape
    q, k = torch.randn(b, lq, hq, 8, dtype=torch.float64), torch.randn(b, lk, hkv, 8, dtype=torch.float64)
    scores, mask = xattention_estimate_ref(q, k, stride=4, block_size=16, threshold=0.9, causal=causal)
    torch.testing.assert_close(scores, direct_block_scores(q, k, 4, 16, causal), rtol=1e-10, atol=1e-12)
    assert mask.dtype == torch.bool and mask.shape == scores.shape


def test_chunked_prefill_rows_equal_full_estimate():
    """The last query chunk, estimated on its own (q_offset = Lk - Lq), equals those rows of the whole."""
    q, k = torch.randn(2, 256, 4, 16), torch.randn(2, 256, 2, 16)
    full, full_mask = xattention_estimate_ref(q, k, stride=8, block_size=64, threshold=0.9, causal=True)
    part, part_mask = xattention_estimate_ref(q[:, 128:], k, stride=8, block_size=64, threshold=0.9,
                                              causal=True)  # fmt: skip
    torch.testing.assert_close(part, full[:, :, 2:], rtol=1e-5, atol=1e-6)
    assert torch.equal(part_mask, full_mask[:, :, 2:])


def test_selection_rules():
    q, k = torch.randn(1, 512, 2, 16), torch.randn(1, 512, 2, 16)
    scores, mask = xattention_estimate_ref(q, k, stride=8, block_size=64, threshold=0.5, causal=True)
    nb = mask.shape[-1]
    for qb in range(nb):
        assert mask[0, :, qb, 0].all() and mask[0, :, qb, qb].all()  # sink and diagonal
        assert not mask[0, :, qb, qb + 1 :].any()  # nothing in the future
        row = scores[0, :, qb]
        kept = (row * mask[0, :, qb]).sum(-1)
        assert (kept >= 0.5 - 1e-6).all()  # at least the threshold's share of the row
    # per-head thresholds: a tighter head keeps no more blocks than a looser one
    _, per_head = xattention_estimate_ref(
        q, k, stride=8, block_size=64, threshold=torch.tensor([0.3, 1.0]), causal=True
    )
    assert per_head[0, 0].sum() <= per_head[0, 1].sum()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 300, 300, 4, 2), (1, 200, 333, 4, 1)], ids=str)
def test_threshold_one_equals_dense(shape, causal):
    b, lq, lk, hq, hkv = shape
    q, k, v = (torch.randn(b, n, h, 32, requires_grad=True) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
    out, density = xattention(q, k, v, threshold=1.0, block_size=64, causal=causal, return_density=True)
    ref = flash_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert density == pytest.approx(1.0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_needle_is_selected_and_row_matches_dense():
    torch.manual_seed(3)
    b, length, h, d = 1, 1024, 2, 32
    q, k, v = (
        torch.randn(b, length, h, d) * 0.1,
        torch.randn(b, length, h, d) * 0.1,
        torch.randn(b, length, h, d),
    )
    needle_key, query = 300, 900  # key block 4 (of 64-token blocks), query block 14
    k[0, needle_key] = torch.randn(h, d) * 3
    q[0, query - 7 : query + 1] = k[0, needle_key] * 3  # a stride group that strongly matches the needle
    _, mask = xattention_estimate_ref(q, k, stride=8, block_size=64, threshold=0.9, causal=True)
    assert mask[0, :, query // 64, needle_key // 64].all()
    out, density = xattention(q, k, v, threshold=0.9, block_size=64, causal=True, return_density=True)
    ref = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out[0, query], ref[0, query], rtol=1e-3, atol=1e-3)
    assert density < 1.0


def test_fully_masked_rows_are_zero_without_nan():
    q, k, v = (torch.randn(1, 128, 2, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    mask[:, :, 1] = False  # the second query block sees nothing
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, block_size=64, causal=False, return_lse=True)
    out.sum().backward()
    assert (out[:, 64:] == 0).all() and torch.isneginf(lse[:, :, 64:]).all()
    assert not any(torch.isnan(t).any() for t in (out, q.grad, k.grad, v.grad))


def test_bad_inputs():
    q, k = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
    with pytest.raises(ValueError, match="block_size=60 must be a positive multiple of stride=8"):
        xattention_estimate_ref(q, k, stride=8, block_size=60)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            xattention_estimate_ref(q, k, threshold=bad)
    with pytest.raises(ValueError, match="threshold values must be in"):
        xattention_estimate_ref(q, k, threshold=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match=r"threshold tensor must have shape \(heads_q,\)"):
        xattention_estimate_ref(q, k, threshold=torch.tensor([0.5, 0.6, 0.7]))
    with pytest.raises(ValueError, match="block_mask must be"):
        block_sparse_attention(q, k, k, block_mask=torch.ones(1, 2, 2, 2, dtype=torch.bool), block_size=64)
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        block_sparse_attention(q, k, k, block_mask=torch.ones(1, 2, 1, 1), block_size=64)
