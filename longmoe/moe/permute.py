"""Token dispatch: permute tokens into expert-contiguous order and back, with autograd.

Layers, in order (as :mod:`longmoe.attention.flash_attention`):

* kernels: ``torch.ops.longmoe.moe_dispatch_map / moe_permute / moe_unpermute / moe_unpermute_probs_grad``
  (C++, csrc/moe/moe_dispatch.cpp) for CPU tensors; :mod:`longmoe.kernels.moe_permute` (Triton) for CUDA;
* launchers: :func:`moe_dispatch_map`, :func:`moe_permute_forward`, :func:`moe_unpermute_forward`,
  :func:`moe_unpermute_probs_grad` (checks, backend choice);
* :class:`MoEPermuteFunction`, :class:`MoEUnpermuteFunction` (autograd);
* the public :func:`moe_permute` and :func:`moe_unpermute`;
* the pure-PyTorch ``*_ref`` functions beside them, which every backend is tested against.

Slots: token ``t``'s ``j``-th routing choice is slot ``s = t * top_k + j``; ``expert_ids[t, j]`` is its expert,
or ``-1`` when capacity dropped it. The :class:`DispatchMap` is a *stable* sort of the slots by expert: rows
of expert 0 first (in slot order), then expert 1, and so on; dropped slots get no row. Hence

* ``row_map (num_tokens, top_k)`` int64: the row of slot ``(t, j)``, ``-1`` if dropped;
* ``src_slot (num_rows,)`` int64: the slot each row came from (``num_rows`` = number of kept slots);
* ``tokens_per_expert (num_experts,)`` int64: rows per expert, so expert ``e`` owns the contiguous rows
  ``[cumsum[e-1], cumsum[e])``.

``permute``: ``out[i] = x[src_slot[i] // top_k]``. ``unpermute``: ``out[t] = sum_j probs[t, j] *
y[row_map[t, j]]`` over the kept slots, accumulated from -0.0 in order ``j = 0..top_k-1`` in fp32 (fp64 for
fp64 inputs) and rounded once; a token whose slots were all dropped gets exactly +0. Permute then unpermute
with unit weights and ``top_k=1`` returns the input bit for bit (signed zeros included) on every backend, and
the weighted combine is bit-identical across backends (no FMA contraction in the C++ kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from longmoe.runtime.backend import select_backend
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.native import register_fake

__all__ = [
    "DispatchMap",
    "moe_dispatch_map",
    "moe_dispatch_map_ref",
    "moe_permute",
    "moe_permute_forward",
    "moe_permute_ref",
    "moe_unpermute",
    "moe_unpermute_forward",
    "moe_unpermute_ref",
    "moe_unpermute_probs_grad",
    "moe_unpermute_probs_grad_ref",
    "MoEPermuteFunction",
    "MoEUnpermuteFunction",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class DispatchMap(NamedTuple):
    """Where every routed slot goes (see the module docstring).

    row_map: (num_tokens, top_k) int64, row of each slot in expert-sorted order, -1 if dropped.
    src_slot: (num_rows,) int64, flat slot ``t * top_k + j`` of each sorted row.
    tokens_per_expert: (num_experts,) int64, rows per expert (sums to num_rows).
    """

    row_map: torch.Tensor
    src_slot: torch.Tensor
    tokens_per_expert: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.row_map.shape[0]

    @property
    def top_k(self) -> int:
        return self.row_map.shape[1]

    @property
    def num_rows(self) -> int:
        return self.src_slot.shape[0]


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def _check_rows(name: str, t: torch.Tensor, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {shape}; got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating dtype {_FLOAT_DTYPES}; got {t.dtype}")


def _check_index(name: str, t: torch.Tensor, dim: int, shape: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dim:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an int64 tensor {shape}; got {got}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")


def _check_probs(probs: torch.Tensor | None, tokens: int, top_k: int, device: torch.device) -> None:
    if probs is None:
        return
    if not isinstance(probs, torch.Tensor) or probs.dtype not in _FLOAT_DTYPES:
        got = probs.dtype if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise TypeError(f"probs must be a floating tensor; got {got}")
    if tuple(probs.shape) != (tokens, top_k):
        raise ValueError(f"probs must be (num_tokens, top_k) = {(tokens, top_k)}; got {tuple(probs.shape)}")
    if probs.device != device:
        raise ValueError(f"probs must be on {device}; got {probs.device}")


def _check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in (torch.int64, torch.int32):
        got = expert_ids.dtype if isinstance(expert_ids, torch.Tensor) else type(expert_ids).__name__
        raise TypeError(f"expert_ids must be an int64 or int32 tensor; got {got}")
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be 2-D (num_tokens, top_k); got shape {tuple(expert_ids.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1; got {num_experts!r}")


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def moe_dispatch_map_ref(expert_ids: torch.Tensor, num_experts: int) -> DispatchMap:
    """Stable sort of the slots by expert in plain PyTorch.

    expert_ids: (num_tokens, top_k) int64/int32, values in [0, num_experts) or -1 (dropped).
    """
    _check_expert_ids(expert_ids, num_experts)
    flat = expert_ids.reshape(-1).long()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"expert_ids holds {bad}, outside [-1, num_experts={num_experts}) (-1 marks a dropped slot)"
            )
    key = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    tokens_per_expert = counts[:num_experts].clone()
    rows = flat.numel() - int(counts[num_experts])
    src_slot = order[:rows].contiguous()
    row_map = torch.full_like(flat, -1)
    row_map[src_slot] = torch.arange(rows, device=flat.device)
    return DispatchMap(row_map.view(expert_ids.shape), src_slot, tokens_per_expert)


def moe_permute_ref(
    x: torch.Tensor,
    src_slot: torch.Tensor,
    top_k: int,
    probs: torch.Tensor | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Gather rows into expert order: (num_tokens, hidden) -> (num_rows, hidden) in x's dtype.

    With ``probs (num_tokens, top_k)`` each row is scaled by its slot's weight, computed in fp32 (fp64 for
    fp64 x) when ``upcast`` and rounded once; ``upcast=False`` multiplies in x's dtype.
    """
    rows = x.index_select(0, torch.div(src_slot, top_k, rounding_mode="floor"))
    if probs is None:
        return rows
    ct = accumulation_dtype(x.dtype) if upcast else x.dtype
    w = probs.reshape(-1).to(ct).index_select(0, src_slot)
    return (rows.to(ct) * w[:, None]).to(x.dtype)


