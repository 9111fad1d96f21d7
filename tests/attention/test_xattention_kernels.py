"""XAttention block scorers (C++ ``longmoe::xattn_block_scores``, Triton ``longmoe.kernels.xattention``)
against the fp64 reference math, and the dispatching estimator's masks against the reference's."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention.xattention import (
    _block_scores_ref,
    xattention,
    xattention_estimate,
    xattention_estimate_ref,
)
from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle, near_tie_rows

# The suite runs on a `make venv` build, which has the extension (tests/test_attention_core.py asserts it);
# these marks only matter for a LONGMOE_SKIP_NATIVE=1 install, where there are no C++ ops to test.
needs_native = pytest.mark.skipif(
    not native_available(), reason="longmoe._C not built (LONGMOE_SKIP_NATIVE=1)"
)

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, stride, block_size, causal, q_offset)
NATIVE_CASES = [
    (3, 97, 97, 8, 2, 64, 8, 64, True, None),  # batch 3, GQA 4:1, odd length
    (1, 130, 257, 8, 2, 80, 4, 16, True, None),  # Lq < Lk, default (bottom-right) offset
    (2, 77, 300, 4, 1, 32, 16, 128, True, 100),  # MQA, explicit offset not a stride/block multiple
    (1, 64, 200, 2, 1, 32, 8, 64, True, 0),  # first chunk of a chunked prefill
    (1, 200, 120, 2, 1, 32, 4, 32, True, None),  # Lq > Lk: leading rows see no key
    (1, 1025, 1025, 2, 2, 128, 8, 128, False, None),
    (2, 50, 333, 4, 4, 16, 16, 32, False, None),
    (
        1,
        300,
        2100,
        2,
        1,
        64,
        4,
        64,
        True,
        None,
    ),  # 525 key groups: several packed key blocks, the last partial
]
TRITON_CASES = [  # the interpreter runs every program in Python: small shapes only
    (2, 45, 70, 4, 1, 16, 4, 16, True, None),
    (1, 33, 90, 4, 2, 24, 8, 32, True, 20),
    (3, 40, 40, 2, 2, 16, 16, 64, False, None),
    (1, 70, 30, 2, 1, 8, 4, 16, True, None),
]


def _inputs(case, dtype, layout="bshd"):
    b, lq, lk, hq, hkv, d = case[:6]
    if layout == "bhsd":  # (B, H, L, D) memory seen as (B, L, H, D): strided, unit inner stride
        return (
            torch.randn(b, hq, lq, d).transpose(1, 2).to(dtype),
            torch.randn(b, hkv, lk, d).transpose(1, 2).to(dtype),
        )
    return torch.randn(b, lq, hq, d).to(dtype), torch.randn(b, lk, hkv, d).to(dtype)


def _check_scores(ours, q, k, case):
    stride, block, causal, q_offset = case[6:]
    off = k.shape[1] - q.shape[1] if q_offset is None else q_offset
    oracle = _block_scores_ref(q.double(), k.double(), stride, block, causal, off)
    same = _block_scores_ref(q, k, stride, block, causal, off)
    # Every backend computes in fp32 from the (exactly representable) input values, as the reference does
    # for bf16/fp16 inputs, so the bound is 2x the fp32 reference's error plus the fp32 floor, whatever
    # the input dtype (the bf16/fp16 floors of oracle.ATOL would be vacuous for scores in [0, 1]).
    assert_within_oracle("block_scores", ours, same, oracle, torch.float32)
    assert ours.dtype == torch.float32


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=str)
def test_native_block_scores(case, dtype):
    q, k = _inputs(case, dtype, layout="bhsd" if case[0] == 2 else "bshd")
    stride, block, causal, q_offset = case[6:]
    off = k.shape[1] - q.shape[1] if q_offset is None else q_offset
    _check_scores(torch.ops.longmoe.xattn_block_scores(q, k, stride, block, causal, off), q, k, case)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_block_scores_odd_row_strides(dtype):
    """K and Q rows at odd element strides (views of wider rows): bf16 rows then do not start on 4-byte
    boundaries, so the AMX path packs K element pairs one by one instead of by its 32-bit transpose."""
    case = (1, 150, 260, 3, 1, 32, 4, 32, True, None)
    q = torch.randn(1, 150, 3, 33).to(dtype)[..., :32]
    k = torch.randn(1, 260, 1, 33).to(dtype)[..., 1:]
    assert k.stride(1) % 2 == 1 and k.storage_offset() == 1
    _check_scores(torch.ops.longmoe.xattn_block_scores(q, k, 4, 32, True, 110), q, k, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_block_scores(case, dtype):
    from longmoe.kernels.xattention import xattn_block_scores_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _inputs(case, dtype)
    stride, block, causal, q_offset = case[6:]
    off = k.shape[1] - q.shape[1] if q_offset is None else q_offset
    ours = xattn_block_scores_triton(q.to(dev), k.to(dev), stride, block, causal, off).cpu()
    _check_scores(ours, q, k, case)


@pytest.mark.parametrize("per_head", [False, True], ids=["tau", "tau_per_head"])
@pytest.mark.parametrize(
    "case,backend",
    [
        (NATIVE_CASES[1], "native"),
        (NATIVE_CASES[2], "native"),
        (TRITON_CASES[1], "native"),
        (TRITON_CASES[1], "triton"),
    ],
    ids=str,
)
def test_estimator_masks_match_reference(case, per_head, backend):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k = _inputs(case, torch.float32)
    q = q * 2.0  # peakier rows than unit noise, so block scores spread out and ties are rare
    stride, block, causal, q_offset = case[6:]
    hq = q.shape[2]
    tau = torch.linspace(0.6, 0.95, hq) if per_head else 0.9
    kw = dict(stride=stride, block_size=block, threshold=tau, causal=causal, q_offset=q_offset)
    s64, m64 = xattention_estimate_ref(q.double(), k.double(), **kw)
    s32, _ = xattention_estimate_ref(q, k, **kw)
    scores, mask = xattention_estimate(q.to(dev), k.to(dev), backend=backend, **kw)
    scores, mask = scores.cpu(), mask.cpu()
    assert_within_oracle("estimate scores", scores, s32, s64, torch.float32)
    tau_rows = tau.double().view(1, -1, 1, 1) if per_head else torch.tensor(tau, dtype=torch.float64)
    tau_rows = tau_rows.expand(*s64.shape[:3], 1)
    # eps: 10x the score error bound, far above fp32 rounding and far below a real selection bug.
    eps = 10 * (2 * (s32.double() - s64).abs().max().item() + 1e-5)
    clear = ~near_tie_rows(s64, tau_rows, eps)
    assert clear.float().mean() > 0.8, "test inputs are too tie-prone to say anything"
    assert torch.equal(mask[clear], m64[clear])
    # Every row keeps at least its threshold's share of the fp64 mass (up to eps), ties or not.
    mass = (s64 * mask).sum(-1) / s64.sum(-1).clamp(min=1e-30)
    has = s64.sum(-1) > 0
    assert bool((mass[has] >= tau_rows.squeeze(-1)[has] - eps).all())


@needs_native
def test_default_backend_on_cpu_is_native_and_fp64_takes_reference():
    case = NATIVE_CASES[0]
    q, k = _inputs(case, torch.bfloat16)
    scores, mask = xattention_estimate(q, k, stride=8, block_size=64, causal=True)
    per_head = torch.ops.longmoe.xattn_block_scores(q, k, 8, 64, True, 0)
    torch.testing.assert_close(scores, per_head.view(3, 2, 4, 2, 2).mean(2).repeat_interleave(4, 1))
    q64, k64 = q.double(), k.double()
    s_nat, m_nat = xattention_estimate(q64, k64, stride=8, block_size=64, causal=True, backend="native")
    s_ref, m_ref = xattention_estimate_ref(q64, k64, stride=8, block_size=64, causal=True)
    assert s_nat.dtype == torch.float64 and torch.equal(s_nat, s_ref) and torch.equal(m_nat, m_ref)


@needs_native
def test_xattention_backend_keyword():
    q, k, v = torch.randn(1, 150, 4, 32), torch.randn(1, 150, 2, 32), torch.randn(1, 150, 2, 32)
    kw = dict(threshold=0.9, stride=8, block_size=32, causal=True, return_density=True)
    out_n, dens_n = xattention(q, k, v, backend="native", **kw)
    out_r, dens_r = xattention(q, k, v, backend="reference", **kw)
    assert dens_n == dens_r
    torch.testing.assert_close(out_n, out_r, atol=1e-5, rtol=1e-5)  # fp32 attention, same mask


@needs_native
def test_native_op_checks_and_fake_kernel():
    q, k = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16)
    with pytest.raises(RuntimeError, match="block_size=12 must be a positive multiple of stride=8"):
        torch.ops.longmoe.xattn_block_scores(q, k, 8, 12, True, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.longmoe.xattn_block_scores(q.double(), k.double(), 4, 16, True, 0)
    with pytest.raises(RuntimeError, match="heads_q=4 must be a multiple of heads_kv=3"):
        torch.ops.longmoe.xattn_block_scores(q, torch.randn(2, 40, 3, 16), 4, 16, True, 0)
    with pytest.raises(RuntimeError, match="unit stride in head_dim"):
        torch.ops.longmoe.xattn_block_scores(
            q, k.transpose(2, 3).contiguous().transpose(2, 3), 4, 16, True, 0
        )
    torch.library.opcheck(torch.ops.longmoe.xattn_block_scores.default, (q, k, 4, 16, True, 0))
