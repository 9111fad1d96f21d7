"""Property-based fuzzing (hypothesis) of the attention core, the merge, block-sparse attention and the
XAttention estimator against the independent fp64 oracles (tests/oracle.py), with a bounded number of
examples so the suite keeps its time.

Shapes are drawn where kernels break: odd lengths, Sq != Sk (bottom-right causal, rows that see no key),
GQA/MQA ratios, head dims that are not tile multiples, random block masks with empty rows, fp32/bf16/fp16.
The bound is the suite's rule: 2x the same-dtype PyTorch error + a floor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longmoe.attention import flash_attention, merge_attention_partials
from longmoe.attention.xattention import block_sparse_attention, xattention_estimate, xattention_estimate_ref
from longmoe.runtime import native_available
from tests.oracle import (
    assert_within_oracle,
    attention64,
    attention_oracle,
    near_tie_rows,
    xattention_scores64,
)

BACKENDS = ["reference", "native"] if native_available() else ["reference"]

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    sq, sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 12, 16, 40]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    causal = draw(st.booleans())
    block = draw(st.sampled_from([None, 16, 32]))
    seed = draw(st.integers(0, 2**16))
    return b, sq, sk, hq, hkv, d, dtype, causal, block, seed


@pytest.mark.skipif(
    not native_available(), reason="longmoe._C not built: the native kernel is what is fuzzed"
)
@SETTINGS
@given(problems())
def test_flash_attention_forward_and_backward(problem):
    b, sq, sk, hq, hkv, d, dtype, causal, block, seed = problem
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, sq, hq, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=g).to(dtype) for _ in range(2))
    kw = dict(causal=causal)
    if block is not None:
        nqb, nkb = -(-sq // block), -(-sk // block)
        kw.update(block_mask=torch.rand(b, hq, nqb, nkb, generator=g) < 0.6, block_size=block)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, return_lse=True, backend="native", **kw)
    out.backward(dout)
    oracle, same = attention_oracle(q, k, v, dout, **kw)
    for name, ours, o, s in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *(t.grad for t in leaves)),
                                oracle, same, strict=True):  # fmt: skip
        assert_within_oracle(f"{problem} {name}", ours, s, o, dtype)


@SETTINGS
@given(st.integers(1, 50), st.integers(1, 3), st.integers(1, 60), st.integers(0, 2**16), st.booleans())
def test_merge_of_key_chunks_equals_attention_over_all_keys(sq, heads, sk, seed, causal):
    """Attention over keys split at a random point, merged, equals attention over all keys (fp64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, sq, heads, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, sk, heads, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cut = int(torch.randint(0, sk + 1, (1,), generator=g))
    full, full_lse = attention64(q, k, v)
    parts = [attention64(q, k[:, a:e], v[:, a:e]) for a, e in ((0, cut), (cut, sk))]
    out, lse = merge_attention_partials(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)


@st.composite
def sparse_problems(draw):
    """Block-sparse attention: random masks with empty query-block rows (a row that sees nothing)."""
    b = draw(st.integers(1, 2))
    block = draw(st.sampled_from([16, 32, 64]))
    sq, sk = draw(st.integers(1, 3 * block)), draw(st.integers(1, 3 * block))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([8, 16, 24]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    return b, sq, sk, hq, hkv, d, dtype, draw(st.booleans()), block, density, draw(st.sampled_from(BACKENDS)), \
        draw(st.integers(0, 2**16))  # fmt: skip


@SETTINGS
@given(sparse_problems())
def test_block_sparse_attention_forward_and_backward(problem):
    b, sq, sk, hq, hkv, d, dtype, causal, block, density, backend, seed = problem
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, sq, hq, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(b, hq, -(-sq // block), -(-sk // block), generator=g) < density
    kw = dict(causal=causal, block_mask=mask, block_size=block)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention(*leaves, return_lse=True, backend=backend, **kw)
    out.backward(dout)
    oracle, same = attention_oracle(q, k, v, dout, **kw)
    for name, ours, o, s in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *(t.grad for t in leaves)),
                                oracle, same, strict=True):  # fmt: skip
        assert_within_oracle(f"{problem} {name}", ours, s, o, dtype)


@st.composite
def estimate_problems(draw):
    b = draw(st.integers(1, 2))
    stride = draw(st.sampled_from([2, 4, 8]))
    block = stride * draw(st.sampled_from([2, 4]))
    lq, lk = draw(st.integers(1, 3 * block)), draw(st.integers(1, 3 * block))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return b, lq, lk, hq, hkv, d, stride, block, draw(st.booleans()), dtype, draw(st.sampled_from(BACKENDS)), \
        draw(st.sampled_from([0.5, 0.8, 0.95])), draw(st.integers(0, 2**16))  # fmt: skip


@SETTINGS
@given(estimate_problems())
def test_xattention_estimate_against_brute_force(problem):
    """Scores against the loop-by-loop fp64 definition; the ranked selection's mask against the fp64
    estimate's on every row that is not a near tie (where a rounding-sized score change could flip it)."""
    b, lq, lk, hq, hkv, d, stride, block, causal, dtype, backend, tau, seed = problem
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, lq, hq, d, generator=g) * 2).to(dtype)  # peaked rows: block scores spread out
    k = torch.randn(b, lk, hkv, d, generator=g).to(dtype)
    kw = dict(stride=stride, block_size=block, threshold=tau, causal=causal, selection="ranked")
    scores, mask = xattention_estimate(q, k, backend=backend, **kw)
    brute = xattention_scores64(q.double(), k.double(), stride, block, causal)
    same, _ = xattention_estimate_ref(q.float(), k.float(), **kw)
    # Every backend scores in fp32 from the (exactly representable) inputs: the fp32 bound applies.
    assert_within_oracle(f"{problem} scores", scores, same, brute, torch.float32)
    _, mask64 = xattention_estimate_ref(q.double(), k.double(), **kw)
    eps = 10 * (2 * (same.double() - brute).abs().max().item() + 1e-5)
    clear = ~near_tie_rows(brute, torch.tensor(tau, dtype=torch.float64), eps)
    assert torch.equal(mask[clear], mask64[clear]), problem
