"""The attention core: flash attention with log-sum-exp, forward and backward, dense or block-sparse.

Every ring step of sequence parallelism and the XAttention sparse path call this op. Layers, in order:

* kernels: ``torch.ops.longmoe.flash_attn_fwd/_bwd`` (C++, csrc/attention/flash_attn.cpp) for CPU
  tensors; ``longmoe.kernels.flash_attention`` (Triton) for CUDA tensors;
* launchers: :func:`flash_attention_forward` / :func:`flash_attention_backward` (checks, backend choice);
* :class:`FlashAttentionFunction` (autograd);
* the public :func:`flash_attention`;
* the pure-PyTorch :func:`flash_attention_ref` beside them, which tests compare against in fp64.

Conventions: q ``(batch, seqlen_q, heads_q, head_dim)``, k/v ``(batch, seqlen_k, heads_kv, head_dim)``,
``heads_q % heads_kv == 0`` (GQA/MQA index the kv head, K/V are never repeated), lse
``(batch, heads_q, seqlen_q)`` fp32 natural log of the scaled scores. Causal attention with
``seqlen_q != seqlen_k`` is aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k -
seqlen_q``. A row that sees no key has output 0 and lse ``-inf``, never NaN.
"""

from __future__ import annotations

import math

import torch

from longmoe.runtime.backend import select_backend
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.native import register_fake

__all__ = [
    "flash_attention",
    "flash_attention_forward",
    "flash_attention_backward",
    "flash_attention_ref",
    "flash_attention_backward_ref",
    "attention_delta",
    "FlashAttentionFunction",
    "expand_block_mask",
    "check_finite_inputs",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    block_mask: torch.Tensor | None,
    block_size: int,
) -> float:
    """Validate the attention inputs; return the softmax scale (default ``1/sqrt(head_dim)``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seqlen, heads, head_dim); got {t.dim()}-D shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating dtype {_FLOAT_DTYPES}; got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    bq, _, hq, dq = q.shape
    bk, _, hkv, dk = k.shape
    if bq != bk:
        raise ValueError(f"k batch={bk} must equal q batch={bq}")
    if dq != dk:
        raise ValueError(f"k head_dim={dk} must equal q head_dim={dq}")
    if dq == 0:
        raise ValueError("head_dim must be >= 1; got q with head_dim=0")
    if hq == 0 or hkv == 0:
        raise ValueError(f"heads must be >= 1; got heads_q={hq}, heads_kv={hkv}")
    if hq % hkv != 0:
        raise ValueError(f"heads_q={hq} must be a multiple of heads_kv={hkv} (GQA/MQA)")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dq)
    elif not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0; got {softmax_scale!r}")
    if block_mask is not None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int; got {block_size!r}")
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            got = block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise TypeError(f"block_mask must be a bool tensor; got {got}")
        expect = (bq, hq, -(-q.shape[1] // block_size), -(-k.shape[1] // block_size))
        if tuple(block_mask.shape) != expect:
            raise ValueError(
                "block_mask must be (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)) "
                f"= {expect} for block_size={block_size}; got {tuple(block_mask.shape)}"
            )
        if block_mask.device != q.device:
            raise ValueError(f"block_mask must be on q's device {q.device}; got {block_mask.device}")
    return float(softmax_scale)


def check_finite_inputs(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor with a NaN or infinite entry, how many it has, and
    the index and value of the first one. One reduction per tensor: what ``check_finite=True`` costs.

    Non-finite inputs are the caller's to prevent. Without the check they are not contained: a NaN key
    or value can reach rows that never see it through ``0 * NaN`` in masked tiles, and the kernels'
    running maximum may skip a NaN score, so ``check_finite=True`` is the way to find them.
    """
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite entries (first at index {first}: {t[first].item()}); "
                "attention inputs must be finite"
            )


