"""Bad input raises an error that names the argument, its value and what was expected."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention import (
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    merge_attention_partials,
)


def qkv(b=1, sq=8, sk=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
    )


q, k, v = qkv()

CASES = {
    "q rank 3": (lambda: flash_attention(q[0], k, v), ValueError, r"q must be 4-D .* got 3-D"),
    "k rank 5": (lambda: flash_attention(q, k[None], v), ValueError, r"k must be 4-D"),
    "k/v shape": (lambda: flash_attention(q, k, v[:, :4]), ValueError, r"k and v must have the same shape"),
    "heads not divisible": (
        lambda: flash_attention(*qkv(hq=3, hkv=2)),
        ValueError,
        r"heads_q=3 .* heads_kv=2",
    ),
    "head dim mismatch": (
        lambda: flash_attention(q, torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)),
        ValueError,
        r"k head_dim=32 must equal q head_dim=16",
    ),
    "batch mismatch": (
        lambda: flash_attention(q, torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)),
        ValueError,
        r"k batch=2 must equal q batch=1",
    ),
    "dtype mix": (
        lambda: flash_attention(q, k.bfloat16(), v.bfloat16()),
        TypeError,
        r"share a dtype.*bfloat16",
    ),
    "device mix": (lambda: flash_attention(q, k.to("meta"), v.to("meta")), ValueError, r"one device.*meta"),
    "integer dtype": (
        lambda: flash_attention(q.long(), k.long(), v.long()),
        TypeError,
        r"q must be a floating",
    ),
    "empty head dim": (
        lambda: flash_attention(torch.randn(1, 8, 4, 0), torch.randn(1, 8, 2, 0), torch.randn(1, 8, 2, 0)),
        ValueError,
        r"head_dim must be >= 1",
    ),
    "zero heads": (
        lambda: flash_attention(torch.randn(1, 8, 0, 16), torch.randn(1, 8, 0, 16), torch.randn(1, 8, 0, 16)),
        ValueError,
        r"heads must be >= 1",
    ),
    "scale zero": (
        lambda: flash_attention(q, k, v, softmax_scale=0.0),
        ValueError,
        r"softmax_scale .* got 0.0",
    ),
    "scale negative": (
        lambda: flash_attention(q, k, v, softmax_scale=-1),
        ValueError,
        r"softmax_scale .* got -1",
    ),
    "scale nan": (lambda: flash_attention(q, k, v, softmax_scale=float("nan")), ValueError, r"softmax_scale"),
    "mask not bool": (
        lambda: flash_attention(q, k, v, block_mask=torch.ones(1, 4, 1, 1), block_size=8),
        TypeError,
        r"block_mask must be a bool tensor; got torch.float32",
    ),
    "mask shape": (
        lambda: flash_attention(q, k, v, block_mask=torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=8),
        ValueError,
        r"block_mask must be .* = \(1, 4, 1, 1\) .* got \(1, 2, 1, 1\)",
    ),
    "block size": (
        lambda: flash_attention(q, k, v, block_mask=torch.ones(1, 4, 1, 1, dtype=torch.bool), block_size=0),
        ValueError,
        r"block_size must be a positive int; got 0",
    ),
    "not a tensor": (lambda: flash_attention([1.0], k, v), TypeError, r"q must be a torch.Tensor; got list"),
    "backend name": (lambda: flash_attention(q, k, v, backend="cuDNN"), ValueError, r"backend='cuDNN'"),
    "backward lse shape": (
        lambda: flash_attention_backward(q, q, k, v, q, torch.zeros(1, 8, 4)),
        ValueError,
        r"lse must be \(batch, heads_q, seqlen_q\) = \(1, 4, 8\); got \(1, 8, 4\)",
    ),
    "backward lse dtype": (
        lambda: flash_attention_backward(q, q, k, v, q, torch.zeros(1, 4, 8, dtype=torch.bfloat16)),
        TypeError,
        r"lse must be float32",
    ),
    "backward dout shape": (
        lambda: flash_attention_backward(q[:, :4], q, k, v, q, torch.zeros(1, 4, 8)),
        ValueError,
        r"dout must have q's shape",
    ),
    "merge lse shape": (
        lambda: merge_attention_partials(q, torch.zeros(1, 8, 4), q, torch.zeros(1, 4, 8)),
        ValueError,
        r"lse must be \(batch, heads, seqlen\) = \(1, 4, 8\)",
    ),
    "backward delta shape": (
        lambda: flash_attention_backward(q, q, k, v, None, torch.zeros(1, 4, 8), delta=torch.zeros(1, 8, 4)),
        ValueError,
        r"delta",
    ),
    "backward needs out or delta": (
        lambda: flash_attention_backward(q, q, k, v, None, torch.zeros(1, 4, 8)),
        ValueError,
        r"out.*delta|delta.*out",
    ),
    "out_dtype": (
        lambda: flash_attention_forward(q, k, v, out_dtype=torch.int32),
        (TypeError, ValueError),
        r"out_dtype.*int32",
    ),
    "grad_dtype": (
        lambda: flash_attention_backward(q, q, k, v, q, torch.zeros(1, 4, 8), grad_dtype=torch.int64),
        (TypeError, ValueError),
        r"grad_dtype.*int64",
    ),
    "mask needs block size": (
        lambda: flash_attention(q, k, v, block_mask=torch.ones(1, 4, 1, 1, dtype=torch.bool), block_size=-8),
        ValueError,
        r"block_size must be a positive int; got -8",
    ),
    "merge lse integer": (
        lambda: merge_attention_partials(q, torch.zeros(1, 4, 8, dtype=torch.int64), q, torch.zeros(1, 4, 8)),
        TypeError,
        r"lse must be floating point; got torch.int64",
    ),
    "merge out shape": (
        lambda: merge_attention_partials(q, torch.zeros(1, 4, 8), q[..., :8], torch.zeros(1, 4, 8)),
        ValueError,
        r"block_out shape",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_argument(case):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_native_op_checks_its_own_inputs():
    """The C++ op is public too (torch.ops.longmoe.*): its TORCH_CHECKs name the argument."""
    with pytest.raises(RuntimeError, match=r"heads_q=3 must be a multiple of heads_kv=2"):
        torch.ops.longmoe.flash_attn_fwd(
            torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), None, 128, False, 1.0
        )
    with pytest.raises(RuntimeError, match=r"block_mask must be bool"):
        torch.ops.longmoe.flash_attn_fwd(q, k, v, torch.ones(1, 4, 1, 1), 8, False, 1.0)
    with pytest.raises(RuntimeError, match=r"lse must be float32"):
        torch.ops.longmoe.flash_attn_bwd(
            q, q, k, v, q, torch.zeros(1, 4, 8, dtype=torch.float64), None, 128, False, 1.0
        )
