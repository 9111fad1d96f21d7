"""The tolerance rule every numerical test uses (STYLE.md).

``err(ours, oracle64) <= 2 * err(same_dtype_reference, oracle64) + atol``, errors as max-abs over the
entries where the oracle is finite. The same-dtype reference is what plain PyTorch gets in that dtype,
so the bound says: at most twice PyTorch's own rounding error, plus a small floor.
"""

from __future__ import annotations

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
    return float((x.double() - oracle.double())[fin].abs().max())


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


def attention_oracle(q, k, v, dout, **kw):
    """fp64 oracle and same-dtype reference for attention: ``((out, lse, dq, dk, dv), (same ...))``.

    q, dout: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim); ``kw`` as
    :func:`longmoe.attention.flash_attention_ref` (causal, softmax_scale, block_mask, block_size).
    """
    q64, k64, v64, do64 = (t.detach().double() for t in (q, k, v, dout))
    o64, l64 = flash_attention_ref(q64, k64, v64, **kw)
    g64 = flash_attention_backward_ref(do64, q64, k64, v64, o64, l64, **kw)
    qs, ks, vs = (t.detach() for t in (q, k, v))
    os_, ls = flash_attention_ref(qs, ks, vs, upcast=False, **kw)
    gs = flash_attention_backward_ref(dout, qs, ks, vs, os_, ls, upcast=False, **kw)
    return (o64, l64, *g64), (os_, ls, *gs)
