"""The fp64 attention oracle and the tolerance rule every numerical test uses (STYLE.md).

The oracle (:func:`attention64`) is written here, apart from the library: plain fp64
``softmax(Q K^T * scale) V`` with an explicit element mask built from index comparisons (bottom-right
causal, block mask expanded tile by tile), K/V heads indexed per query head, and gradients from fp64
autograd, not from the library's backward formula. So ``flash_attention_ref`` (the library's own
reference backend) is tested against it like every other backend.

``err(ours, oracle64) <= 2 * err(same_dtype_reference, oracle64) + atol``, errors as max-abs over the
entries where the oracle is finite. The same-dtype reference is what plain PyTorch gets in that dtype,
so the bound says: at most twice PyTorch's own rounding error, plus a small floor.
"""

from __future__ import annotations

import math

import torch

from longmoe.attention import flash_attention_backward_ref, flash_attention_ref

# The floor under the bound. The same-dtype reference can be (nearly) exact by luck on tiny problems
# (seq 1 or one visible key), where the bound would otherwise be 0; these floors are ~8 ulp of an O(1)
# value in each dtype, well below any real bug (a wrong mask or scale shows up as O(0.1)).
ATOL = {torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    fin = torch.isfinite(oracle)
    if not bool(fin.any()):
        return 0.0
    return float((x.detach().double() - oracle.detach().double())[fin].abs().max())


def assert_within_oracle(
    name: str, ours: torch.Tensor, same: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype
) -> None:
    """Assert ``ours`` is within twice the same-dtype reference's error of the fp64 oracle (+ a floor)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN in result"
    # -inf / finite pattern must match exactly (rows that see no key).
    assert torch.equal(torch.isneginf(ours), torch.isneginf(oracle)), f"{name}: -inf pattern differs"
    e_ours, e_same = max_err(ours, oracle), max_err(same, oracle)
    bound = 2 * e_same + ATOL[dtype]
    assert e_ours <= bound, f"{name}: err {e_ours:.3e} > 2 * same-dtype err {e_same:.3e} + {ATOL[dtype]:.0e}"


def _element_mask(b, hq, sq, sk, causal, block_mask, block_size, device) -> torch.Tensor:
    """(batch, heads_q, seqlen_q, seqlen_k) bool: which key each query sees."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned: the last query sees the last key
        mask = j <= i + (sk - sq)
    mask = mask.expand(b, hq, sq, sk)
    if block_mask is not None:
        mask = mask & block_mask[:, :, i // block_size, j // block_size]
    return mask


def attention64(q, k, v, dout=None, *, causal=False, softmax_scale=None, block_mask=None, block_size=128):
    """fp64 oracle: ``(out, lse)``, or ``(out, lse, dq, dk, dv)`` with ``dout``.

    q, dout: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim); out like q;
    lse (batch, heads_q, seqlen_q). A row that sees no key: out 0, lse -inf, zero gradients.
    """
    q64, k64, v64 = (t.detach().double().requires_grad_(dout is not None) for t in (q, k, v))
    b, sq, hq, d = q64.shape
    sk, hkv = k64.shape[1], k64.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    kv_head = torch.arange(hq) // (hq // hkv)  # the K/V head each query head reads
    kh, vh = k64[:, :, kv_head], v64[:, :, kv_head]  # (b, sk, hq, d): indexed, not a library helper
    scores = torch.einsum("bihd,bjhd->bhij", q64, kh) * scale
    mask = _element_mask(b, hq, sq, sk, causal, block_mask, block_size, q64.device)
    seen = mask.any(-1, keepdim=True)  # rows with at least one visible key
    safe = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=torch.float64))
    safe = torch.where(seen, safe, torch.zeros_like(scores))  # no NaN from all--inf rows
    p = torch.softmax(safe, dim=-1) * seen
    out = torch.einsum("bhij,bjhd->bihd", p, vh)
    lse = torch.where(
        seen[..., 0], torch.logsumexp(safe, dim=-1), torch.tensor(float("-inf"), dtype=torch.float64)
    )
    if dout is None:
        return out.detach(), lse.detach()
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.detach().double())
    return out.detach(), lse.detach(), dq, dk, dv


