"""The attention core (forward, LSE, backward) of every CPU backend against the fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention import (
    attention_delta,
    flash_attention,
    flash_attention_backward,
    flash_attention_backward_ref,
    flash_attention_forward,
    flash_attention_ref,
)
from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle, attention64, attention_oracle

CPU_BACKENDS = ["native", "reference"]

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): the shapes that break kernels.
SHAPES = [
    (1, 1, 1, 2, 2, 64),  # seq 1
    (1, 97, 97, 4, 4, 64),  # odd length, MHA
    (3, 128, 128, 4, 1, 80),  # batch 3, MQA, head_dim 80
    (1, 1025, 1025, 4, 1, 128),  # one past a tile, MQA
    (1, 1025, 1025, 8, 2, 64),  # GQA 4:1
    (3, 97, 1025, 4, 1, 64),  # Sq < Sk (chunked prefill / ring step)
    (1, 1025, 97, 4, 4, 128),  # Sq > Sk: with causal, the first 928 rows see no key
    (1, 1, 1025, 8, 2, 80),  # decode-like: one query, many keys (the grouped decode tile, GQA 4:1)
    (3, 1, 1537, 8, 1, 64),  # decode, MQA, batch 3, keys one past three 512-key tiles
    (3, 128, 97, 2, 2, 128),
]
DTYPES = [torch.float32, torch.bfloat16]


def make_qkv(shape, dtype, requires_grad=False):
    b, sq, sk, hq, hkv, d = shape
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def check_against_oracle(backend, shape, dtype, causal, block_mask=None, block_size=128):
    kw = dict(causal=causal, block_mask=block_mask, block_size=block_size)
    q, k, v = make_qkv(shape, dtype, requires_grad=True)
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    oracle, same = attention_oracle(q, k, v, dout, **kw)
    ours = (out.detach(), lse, q.grad, k.grad, v.grad)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert q.grad.dtype == dtype and k.grad.dtype == dtype and v.grad.dtype == dtype
    for name, a, s, o in zip(("out", "lse", "dq", "dk", "dv"), ours, same, oracle, strict=True):
        assert_within_oracle(f"{backend} {name}", a, s, o, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_oracle(backend, shape, causal, dtype):
    check_against_oracle(backend, shape, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp16_native(causal):
    check_against_oracle("native", (2, 97, 130, 4, 2, 64), torch.float16, causal)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_block_mask_matches_oracle(block_size, causal, dtype):
    """Random tile masks, with some query blocks fully masked (their rows: out 0, lse -inf)."""
    b, sq, sk, hq, hkv = 2, 300, 333, 4, 2
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    mask = torch.rand(b, hq, nq, nk) < 0.5
    mask[0, 1, 1] = False  # a fully masked query block
    check_against_oracle("native", (b, sq, sk, hq, hkv, 64), dtype, causal, mask, block_size)


def test_all_ones_mask_equals_dense():
    q, k, v = make_qkv((2, 257, 300, 4, 2, 64), torch.float32)
    mask = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    dense = flash_attention_forward(q, k, v, causal=True)
    sparse = flash_attention_forward(q, k, v, causal=True, block_mask=mask, block_size=128)
    # Same tiles up to the tile split, so equal to rounding, not bit-exact.
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-5, atol=1e-6)


def test_mask_skipping_is_exact_zero_for_dead_rows():
    q, k, v = make_qkv((1, 200, 200, 2, 2, 64), torch.bfloat16, requires_grad=True)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[:, :, 1, 0] = True  # first query block sees nothing
    out, lse = flash_attention(q, k, v, block_mask=mask, return_lse=True)
    out.sum().backward()
    assert torch.isneginf(lse[:, :, :128]).all() and torch.isfinite(lse[:, :, 128:]).all()
    assert (out[:, :128] == 0).all()
    assert (q.grad[:, :128] == 0).all()
    assert not any(torch.isnan(t).any() for t in (out, q.grad, k.grad, v.grad))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 53, 4, 2, 16), (1, 64, 20, 3, 1, 8), (1, 130, 130, 2, 2, 32)])
def test_reference_backend_equals_independent_oracle(shape, causal):
    """The library's reference (forward and its explicit backward formula) against tests/oracle.py's
    attention64 (fp64 softmax(QK^T)V with an explicit mask, gradients by autograd), which shares no code
    with it: GQA/MQA, Sq != Sk, causal rows that see no key (Sq > Sk), and a block mask."""
    q, k, v = (t.double() for t in make_qkv(shape, torch.float32))
    b, sq, sk, hq = shape[:4]
    g = torch.Generator().manual_seed(3)
    block_mask = torch.rand(b, hq, -(-sq // 16), -(-sk // 16), generator=g) < 0.7
    for bm in (None, block_mask):
        kw = dict(causal=causal, block_mask=bm, block_size=16)
        out, lse = flash_attention_ref(q, k, v, **kw)
        dout = torch.randn_like(out)
        grads = flash_attention_backward_ref(dout, q, k, v, out, lse, **kw)
        oracle = attention64(q, k, v, dout, **kw)
        for name, a, o in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), oracle, strict=True):
            assert torch.equal(torch.isneginf(a), torch.isneginf(o)), name
            fin = torch.isfinite(o)
            torch.testing.assert_close(a[fin], o[fin], rtol=1e-10, atol=1e-12, msg=name)


def test_backward_with_external_global_lse():
    """Ring backward: one key chunk's grads from the *global* out/lse sum to the one-shot grads."""
    q, k, v = make_qkv((1, 150, 300, 4, 2, 64), torch.float32)
    out, lse = flash_attention_forward(q, k, v)
    dout = torch.randn_like(out)
    dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse)
    dq_sum = torch.zeros_like(dq)
    dks, dvs = [], []
    for lo, hi in ((0, 128), (128, 200), (200, 300)):
        a, b, c = flash_attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse)
        dq_sum += a
        dks.append(b)
        dvs.append(c)
    torch.testing.assert_close(dq_sum, dq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(dks, 1), dk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(dvs, 1), dv, rtol=1e-4, atol=1e-5)


