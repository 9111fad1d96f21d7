"""XAttention: the antidiagonal estimator against a direct fp64 computation, selection rules, and the
block-sparse attention it drives (threshold 1.0 equals dense; needles are found)."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention import flash_attention, flash_attention_ref
from longmoe.attention.xattention import block_sparse_attention, xattention, xattention_estimate_ref
from tests.oracle import ATOL, assert_within_oracle, attention64, max_err, xattention_scores64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 64, 64, 2, 2), (3, 40, 72, 4, 1), (2, 37, 53, 4, 2)], ids=str)
def test_estimator_matches_direct_definition(shape, causal):
    b, lq, lk, hq, hkv = shape
    q, k = torch.randn(b, lq, hq, 8, dtype=torch.float64), torch.randn(b, lk, hkv, 8, dtype=torch.float64)
    scores, mask = xattention_estimate_ref(q, k, stride=4, block_size=16, threshold=0.9, causal=causal)
    torch.testing.assert_close(scores, xattention_scores64(q, k, 4, 16, causal), rtol=1e-10, atol=1e-12)
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
    assert density < 1.0
    # The kernel: the needle row equals fp64 attention over the kept tiles, within 2x fp32 PyTorch's error.
    sparse = dict(causal=True, block_mask=mask, block_size=64)
    sparse64, sparse_lse = attention64(q, k, v, **sparse)
    same = flash_attention_ref(q, k, v, upcast=False, **sparse)[0]
    row = (0, query)
    assert_within_oracle("needle row", out[row], same[row], sparse64[row], torch.float32)
    # The selection: the row matches dense attention up to the mass the dropped tiles carried. With m the
    # dropped fraction of the row's softmax mass (from the two LSEs), dense = (1 - m) sparse + m dropped,
    # so |sparse - dense| <= m * max_j |sparse - v_j|; the needle's row must keep all but ~1e-3 of it.
    dense64, dense_lse = attention64(q, k, v, causal=True)
    m = 1 - torch.exp(sparse_lse[0, :, query] - dense_lse[0, :, query])  # (heads,)
    assert float(m.max()) < 1e-3, m
    spread = (sparse64[row][None] - v[0, : query + 1].double()).abs().amax(dim=(0, 2))  # (heads,)
    e_same = max_err(same[row], sparse64[row])
    bound = (m * spread)[:, None] + 2 * e_same + ATOL[torch.float32]
    assert bool(((out[row].double() - dense64[row]).abs() <= bound).all())


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