def attention_oracle(q, k, v, dout, **kw):
    """fp64 oracle and same-dtype reference for attention: ``((out, lse, dq, dk, dv), (same ...))``.

    q, dout: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim); ``kw`` as
    :func:`longmoe.attention.flash_attention_ref` (causal, softmax_scale, block_mask, block_size).
    """
    oracle = attention64(q, k, v, dout, **kw)
    qs, ks, vs = (t.detach() for t in (q, k, v))
    os_, ls = flash_attention_ref(qs, ks, vs, upcast=False, **kw)
    gs = flash_attention_backward_ref(dout, qs, ks, vs, os_, ls, upcast=False, **kw)
    return oracle, (os_, ls, *gs)


def xattention_scores64(q, k, stride, block_size, causal, q_offset=None):
    """XAttention block scores in fp64, by definition (Python loops, no library code).

    q: (batch, seqlen_q, heads_q, head_dim); k: (batch, seqlen_k, heads_kv, head_dim). Returns fp64
    (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)): every stride x stride tile's
    antidiagonal sum of q k^T / (sqrt(head_dim) * stride), causal on the stride grid (``q_offset`` default
    seqlen_k - seqlen_q), softmax per query group, summed over block sub-grids, averaged over the block's
    (real) query groups and over the query heads of a KV group. Small shapes only.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    off = lk - lq if q_offset is None else q_offset
    s, g = stride, hq // hkv
    nq, nk = -(-lq // s), -(-lk // s)
    out = torch.zeros(b, hq, -(-lq // block_size), -(-lk // block_size), dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            full = q[bb, :, h].double() @ k[bb, :, h // g].double().T  # (lq, lk)
            anti = torch.full((nq, nk), float("-inf"), dtype=torch.float64)
            for r in range(nq):
                for j in range(nk):
                    if j * s >= lk or (causal and j * s > off + r * s + s - 1):
                        continue
                    tot = 0.0
                    for i in range(s):
                        qi, kj = r * s + s - 1 - i, j * s + i
                        if qi < lq and kj < lk:
                            tot += full[qi, kj].item()
                    anti[r, j] = tot / (math.sqrt(d) * s)
            p = torch.softmax(anti, -1).nan_to_num(0.0)
            rb = block_size // s
            for qb in range(out.shape[2]):
                for kb in range(out.shape[3]):
                    rows = p[qb * rb : (qb + 1) * rb]  # the block's real query groups only
                    out[bb, h, qb, kb] = rows[:, kb * rb : (kb + 1) * rb].sum() / rows.shape[0]
    if g > 1:
        out = out.view(b, hkv, g, *out.shape[2:]).mean(2).repeat_interleave(g, 1)
    return out


def near_tie_rows(scores: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows whose ranked selection could flip under a score perturbation of ``eps``: the first dropped block
    nearly reaches the threshold, the last kept one nearly misses it, or the two boundary blocks nearly tie.

    scores: (..., n_blocks); tau: broadcastable to (..., 1). Returns bool (...)."""
    s, _ = torch.sort(scores, dim=-1, descending=True)
    total = s.sum(-1, keepdim=True).clamp(min=1e-30)
    frac = (torch.cumsum(s, -1) - s) / total  # mass before each sorted block
    kept = ((frac < tau) & (s > 0)).sum(-1, keepdim=True)  # boundary index c
    last = (kept - 1).clamp(min=0)
    first_out = kept.clamp(max=s.shape[-1] - 1)
    gap = s.gather(-1, last) - s.gather(-1, first_out)
    near = ((frac.gather(-1, first_out) - tau).abs() < eps) | ((tau - frac.gather(-1, last)).abs() < eps)
    return (near | (gap.abs() < eps)).squeeze(-1)