def _check_backward_inputs(dout, q, out, lse, delta) -> None:
    if out is None and delta is None:
        raise ValueError("flash_attention_backward needs out, or delta = rowsum(dout * out); got neither")
    for name, t in (("dout", dout), ("out", out)):
        if t is None:
            continue
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}; got {tuple(t.shape)}")
        if t.dtype != q.dtype and not (name == "out" and t.dtype == torch.float32):
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    b, sq, hq, _ = q.shape
    for name, t in (("lse", lse), ("delta", delta)):
        if t is None:
            continue
        if tuple(t.shape) != (b, hq, sq):
            raise ValueError(
                f"{name} must be (batch, heads_q, seqlen_q) = {(b, hq, sq)}; got {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 (the dtype the forward returns); got {t.dtype}")


def _check_result_dtype(dtype: torch.dtype | None, q: torch.Tensor, name: str) -> torch.dtype:
    if dtype is None:
        return q.dtype
    if dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{name} must be None, q's dtype {q.dtype} or torch.float32; got {dtype}")
    return dtype


def attention_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The softmax-backward row term ``D = rowsum(dout * out)`` in fp32.

    dout, out: (batch, seqlen_q, heads_q, head_dim) -> (batch, heads_q, seqlen_q) fp32 (fp64 if either is).
    Ring backward sends this instead of ``out``.
    """
    acc = accumulation_dtype(dout.dtype, out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def expand_block_mask(
    block_mask: torch.Tensor, block_size: int, seqlen_q: int, seqlen_k: int
) -> torch.Tensor:
    """(batch, heads, n_qblocks, n_kblocks) bool -> (batch, heads, seqlen_q, seqlen_k) element mask."""
    m = block_mask.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return m[:, :, :seqlen_q, :seqlen_k]


def _visible(
    sq: int, sk: int, causal: bool, block_mask: torch.Tensor | None, block_size: int, device
) -> torch.Tensor | None:
    """(batch|1, heads|1, seqlen_q, seqlen_k) bool of visible (query, key) pairs; None = all visible."""
    vis = None
    if causal:
        i = torch.arange(sq, device=device).unsqueeze(1)
        j = torch.arange(sk, device=device).unsqueeze(0)
        vis = (j <= i + (sk - sq))[None, None]
    if block_mask is not None:
        bm = expand_block_mask(block_mask, block_size, sq, sk)
        vis = bm if vis is None else vis & bm
    return vis


def _ref_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return accumulation_dtype(dtype)


def _repeat_kv(x: torch.Tensor, q_per_kv: int) -> torch.Tensor:
    return x if q_per_kv == 1 else x.repeat_interleave(q_per_kv, dim=2)


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    upcast: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention with LSE: the contract every backend is tested against.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim);
    block_mask: None or bool (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)).
    ``upcast=True`` computes in fp32 (fp64 inputs stay fp64: that is the oracle); ``upcast=False``
    computes in the inputs' dtype, which is the same-dtype baseline that sets test tolerances.

    Returns ``(out, lse)``: out (batch, seqlen_q, heads_q, head_dim) in ``out_dtype`` (default q's dtype);
    lse (batch, heads_q, seqlen_q) fp32 (fp64 for fp64 inputs).
    """
    scale = _check_inputs(q, k, v, softmax_scale, block_mask, block_size)
    ct = _ref_dtype(q.dtype, upcast)
    q_per_kv = q.shape[2] // k.shape[2]
    qc, kc, vc = q.to(ct), _repeat_kv(k, q_per_kv).to(ct), _repeat_kv(v, q_per_kv).to(ct)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    vis = _visible(q.shape[1], k.shape[1], causal, block_mask, block_size, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s.float() if ct != torch.float64 else s, dim=-1)  # (B, H, Sq)
    p = torch.exp(s - lse.to(ct).unsqueeze(-1))
    p = torch.where(torch.isneginf(lse).unsqueeze(-1), torch.zeros_like(p), p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vc)
    return out.to(out_dtype or q.dtype), lse.to(accumulation_dtype(q.dtype))


