"""Triton flash attention (longmoe.kernels.flash_attention) against an fp64 reference.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before triton.jit
decorates them, i.e. before the kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from longmoe.kernels.flash_attention import (  # noqa: E402
    flash_attention_backward_triton,
    flash_attention_forward_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_ref(q, k, v, *, causal, softmax_scale, block_mask=None, block_size=128, upcast=True):
    """Dense softmax attention in fp64 (upcast) or in the inputs' dtype; returns (out, lse).

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim). Bottom-right causal,
    block mask expanded to elements; rows with no visible key give out 0 and lse -inf.
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(nheads // nheads_kv, dim=2)
    v = v.repeat_interleave(nheads // nheads_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    keep = torch.ones(batch, nheads, seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        keep = keep & (j <= i + seqlen_k - seqlen_q)
    if block_mask is not None:
        dense = block_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
        keep = keep & dense[:, :, :seqlen_q, :seqlen_k]
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) is NaN (also in autograd), so fully masked rows subtract 0 instead: p = exp(-inf) = 0.
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.float()


def _make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, seed=0):
    """Non-contiguous q/k/v/dout as real callers pass them: q and dout head-major transposed views, k and v
    slices of one packed kv tensor."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nheads, seqlen_q, headdim, generator=g).transpose(1, 2)
    kv = torch.randn(batch, seqlen_k, 2, nheads_kv, headdim, generator=g)
    dout = torch.randn(batch, nheads, seqlen_q, headdim, generator=g).transpose(1, 2)
    q, kv, dout = (x.to(device=DEVICE, dtype=dtype) for x in (q, kv, dout))
    return q, kv[:, :, 0], kv[:, :, 1], dout


def _random_block_mask(batch, nheads, seqlen_q, seqlen_k, block_size, density, seed=0):
    """Random block mask in which the first query block of head 0 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, nheads, -(-seqlen_q // block_size), -(-seqlen_k // block_size))
    mask = torch.rand(shape, generator=g) < density
    mask[:, 0, 0, :] = False
    return mask.to(DEVICE)


def _fp32_atol(ref64):
    # The kernels compute in fp32 whatever the input dtype, and make roundings the one-pass reference does not
    # (online-softmax rescaling, scores in the log2 domain, the dp - delta cancellation of a row with a single
    # key). Where torch's own error is exactly 0 (one visible key, exact zeros) a pure 2x bound would demand
    # bit-exactness, so allow 4 fp32 ulps at the larger of the compared values and the O(1) input scale.
    # Measured worst case over this file: 4 ulps (lse of a one-key row, magnitude ~4).
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    return 4 * torch.finfo(torch.float32).eps * scale


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close_to_ref(name, ours, ref_lowp, ref64):
    assert not torch.isnan(ours).any(), f"{name} has NaN"
    err, ref_err = _max_err(ours, ref64), _max_err(ref_lowp, ref64)
    atol = _fp32_atol(ref64)
    assert err <= 2 * ref_err + atol, f"{name}: err {err:.3g} > 2 * torch's {ref_err:.3g} + {atol:.3g}"


def _assert_lse_close(lse, lse_lowp, lse64):
    inf64 = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse), inf64) and (lse[inf64] < 0).all(), "lse -inf pattern differs"
    assert not torch.isnan(lse).any()
    finite = ~inf64
    _assert_close_to_ref("lse", lse[finite], lse_lowp[finite], lse64[finite])