def moe_unpermute_ref(
    y: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None = None, *, upcast: bool = True
) -> torch.Tensor:
    """Scatter rows back and combine: (num_rows, hidden) -> (num_tokens, hidden) in y's dtype.

    ``out[t] = sum_j probs[t, j] * y[row_map[t, j]]`` over slots with ``row_map >= 0``, summed in order
    ``j = 0..top_k-1``, in fp32 (fp64 for fp64 y) when ``upcast``, else in y's dtype.
    """
    tokens, top_k = row_map.shape
    ct = accumulation_dtype(y.dtype) if upcast else y.dtype
    if y.shape[0] == 0:
        return torch.zeros(tokens, y.shape[1], dtype=y.dtype, device=y.device)
    # -0.0 is the additive identity (-0 + x == x, -0 included): one kept unit-weight slot is reproduced
    # bit for bit. Dropped slots add nothing; a token with no kept slot is +0.
    neg_zero = torch.full((), -0.0, dtype=ct, device=y.device)
    out = neg_zero.expand(tokens, y.shape[1])
    for j in range(top_k):
        r = row_map[:, j]
        rows = y.index_select(0, r.clamp(min=0)).to(ct)
        if probs is not None:
            rows = probs[:, j : j + 1].to(ct) * rows
        out = out + torch.where((r >= 0)[:, None], rows, neg_zero)
    out = torch.where((row_map >= 0).any(1, keepdim=True), out, torch.zeros((), dtype=ct, device=y.device))
    return out.to(y.dtype)


