"""The experts' SwiGLU (longmoe.moe.experts.SwiGLUFunction): on CPU fp32/bf16 the native
``torch.ops.longmoe.swiglu`` / ``swiglu_backward`` (csrc/moe/swiglu.cpp), elsewhere the PyTorch expression.
Forward and gradient against fp64 autograd of ``silu(gate) * up``, within twice PyTorch's own error in the same
dtype (tests/oracle.py); widths that leave 16-lane tails; non-finite gates; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longmoe.moe.experts import SwiGLUFunction
from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle

needs_native = pytest.mark.skipif(not native_available(), reason="the native extension is not built")


def _expression(h: torch.Tensor) -> torch.Tensor:
    f = h.shape[1] // 2
    return F.silu(h[:, :f]) * h[:, f:]


def _grads(fn, h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hs = h.detach().clone().requires_grad_(True)
    a = fn(hs)
    a.backward(da)
    return a.detach(), hs.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("rows", "ffn"), [(0, 16), (1, 1), (37, 15), (300, 16), (64, 77), (129, 256)])
def test_swiglu_matches_fp64(dtype, rows, ffn):
    torch.manual_seed(rows * 1000 + ffn)
    h = (torch.randn(rows, 2 * ffn) * 4).to(dtype)  # gates well into both tails of the sigmoid
    da = torch.randn(rows, ffn).to(dtype)
    ours = _grads(SwiGLUFunction.apply, h, da)
    same = _grads(_expression, h, da)
    oracle = _grads(_expression, h.double(), da.double())
    for name, o, s, w in zip(("a", "dh"), ours, same, oracle, strict=True):
        assert o.dtype == dtype and o.shape == w.shape
        if dtype == torch.float64:
            torch.testing.assert_close(o, w, rtol=1e-13, atol=1e-13)
        else:
            assert_within_oracle(f"{name} {dtype} {rows}x{ffn}", o.double(), s.double(), w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_special_values(dtype):
    """Non-finite and saturated gates, in vector lanes and in the scalar tail (ffn = 19): NaN and +-inf where the
    expression gives them, finite values where it does; silu(-inf) is NaN (-inf * 0), as in PyTorch."""
    gates = [float("inf"), float("-inf"), float("nan"), 100.0, -100.0, 0.0, -0.0, 1e-40, -88.0, 88.0]
    ffn = 19
    h = torch.randn(len(gates), 2 * ffn)
    for i, g in enumerate(gates):
        h[i, 3] = g  # a vector lane
        h[i, 17] = g  # the scalar tail
    h = h.to(dtype)
    da = torch.randn(len(gates), ffn).to(dtype)
    a, dh = _grads(SwiGLUFunction.apply, h, da)
    want_a, want_dh = _grads(_expression, h.double(), da.double())
    for got, want in ((a, want_a), (dh, want_dh)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isposinf(got), torch.isposinf(want))
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got.double()[fin], want[fin], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)  # fmt: skip


@needs_native
def test_native_swiglu_bad_input_and_schema():
    op, bwd = torch.ops.longmoe.swiglu, torch.ops.longmoe.swiglu_backward
    h = torch.randn(5, 8)
    with pytest.raises(
        RuntimeError, match=r"h must be \(rows, 2 \* ffn\) with an even width; got shape \[5, 7\]"
    ):
        op(torch.randn(5, 7))
    with pytest.raises(RuntimeError, match="h must be float32 or bfloat16; got Half"):
        op(h.half())
    with pytest.raises(RuntimeError, match=r"da must be \(rows=5, ffn=4\); got shape \[5, 8\]"):
        bwd(torch.randn(5, 8), h)
    with pytest.raises(RuntimeError, match="da must be Float as h; got BFloat16"):
        bwd(torch.randn(5, 4, dtype=torch.bfloat16), h)
    # a strided h (a column slice) gives the contiguous copy's result
    wide = torch.randn(5, 12)
    assert torch.equal(op(wide[:, :8]), op(wide[:, :8].contiguous()))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(op.default, (h,), test_utils=checks)
    torch.library.opcheck(bwd.default, (torch.randn(5, 4), h), test_utils=checks)
