"""``torch.ops.longmoe.moe_scale_rows_dot`` (csrc/moe/combine_grad.cpp): the row-wise part of the backward of the
experts' second GEMM fused with the weighted combine (longmoe.moe.experts._LinearUnpermuteFunction). da = p * u and
pa = p * a are PyTorch's ``(u.float() * p).to(dtype)`` bit for bit (the fp32 product rounded to the dtype); the row
dots <u, a> are within twice PyTorch's own fp32 (fp64) summation error of fp64."""

from __future__ import annotations

import pytest
import torch

from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle

pytestmark = pytest.mark.skipif(not native_available(), reason="the native extension is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("rows", "ffn"), [(0, 16), (1, 1), (37, 15), (300, 64), (65, 77)])
def test_scale_rows_dot(dtype, rows, ffn):
    torch.manual_seed(rows + ffn)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(rows, ffn).to(dtype)
    a = torch.randn(rows, ffn).to(dtype)
    p = torch.rand(rows, dtype=acc)
    p[::5] = 0.0  # weight 0 (as after a zero-probability choice)
    da, pa, dot = torch.ops.longmoe.moe_scale_rows_dot(u, a, p)
    assert da.dtype == pa.dtype == dtype and dot.dtype == acc and dot.shape == (rows,)
    assert torch.equal(da, (u.to(acc) * p[:, None]).to(dtype))
    assert torch.equal(pa, (a.to(acc) * p[:, None]).to(dtype))
    oracle = (u.double() * a.double()).sum(1)
    same = (u.to(acc) * a.to(acc)).sum(1)
    if dtype == torch.float64:
        torch.testing.assert_close(dot, oracle, rtol=1e-13, atol=1e-13)
    else:
        assert_within_oracle(f"dot {dtype}", dot, same, oracle, torch.float32)


def test_scale_rows_dot_non_finite_and_bad_input():
    op = torch.ops.longmoe.moe_scale_rows_dot
    u = torch.randn(3, 20)
    a = torch.randn(3, 20)
    u[0, 2], u[1, 18], a[2, 5] = float("nan"), float("inf"), float("-inf")
    da, pa, dot = op(u, a, torch.ones(3))
    for got, want in ((da, u), (pa, a)):  # weight 1: the operands themselves, NaN and +-inf included
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert bool(dot.isnan()[0]) and not bool(dot[1:].isfinite().any())  # NaN and +-inf reach the dots
    with pytest.raises(
        RuntimeError, match=r"u and a must be \(rows, ffn\) alike; got \[3, 20\] and \[3, 19\]"
    ):
        op(u, a[:, :19], torch.ones(3))
    with pytest.raises(RuntimeError, match="a must be Float as u; got BFloat16"):
        op(u, a.bfloat16(), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"p must be \(rows=3,\) Float; got \[3\] BFloat16"):
        op(u.bfloat16(), a.bfloat16(), torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="u must be a floating dtype; got Int"):
        op(u.int(), a.int(), torch.ones(3))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(op.default, (u, a, torch.rand(3)), test_utils=checks)