def moe_unpermute_probs_grad_ref(
    dout: torch.Tensor, y: torch.Tensor, row_map: torch.Tensor, *, upcast: bool = True
) -> torch.Tensor:
    """Gradient of :func:`moe_unpermute_ref` w.r.t. probs: ``dprobs[t, j] = <dout[t], y[row_map[t, j]]>``.

    dout: (num_tokens, hidden); y: (num_rows, hidden); returns (num_tokens, top_k) in fp32 (fp64 for fp64 y);
    dropped slots get 0.
    """
    ct = accumulation_dtype(y.dtype) if upcast else y.dtype
    if y.shape[0] == 0:
        return torch.zeros(row_map.shape, dtype=accumulation_dtype(y.dtype), device=y.device)
    rows = y.index_select(0, row_map.clamp(min=0).reshape(-1)).view(*row_map.shape, -1)
    d = (dout.to(ct)[:, None, :] * rows.to(ct)).sum(-1)
    return torch.where(row_map >= 0, d, torch.zeros((), dtype=ct, device=y.device)).to(
        accumulation_dtype(y.dtype)
    )


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++ ops, for torch.compile: output shapes and dtypes only.
@register_fake("moe_dispatch_map")
def _moe_dispatch_map_fake(expert_ids, num_experts):
    # The number of kept slots (rows) is data-dependent: an unbacked symbolic size.
    rows = torch.library.get_ctx().new_dynamic_size()
    return (
        expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
        expert_ids.new_empty((rows,), dtype=torch.int64),
        expert_ids.new_empty((num_experts,), dtype=torch.int64),
    )


@register_fake("moe_permute")
def _moe_permute_fake(x, src_slot, top_k, probs):
    return x.new_empty((src_slot.shape[0], x.shape[1]))


@register_fake("moe_unpermute")
def _moe_unpermute_fake(y, row_map, probs):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@register_fake("moe_unpermute_probs_grad")
def _moe_unpermute_probs_grad_fake(dout, y, row_map):
    return y.new_empty(tuple(row_map.shape), dtype=accumulation_dtype(y.dtype))


def moe_dispatch_map(
    expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None
) -> DispatchMap:
    """Build the :class:`DispatchMap` of ``expert_ids (num_tokens, top_k)`` (values in [0, E) or -1).

    CPU: the C++ stable counting sort. CUDA: ``torch.argsort(stable=True)`` (a device radix sort; a Triton
    kernel would not beat it at the <= 1M slots of one layer), i.e. the reference.
    """
    _check_expert_ids(expert_ids, num_experts)
    name = select_backend(expert_ids, backend=backend)
    if name == "native":
        return DispatchMap(*torch.ops.longmoe.moe_dispatch_map(expert_ids, num_experts))
    return moe_dispatch_map_ref(expert_ids, num_experts)