def test_noncontiguous_inputs():
    """(B, H, S, D)-stored tensors viewed as (B, S, H, D), as users get from transpose()."""
    q, k, v = (torch.randn(2, 4, 97, 64).transpose(1, 2) for _ in range(3))
    out, lse = flash_attention_forward(q, k, v, causal=True)
    ref, ref_lse = attention64(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


def test_empty_key_sequence_gives_zero_and_neg_inf():
    q = torch.randn(1, 5, 2, 64)
    k = v = torch.randn(1, 0, 2, 64)
    out, lse = flash_attention_forward(q, k, v)
    assert (out == 0).all() and torch.isneginf(lse).all()
    # The grouped decode tile (one query, GQA) over an empty cache shard.
    out, lse = flash_attention_forward(torch.randn(2, 1, 8, 64), k.expand(2, 0, 2, 64), k.expand(2, 0, 2, 64))
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_over_cache_views(dtype):
    """Decode as sharded_decode_attention calls it: one query per head, GQA, K/V the first rows of a larger
    cache buffer (strided views), fp32 partials; every query head of a group gets its own row. The suite
    runs with the extension built (test_native_is_built), so no skip: a missing kernel fails here."""
    buf_k, buf_v = (torch.randn(3, 700, 2, 64, dtype=dtype) for _ in range(2))
    q = torch.randn(3, 1, 16, 64, dtype=dtype)[:, :, :8]  # heads strided too
    k, v = buf_k[:, :613], buf_v[:, :613]
    out, lse = flash_attention_forward(q, k, v, out_dtype=torch.float32, backend="native")
    ref, ref_lse = attention64(q, k, v, causal=False)  # exact for these (already rounded) inputs
    # fp16/bf16 rows are widened exactly and computed in fp32, so fp32 rounding is the only error.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32 and not (out[:, :, 0] == out[:, :, 1]).all()


def test_default_backend_follows_device():
    from longmoe.runtime import select_backend, use_backend

    q = torch.randn(1, 2, 1, 8)
    assert select_backend(q) == ("native" if native_available() else "reference")
    with use_backend("reference"):
        assert select_backend(q) == "reference"
        assert select_backend(q, backend="native") == "native"
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("cuda-magic"):
            pass


def test_backend_env_var(monkeypatch):
    from longmoe.runtime import select_backend

    q = torch.randn(1, 2, 1, 8)
    monkeypatch.setenv("LONGMOE_BACKEND", "reference")
    assert select_backend(q) == "reference"
    monkeypatch.setenv("LONGMOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend='bogus'"):
        select_backend(q)


def test_native_is_built():
    """`make venv` builds the extension: the suite must exercise the C++ kernels, not the fallback."""
    assert native_available(), (
        "longmoe._C is not built; run `make venv` (pip install --no-build-isolation -e .)"
    )
    assert hasattr(torch.ops.longmoe, "flash_attn_fwd") and hasattr(torch.ops.longmoe, "flash_attn_bwd")


def test_torch_compile_traces_native_op():
    """The fake kernels let torch.compile trace the custom op (no graph break, right shapes)."""
    q, k, v = make_qkv((1, 33, 40, 4, 2, 16), torch.float32)

    def f(q, k, v):
        out, lse = torch.ops.longmoe.flash_attn_fwd(q, k, v, None, 128, True, 0.25)
        return out * 2, lse

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out, lse = f(fq, fk, fv)
        assert out.shape == (1, 33, 4, 16) and lse.shape == (1, 4, 33) and lse.dtype == torch.float32
    eager = f(q, k, v)
    compiled = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled[0], eager[0])


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_fp32_partials_and_external_delta(backend, dtype):
    """What ring steps use: fp32 out partials, backward from (lse, delta) without out, fp32 gradients."""
    if backend == "triton" and dtype == torch.bfloat16:
        dtype = torch.float16  # the Triton interpreter mishandles bf16 dots; fp16 exercises the same path
    shape = (2, 70, 97, 4, 2, 64)
    q, k, v = make_qkv(shape, dtype)
    dout = torch.randn_like(q)
    kw = dict(causal=True, backend=backend)
    out32, lse = flash_attention_forward(q, k, v, out_dtype=torch.float32, **kw)
    assert out32.dtype == torch.float32
    oracle, same = attention_oracle(q, k, v, dout, causal=True)
    assert_within_oracle("fp32 out", out32, same[0], oracle[0], dtype)
    # Rounded once, the fp32 partial is the dtype output.
    out, _ = flash_attention_forward(q, k, v, **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out32.to(dtype), out, rtol=0, atol=0)

    delta = attention_delta(dout, out32)
    grads = flash_attention_backward(dout, q, k, v, None, lse, delta=delta, grad_dtype=torch.float32, **kw)
    for name, g, s, o in zip(("dq", "dk", "dv"), grads, same[2:], oracle[2:], strict=True):
        assert g.dtype == torch.float32
        assert_within_oracle(f"{backend} {name} from delta", g, s, o, dtype)
    # An fp32 out is accepted directly too (delta is computed from it).
    grads_out = flash_attention_backward(dout, q, k, v, out32, lse, grad_dtype=torch.float32, **kw)
    for a, b in zip(grads, grads_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_long_keys_use_tall_tiles(causal):
    """Sk >= 8192 switches the bf16 tiles to 256 query rows (see choose_tiles): cover that path too."""
    check_against_oracle("native", (1, 300, 8200, 2, 1, 64), torch.bfloat16, causal)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_check_finite_names_the_tensor_and_index(name):
    """The documented choice for non-finite inputs: check_finite=True raises naming the tensor, the count
    and the first index; without it they are the caller's to prevent (not contained to the rows they touch)."""
    tensors = dict(zip("qkv", make_qkv((1, 20, 20, 2, 1, 8), torch.float32), strict=True))
    tensors[name][0, 7, 0, 3] = float("nan")
    with pytest.raises(
        ValueError, match=rf"{name} has 1 non-finite entries \(first at index \(0, 7, 0, 3\): nan\)"
    ):
        flash_attention(tensors["q"], tensors["k"], tensors["v"], causal=True, check_finite=True)
    tensors[name][0, 7, 0, 3] = float("inf")
    with pytest.raises(ValueError, match=rf"{name} has 1 non-finite entries"):
        flash_attention(tensors["q"], tensors["k"], tensors["v"], check_finite=True)


def test_fully_masked_rows_are_zero_with_neg_inf_lse_on_every_backend_path():
    """Causal with seqlen_q > seqlen_k: the first rows see no key: out 0, lse -inf, never NaN (forward and
    backward), dense and block-sparse."""
    q, k, v = make_qkv((1, 40, 16, 2, 2, 8), torch.float32)
    for bm in (None, torch.ones(1, 2, 3, 1, dtype=torch.bool)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flash_attention(*leaves, causal=True, return_lse=True, block_mask=bm, block_size=16)
        out.sum().backward()
        assert (out[:, :24] == 0).all() and torch.isneginf(lse[:, :, :24]).all()
        assert not any(torch.isnan(t).any() for t in (out, lse[:, :, 24:], *(x.grad for x in leaves)))
