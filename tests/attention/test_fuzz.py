"""Property-based fuzzing (hypothesis) of the attention core and the merge against the independent fp64
oracle (tests/oracle.py), with a bounded number of examples so the suite keeps its time.

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
from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle, attention64, attention_oracle

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