def flash_attention_backward_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    upcast: bool = True,
    delta: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention backward given (possibly global) out (or delta) and lse.

    With ``P = exp(scale * q k^T - lse)`` and ``D = rowsum(dout * out)``:
    ``dv = P^T dout``, ``dS = P * (dout v^T - D)``, ``dq = scale * dS k``, ``dk = scale * dS^T q``;
    dk/dv are summed over the query heads sharing each KV head. Shapes as :func:`flash_attention_backward`.
    """
    scale = _check_inputs(q, k, v, softmax_scale, block_mask, block_size)
    ct = _ref_dtype(q.dtype, upcast)
    hq, hkv = q.shape[2], k.shape[2]
    q_per_kv = hq // hkv
    qc, kc, vc = q.to(ct), _repeat_kv(k, q_per_kv).to(ct), _repeat_kv(v, q_per_kv).to(ct)
    doc, lsec = dout.to(ct), lse.to(ct)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    p = torch.exp(s - lsec.unsqueeze(-1))
    vis = _visible(q.shape[1], k.shape[1], causal, block_mask, block_size, q.device)
    dead = torch.isneginf(lsec).unsqueeze(-1)
    p = torch.where(dead if vis is None else dead | ~vis, torch.zeros_like(p), p)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, doc)
    dp = torch.einsum("bqhd,bkhd->bhqk", doc, vc)
    if delta is None:
        delta = (doc * out.to(ct)).sum(-1).transpose(1, 2)  # (B, H, Sq)
    ds = p * (dp - delta.to(ct).unsqueeze(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kc) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale
    if q_per_kv > 1:
        b, sk, _, d = dk.shape
        dk = dk.view(b, sk, hkv, q_per_kv, d).sum(3)
        dv = dv.view(b, sk, hkv, q_per_kv, d).sum(3)
    gdt = grad_dtype or q.dtype
    return dq.to(gdt), dk.to(gdt), dv.to(gdt)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++ ops, for torch.compile: output shapes and dtypes only.
@register_fake("flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, block_mask, block_size, causal, softmax_scale, out_dtype=None):
    b, sq, hq, _ = q.shape
    out = torch.empty_like(q, dtype=out_dtype or q.dtype, memory_format=torch.contiguous_format)
    return out, q.new_empty((b, hq, sq), dtype=accumulation_dtype(q.dtype))


@register_fake("flash_attn_bwd")
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, block_mask, block_size, causal, softmax_scale, delta=None, grad_dtype=None
):
    like = lambda t: torch.empty_like(t, dtype=grad_dtype or t.dtype, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward without autograd: ``(out, lse)``.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim);
    block_mask: None (dense) or bool (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)),
    tiles whose bit is False are skipped. ``out_dtype``: None (q's dtype) or torch.float32, for partials
    that are merged before being rounded once (ring steps). Returns out (batch, seqlen_q, heads_q, head_dim)
    and lse (batch, heads_q, seqlen_q) fp32.
    """
    scale = _check_inputs(q, k, v, softmax_scale, block_mask, block_size)
    odt = _check_result_dtype(out_dtype, q, "out_dtype")
    name = select_backend(q, backend=backend)
    if name == "native" and q.dtype == torch.float64:
        name = "reference"  # the C++ kernel computes in fp32 tiles; fp64 is the test oracle's dtype
    if name == "native":
        return torch.ops.longmoe.flash_attn_fwd(
            q, k, v, block_mask, block_size, bool(causal), scale, None if odt == q.dtype else odt
        )
    if name == "triton":
        from longmoe.kernels.flash_attention import flash_attention_forward_triton

        return flash_attention_forward_triton(
            q, k, v, causal=bool(causal), softmax_scale=scale, block_mask=block_mask, block_size=block_size,
            out_dtype=odt,
        )  # fmt: skip
    out, lse = flash_attention_ref(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=scale,
        block_mask=block_mask,
        block_size=block_size,
        out_dtype=odt,
    )
    return out, lse


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    delta: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention given an externally supplied out and lse.

    Ring backward passes the *global* out and lse (merged over all key chunks) with one local key chunk:
    the result is that chunk's exact contribution to dq and its exact dk/dv.

    dout: (batch, seqlen_q, heads_q, head_dim) in q's dtype; out: the same shape in q's dtype or fp32, or
    None when ``delta`` = rowsum(dout * out) (batch, heads_q, seqlen_q) fp32 is given instead (ring backward
    sends delta, not out); lse: (batch, heads_q, seqlen_q) fp32; q, k, v, block_mask as
    :func:`flash_attention_forward`. Returns ``(dq, dk, dv)`` shaped like q, k, v, in ``grad_dtype``
    (None = q's dtype, or torch.float32 for partial gradients summed across ring steps).
    """
    scale = _check_inputs(q, k, v, softmax_scale, block_mask, block_size)
    _check_backward_inputs(dout, q, out, lse, delta)
    gdt = _check_result_dtype(grad_dtype, q, "grad_dtype")
    name = select_backend(q, backend=backend)
    if name == "native" and q.dtype == torch.float64:
        name = "reference"
    if out is not None and out.dtype != q.dtype and delta is None:
        delta = attention_delta(dout, out)  # an fp32 out (merged ring partials) enters through delta
    if delta is not None:
        out = None
        if name != "reference":
            delta = delta.float()
    kwargs = dict(causal=bool(causal), softmax_scale=scale, block_mask=block_mask, block_size=block_size)
    if name == "native":
        lse32 = lse if lse.dtype == torch.float32 else lse.float()
        return torch.ops.longmoe.flash_attn_bwd(
            dout, q, k, v, out, lse32, block_mask, block_size, bool(causal), scale, delta,
            None if gdt == q.dtype else gdt,
        )  # fmt: skip
    if name == "triton":
        from longmoe.kernels.flash_attention import flash_attention_backward_triton

        return flash_attention_backward_triton(
            dout, q, k, v, out, lse.float(), delta=delta, grad_dtype=gdt, **kwargs
        )
    return flash_attention_backward_ref(dout, q, k, v, out, lse, delta=delta, grad_dtype=gdt, **kwargs)


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves (q, k, v, out, lse) and calls :func:`flash_attention_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, block_mask, block_size, backend):
        out, lse = flash_attention_forward(
            q, k, v, causal=causal, softmax_scale=softmax_scale, block_mask=block_mask,
            block_size=block_size, backend=backend,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask = block_mask
        ctx.args = (causal, softmax_scale, block_size, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, softmax_scale, block_size, backend = ctx.args
        dq, dk, dv = flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
            block_mask=ctx.block_mask, block_size=block_size, backend=backend,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    backend: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with autograd; optionally block-sparse and returning the log-sum-exp.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k, v: (batch, seqlen_k, heads_kv, head_dim); ``heads_q % heads_kv == 0`` (GQA/MQA).
        causal: causal mask, aligned bottom-right when seqlen_q != seqlen_k.
        softmax_scale: defaults to ``1/sqrt(head_dim)``.
        return_lse: also return lse (batch, heads_q, seqlen_q) fp32 (not differentiable).
        block_mask: None or bool (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)).
        block_size: tile edge of ``block_mask``.
        backend: force ``"native"``, ``"triton"`` or ``"reference"`` (default: by device; see
            :mod:`longmoe.runtime.backend`).
        check_finite: raise ``ValueError`` naming q, k or v if one holds a NaN or infinity (one reduction
            per tensor). Off by default, as in SDPA and flash-attention: non-finite inputs are then not
            contained to the rows they touch (see :func:`check_finite_inputs`).

    Returns:
        out (batch, seqlen_q, heads_q, head_dim) in q's dtype, or ``(out, lse)``. Rows that see no key
        give 0 and lse ``-inf``.
    """
    if check_finite:
        check_finite_inputs(q=q, k=k, v=v)
    out, lse = FlashAttentionFunction.apply(q, k, v, causal, softmax_scale, block_mask, block_size, backend)
    return (out, lse) if return_lse else out
