"""Triton flash attention (longmoe.kernels.flash_attention) against an fp64 reference.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before triton.jit
decorates them, i.e. before the kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from longmoe.attention import flash_attention, flash_attention_forward  # noqa: E402
from longmoe.kernels.flash_attention import (  # noqa: E402
    flash_attention_backward_triton,
    flash_attention_forward_triton,
)
from tests.oracle import assert_within_oracle, attention_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def _check_against_reference(shape, causal, dtype, block_mask=None, block_size=128, seed=0):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim = shape
    q, k, v, dout = _make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype, seed)
    kw = dict(causal=causal, softmax_scale=headdim**-0.5, block_mask=block_mask, block_size=block_size)

    out, lse = flash_attention_forward_triton(q, k, v, **kw)
    dq, dk, dv = flash_attention_backward_triton(dout, q, k, v, out, lse, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, nheads, seqlen_q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype

    oracle, same = attention_oracle(q, k, v, dout, **kw)
    for name, ours, lo, hi in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), same, oracle, strict=True
    ):
        assert_within_oracle(f"triton {name}", ours, lo, hi, dtype)
    return out, lse, dq, dk, dv


# (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)
SHAPES = [
    (1, 1, 1, 1, 1, 64),  # single token
    (1, 1, 97, 4, 1, 64),  # decode step, MQA
    (2, 37, 97, 4, 2, 80),  # Sq < Sk, GQA 2:1, headdim padded to 128
    (1, 97, 37, 4, 1, 64),  # Sq > Sk (causal: first 60 rows see no key), MQA 4:1
    (1, 97, 97, 2, 2, 80),  # MHA, odd length
    (1, 65, 64, 8, 2, 128),  # GQA 4:1 with several kv heads
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
    assert (
        (out[:, rows, 0] == 0).all() and torch.isneginf(lse[:, 0, rows]).all() and (dq[:, rows, 0] == 0).all()
    )


def test_long_odd_sequence_block_sparse():
    # seqlen 1025: one partial tile after 32 full ones; sparse so the interpreter run stays ~4 s.
    mask = _random_block_mask(1, 2, 1025, 1025, 64, 0.3)
    _check_against_reference((1, 1025, 1025, 2, 1, 64), True, torch.float16, mask, 64)


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
    for a, b in zip((*dense, *grads_dense), (*sparse, *grads_sparse), strict=True):
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
    """The launcher checks only the Triton limits; shapes, dtypes and the mask are checked (with the same
    messages) by the public entry point, which is the one that runs them on the Triton backend."""
    q, k, v, _ = _make_inputs(1, 64, 64, 2, 1, 64, torch.float32)
    kw = dict(causal=False, softmax_scale=0.125)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention_forward_triton(q, k, v, block_size=40, **kw)
    with pytest.raises(ValueError, match="head_dim 320 > 256"):
        flash_attention_forward_triton(*(torch.zeros(1, 16, 1, 320, device=DEVICE),) * 3, **kw)
    with pytest.raises(TypeError, match="float64"):
        flash_attention_forward_triton(q.double(), k.double(), v.double(), **kw)
    kw["backend"] = "triton"
    with pytest.raises(TypeError, match="block_mask"):
        flash_attention_forward(
            q, k, v, block_mask=torch.ones(1, 2, 1, 1, device=DEVICE), block_size=64, **kw
        )
    with pytest.raises(ValueError, match="block_mask"):
        flash_attention_forward(
            q, k, v, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), block_size=64, **kw
        )
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_forward(
            q[:, :, :1].expand(-1, -1, 3, -1), k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), **kw
        )
    with pytest.raises(TypeError, match="dtype"):
        flash_attention_forward(q.half(), k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_api_autograd_on_triton(dtype):
    """flash_attention(..., backend="triton") with autograd: the same contract as the native backend."""
    q, k, v, dout = _make_inputs(2, 37, 50, 4, 2, 64, dtype)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    out.backward(dout)
    oracle, same = attention_oracle(q, k, v, dout, causal=True)
    for name, ours, lo, hi in zip(
        ("out", "lse", "dq", "dk", "dv"),
        (out.detach(), lse, q.grad, k.grad, v.grad),
        same,
        oracle,
        strict=True,
    ):
        assert_within_oracle(f"triton api {name}", ours, lo, hi, dtype)