def moe_permute_forward(
    x: torch.Tensor,
    src_slot: torch.Tensor,
    top_k: int,
    probs: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Permute without autograd. x: (num_tokens, hidden); src_slot: (num_rows,) int64; probs: None or
    (num_tokens, top_k). Returns (num_rows, hidden) in x's dtype."""
    _check_rows("x", x, "(num_tokens, hidden)")
    _check_index("src_slot", src_slot, 1, "(num_rows,)", x.device)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1; got {top_k!r}")
    _check_probs(probs, x.shape[0], top_k, x.device)
    name = select_backend(x, backend=backend)
    if name == "native":
        return torch.ops.longmoe.moe_permute(x, src_slot, top_k, probs)
    if name == "triton":
        from longmoe.kernels.moe_permute import moe_permute_triton

        return moe_permute_triton(x, src_slot, top_k, probs)
    return moe_permute_ref(x, src_slot, top_k, probs)


def moe_unpermute_forward(
    y: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Unpermute (and combine) without autograd. y: (num_rows, hidden); row_map: (num_tokens, top_k) int64;
    probs: None (unit weights) or (num_tokens, top_k). Returns (num_tokens, hidden) in y's dtype."""
    _check_rows("y", y, "(num_rows, hidden)")
    _check_index("row_map", row_map, 2, "(num_tokens, top_k)", y.device)
    _check_probs(probs, row_map.shape[0], row_map.shape[1], y.device)
    name = select_backend(y, backend=backend)
    if name == "native":
        return torch.ops.longmoe.moe_unpermute(y, row_map, probs)
    if name == "triton":
        from longmoe.kernels.moe_permute import moe_unpermute_triton

        return moe_unpermute_triton(y, row_map, probs)
    return moe_unpermute_ref(y, row_map, probs)


def moe_unpermute_probs_grad(
    dout: torch.Tensor, y: torch.Tensor, row_map: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """dprobs (num_tokens, top_k), fp32 (fp64 for fp64 y): ``<dout[t], y[row_map[t, j]]>``, 0 if dropped.

    dout: (num_tokens, hidden); y: (num_rows, hidden) in dout's dtype; row_map: (num_tokens, top_k) int64.
    """
    _check_rows("dout", dout, "(num_tokens, hidden)")
    _check_rows("y", y, "(num_rows, hidden)")
    _check_index("row_map", row_map, 2, "(num_tokens, top_k)", y.device)
    if dout.dtype != y.dtype or dout.shape[1] != y.shape[1] or dout.shape[0] != row_map.shape[0]:
        raise ValueError(
            f"dout must be (num_tokens={row_map.shape[0]}, hidden={y.shape[1]}) in y's dtype {y.dtype}; "
            f"got {tuple(dout.shape)} {dout.dtype}"
        )
    name = select_backend(y, backend=backend)
    if name == "native":
        return torch.ops.longmoe.moe_unpermute_probs_grad(dout, y, row_map)
    if name == "triton":
        from longmoe.kernels.moe_permute import moe_unpermute_probs_grad_triton

        return moe_unpermute_probs_grad_triton(dout, y, row_map)
    return moe_unpermute_probs_grad_ref(dout, y, row_map)


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class MoEPermuteFunction(torch.autograd.Function):
    """x (num_tokens, hidden) -> (num_rows, hidden); backward is unpermute with unit weights."""

    @staticmethod
    def forward(ctx, x, row_map, src_slot, backend):
        ctx.save_for_backward(row_map)
        ctx.backend = backend
        return moe_permute_forward(x, src_slot, row_map.shape[1], backend=backend)

    @staticmethod
    def backward(ctx, dout):
        (row_map,) = ctx.saved_tensors
        return moe_unpermute_forward(dout.contiguous(), row_map, backend=ctx.backend), None, None, None


class MoEUnpermuteFunction(torch.autograd.Function):
    """(y (num_rows, hidden), probs (num_tokens, top_k) | None) -> (num_tokens, hidden).

    Backward: ``dy = permute(dout, probs)`` and ``dprobs = <dout, y>`` per slot.
    """

    @staticmethod
    def forward(ctx, y, probs, row_map, src_slot, backend):
        ctx.save_for_backward(y, probs, row_map, src_slot)
        ctx.backend = backend
        return moe_unpermute_forward(y, row_map, probs, backend=backend)

    @staticmethod
    def backward(ctx, dout):
        y, probs, row_map, src_slot = ctx.saved_tensors
        dout = dout.contiguous()
        dy = dprobs = None
        if ctx.needs_input_grad[0]:
            dy = moe_permute_forward(dout, src_slot, row_map.shape[1], probs, backend=ctx.backend)
        if probs is not None and ctx.needs_input_grad[1]:
            dprobs = moe_unpermute_probs_grad(dout, y, row_map, backend=ctx.backend).to(probs.dtype)
        return dy, dprobs, None, None, None


def moe_permute(x: torch.Tensor, dispatch_map: DispatchMap, *, backend: str | None = None) -> torch.Tensor:
    """Tokens into expert-contiguous order, with autograd.

    x: (num_tokens, hidden). Returns (num_rows, hidden): row ``i`` is token ``src_slot[i] // top_k``; the rows
    of expert ``e`` are contiguous, ``tokens_per_expert[e]`` of them, experts in ascending order.
    """
    if x.dim() != 2 or x.shape[0] != dispatch_map.num_tokens:
        raise ValueError(
            f"x must be (num_tokens={dispatch_map.num_tokens}, hidden) to match the dispatch map; "
            f"got {tuple(x.shape)}"
        )
    return MoEPermuteFunction.apply(x, dispatch_map.row_map, dispatch_map.src_slot, backend)


def moe_unpermute(
    y: torch.Tensor,
    dispatch_map: DispatchMap,
    probs: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Back to token order, combining each token's expert outputs with ``probs``, with autograd.

    y: (num_rows, hidden) in expert order; probs: None (unit weights) or (num_tokens, top_k), differentiable.
    Returns (num_tokens, hidden) in y's dtype; tokens whose slots were all dropped are 0.
    """
    if y.dim() != 2 or y.shape[0] != dispatch_map.num_rows:
        raise ValueError(
            f"y must be (num_rows={dispatch_map.num_rows}, hidden) to match the dispatch map; got {tuple(y.shape)}"
        )
    return MoEUnpermuteFunction.apply(y, probs, dispatch_map.row_map, dispatch_map.src_slot, backend)