def _check_against_reference(shape, causal, dtype, block_mask=None, block_size=128, seed=0):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = shape
    q, k, v, dout = _make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, seed)
    kw = dict(causal=causal, softmax_scale=headdim**-0.5, block_mask=block_mask, block_size=block_size)

    out, lse = flash_attention_forward_triton(q, k, v, **kw)
    dq, dk, dv = flash_attention_backward_triton(dout, q, k, v, out, lse, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, nheads, seqlen_q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype

    results = {}
    for upcast in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = _attention_ref(*leaves, upcast=upcast, **kw)
        grads = torch.autograd.grad(ref_out, leaves, dout.to(ref_out.dtype))
        results[upcast] = (ref_out.detach(), ref_lse.detach(), *grads)
    ref64, lowp = results[True], results[False]

    _assert_close_to_ref("out", out, lowp[0], ref64[0])
    _assert_lse_close(lse, lowp[1], ref64[1])
    for name, ours, lo, hi in zip(("dq", "dk", "dv"), (dq, dk, dv), lowp[2:], ref64[2:]):
        _assert_close_to_ref(name, ours, lo, hi)
    return out, lse, dq, dk, dv


# (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)
SHAPES = [
    (1, 1, 1, 1, 1, 64),  # single token
    (1, 1, 97, 4, 1, 64),  # decode step, MQA
    (2, 37, 97, 4, 2, 80),  # Sq < Sk, GQA 2:1, headdim padded to 128
    (1, 97, 37, 4, 1, 64),  # Sq > Sk (causal: first 60 rows see no key), MQA 4:1
    (1, 97, 97, 2, 2, 80),  # MHA, odd length
    (1, 65, 64, 2, 1, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_matches_reference(shape, causal, dtype):
    _check_against_reference(shape, causal, dtype)


def test_bf16():
    _check_against_reference((1, 97, 64, 4, 2, 64), True, torch.bfloat16)


BLOCK_CASES = [
    # shape, block_size, density
    ((1, 97, 97, 4, 1, 64), 32, 0.5),
    ((2, 37, 97, 2, 2, 80), 64, 0.6),  # two 32-tiles per block
    ((1, 97, 37, 4, 2, 64), 16, 0.7),  # Sq > Sk
    ((1, 70, 97, 2, 1, 64), 48, 0.5),  # block_size not a power of two: 16-tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-bs{c[1]}")
def test_block_mask_matches_reference(case, causal, dtype):
    shape, block_size, density = case
    batch, seqlen_q, seqlen_k, nheads = shape[:4]
    mask = _random_block_mask(batch, nheads, seqlen_q, seqlen_k, block_size, density)
    out, lse, dq, _, _ = _check_against_reference(shape, causal, dtype, mask, block_size)
    # The fully masked first query block of head 0: out 0, lse -inf, dq 0.
    rows = slice(0, block_size)
    assert (out[:, rows, 0] == 0).all() and torch.isneginf(lse[:, 0, rows]).all() and (dq[:, rows, 0] == 0).all()


def test_block_mask_broadcast_view():
    # A (1, 1, nq, nk) mask expanded over batch and heads (stride 0) is read through its strides.
    shape, block_size = (2, 64, 96, 4, 2, 64), 32
    mask = _random_block_mask(1, 1, 64, 96, block_size, 0.5, seed=3).expand(2, 4, -1, -1)
    _check_against_reference(shape, True, torch.float32, mask, block_size)


def test_causal_rows_without_keys():
    # Sq > Sk causal, bottom-right: query i sees key j iff j <= i - 60, so rows 0..59 see nothing.
    q, k, v, dout = _make_inputs(1, 97, 37, 2, 1, 64, torch.float16)
    kw = dict(causal=True, softmax_scale=0.125)
    out, lse = flash_attention_forward_triton(q, k, v, **kw)
    dq, dk, dv = flash_attention_backward_triton(dout, q, k, v, out, lse, **kw)
    for t in (out, lse, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (out[:, :60] == 0).all() and (dq[:, :60] == 0).all()
    assert torch.isneginf(lse[:, :, :60]).all() and torch.isfinite(lse[:, :, 60:]).all()
    assert (out[:, 60:] != 0).any(dim=-1).all()


def test_all_true_block_mask_equals_dense():
    q, k, v, dout = _make_inputs(1, 97, 97, 2, 1, 64, torch.float32)
    kw = dict(causal=True, softmax_scale=0.125, block_size=32)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=DEVICE)
    dense = flash_attention_forward_triton(q, k, v, **kw)
    sparse = flash_attention_forward_triton(q, k, v, block_mask=mask, **kw)
    grads_dense = flash_attention_backward_triton(dout, q, k, v, *dense, **kw)
    grads_sparse = flash_attention_backward_triton(dout, q, k, v, *sparse, block_mask=mask, **kw)
    # Same tiles visited in the same order (masked tiles add exactly 0): equal up to fp32 rounding at most.
    for a, b in zip((*dense, *grads_dense), (*sparse, *grads_sparse)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_masked_tiles_are_never_read():
    # Key block 1 is masked for every query block and head: NaN there must not reach any result.
    block_size = 32
    q, k, v, dout = _make_inputs(1, 64, 96, 2, 1, 64, torch.float32)
    mask = _random_block_mask(1, 2, 64, 96, block_size, 0.7)
    mask[:, :, :, 1] = False
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, block_size : 2 * block_size] = float("nan")
    v_nan[:, block_size : 2 * block_size] = float("nan")
    kw = dict(causal=False, softmax_scale=0.125, block_mask=mask, block_size=block_size)
    out, lse = flash_attention_forward_triton(q, k_nan, v_nan, **kw)
    dq, dk, dv = flash_attention_backward_triton(dout, q, k_nan, v_nan, out, lse, **kw)
    ref_out, ref_lse = flash_attention_forward_triton(q, k, v, **kw)
    ref_dq, ref_dk, ref_dv = flash_attention_backward_triton(dout, q, k, v, ref_out, ref_lse, **kw)
    for a, b in ((out, ref_out), (lse, ref_lse), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        assert torch.equal(a, b)


def test_validation_errors():
    q, k, v, _ = _make_inputs(1, 64, 64, 2, 1, 64, torch.float32)
    kw = dict(causal=False, softmax_scale=0.125)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention_forward_triton(q, k, v, block_size=40, **kw)
    with pytest.raises(TypeError, match="block_mask"):
        flash_attention_forward_triton(q, k, v, block_mask=torch.ones(1, 2, 1, 1, device=DEVICE), block_size=64,
                                       **kw)
    with pytest.raises(ValueError, match="block_mask"):
        flash_attention_forward_triton(q, k, v, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE),
                                       block_size=64, **kw)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_forward_triton(q[:, :, :1].expand(-1, -1, 3, -1), k.expand(-1, -1, 2, -1),
                                       v.expand(-1, -1, 2, -1), **kw)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention_forward_triton(q.half(), k, v, **kw)
