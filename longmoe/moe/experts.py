"""Grouped expert MLPs: every local expert in one pass over expert-contiguous rows.

Weights are stored as 3-D tensors, one row per local expert (the layout of Hugging Face 5.x's fused experts
and of megablocks' grouped GEMMs):

* ``linear_fc1 (num_local_experts, fc1_rows, hidden)`` with ``fc1_rows = 2 * ffn`` for SwiGLU (gate rows
  ``[0, ffn)``, up rows ``[ffn, 2 ffn)``, Megatron-core's and Hugging Face's order) or ``ffn`` for GELU;
* ``linear_fc2 (num_local_experts, hidden, ffn)``.

Experts of different widths (after slimming) are stored padded to ``ffn = config.ffn_hidden_size``; expert
``e`` uses gate rows ``[0, w_e)``, up rows ``[ffn, ffn + w_e)`` and fc2 columns ``[0, w_e)``. Its padding is
zero and receives zero gradient, because it is never read.

Execution: :class:`GroupedLinearFunction` runs, on CPU with the native extension,
``torch.ops.longmoe.moe_grouped_mm`` (one op call; in C++ one ``mm_out`` per expert straight into the output:
forward, dx, and dw with zeros for empty experts); elsewhere ``torch._grouped_mm`` (one kernel on CUDA) where
it runs for the device and dtype, else a loop of ``torch.mm`` over experts. On an earlier AMD EPYC box
(torch 2.13; 8 experts, 16K rows, 1024 -> 5632) ``_grouped_mm`` matched a Python loop (86 vs 81 GFLOP/s fp32,
325 vs 308 bf16); on a 2-core AVX-512/AMX Xeon its CPU weight gradient ran 1.4-2.7x slower than per-expert
``mm`` into the output (2K tokens x top-8, H 1024, 64-256 experts), and the native op made the bf16 layer's
forward+backward 1.3-2.2x faster (fp32 unchanged). Experts of different widths run the loop, each at its own
width.

Without expert parallelism on CPU, :meth:`GroupedExperts.forward_tokens` takes the tokens themselves: the
native op gathers each pass's rows of x into a reused scratch for the first GEMM and its weight gradient, and
the second GEMM's output is combined at once (:class:`_LinearUnpermuteFunction`), so the layer neither writes
nor keeps the (num_tokens * top_k, hidden) permuted copy of x, nor keeps the experts' (num_tokens * top_k,
hidden) output. The output is bit-identical to permute -> experts -> unpermute, the gradients equal to rounding.
The two combines (the second GEMM's output, and the first GEMM's dx in the backward) run as one native op,
``moe_grouped_mm_unpermute``: each expert row is stored at the slot it came from, so the combine reads every
token's top_k rows in sequence.
"""

from __future__ import annotations

import functools
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from longmoe.moe.config import MoEConfig
from longmoe.runtime.backend import select_backend
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.native import native_available, native_build_info, register_fake

__all__ = [
    "GroupedExperts",
    "SharedExpertMLP",
    "GroupedLinearFunction",
    "grouped_linear",
    "grouped_mm_available",
]


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """True when ``torch._grouped_mm`` runs forward and backward for ``dtype`` on ``device_type`` here.

    Probed once with a tiny problem (an empty group included): CPU builds of torch >= 2.9 take
    fp32/bf16/fp16; CUDA needs bf16 on sm90+.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(8, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([0, 8], device=device_type, dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs)
        torch._grouped_mm(a.t(), a, offs=offs)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


class GroupedLinearFunction(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ weight[e].T`` for every expert e, forward and backward.

    x: (num_rows, in) expert-contiguous; weight: (num_experts, out, in); offs: (num_experts,) int32
    cumulative row counts; counts: the same counts as a list (read by the per-expert loop and the native CPU
    op; None on the ``torch._grouped_mm`` path, which never brings the counts to the host). ``grouped``:
    ``"native"`` (torch.ops.longmoe.moe_grouped_mm, CPU), True (``torch._grouped_mm``) or False (a loop).
    Returns (num_rows, out).
    """

    @staticmethod
    def forward(ctx, x, weight, offs, counts, grouped):
        ctx.save_for_backward(x, weight, offs)
        ctx.counts, ctx.grouped = counts, grouped
        if grouped == "native":
            return torch.ops.longmoe.moe_grouped_mm(x, weight, counts, 0)
        if grouped:
            return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
        out = x.new_empty((x.shape[0], weight.shape[1]))
        for e, (s, t) in enumerate(_segments(counts)):
            torch.mm(x[s:t], weight[e].t(), out=out[s:t])
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs = ctx.saved_tensors
        dy = dy.contiguous()  # _grouped_mm rejects the stride-0 gradients of sum()/expand
        dx = dw = None
        if x.shape[0] == 0:  # no rows: zero gradients (an empty tensor keeps whatever strides it had)
            dx = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
            dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        elif ctx.grouped == "native":
            if ctx.needs_input_grad[0]:
                dx = torch.ops.longmoe.moe_grouped_mm(dy, _dx_operand(weight), ctx.counts, 1)
            if ctx.needs_input_grad[1]:
                dw = torch.ops.longmoe.moe_grouped_mm(dy, x, ctx.counts, 2)
        elif ctx.grouped:
            if ctx.needs_input_grad[0]:
                dx = torch._grouped_mm(dy, _dx_operand(weight), offs=offs)
            if ctx.needs_input_grad[1]:
                dw = torch._grouped_mm(dy.t(), x, offs=offs)
        else:
            segs = _segments(ctx.counts)
            if ctx.needs_input_grad[0]:
                dx = x.new_empty(x.shape)
                for e, (s, t) in enumerate(segs):
                    torch.mm(dy[s:t], weight[e], out=dx[s:t])
            if ctx.needs_input_grad[1]:
                dw = torch.empty_like(weight)
                for e, (s, t) in enumerate(segs):
                    torch.mm(dy[s:t].t(), x[s:t], out=dw[e])
        return dx, dw, None, None, None


@register_fake("moe_grouped_mm")
def _moe_grouped_mm_fake(a, b, counts, kind, src_slot=None, top_k=1, gather_b=False):
    if kind == 2:
        return a.new_empty((len(counts), a.shape[1], b.shape[1]))
    rows = src_slot.shape[0] if src_slot is not None else a.shape[0]
    return a.new_empty((rows, b.shape[1] if kind == 0 else b.shape[2]))


@register_fake("moe_grouped_mm_unpermute")
def _moe_grouped_mm_unpermute_fake(a, b, counts, kind, row_map, src_slot, probs):
    """Fake (meta) kernel of the C++ op, for torch.compile: (num_tokens, out) for kind 0, (num_tokens, in) for 1."""
    return a.new_empty((row_map.shape[0], b.shape[1] if kind == 0 else b.shape[2]))


def _has_forward_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks registered on ``module`` or globally (``nn.modules.module.register_module_forward_*``)."""
    from torch.nn.modules import module as m

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or m._global_forward_hooks
        or m._global_forward_pre_hooks
    )


class _PermuteLinearFunction(torch.autograd.Function):
    """``moe_permute(x) @ weight[e].T`` for the rows of every expert e, the rows gathered by the native op
    (never materialised; only x is saved). x: (num_tokens, in); weight: (num_experts, out, in); src_slot (num_rows,) and
    row_map (num_tokens, top_k) of the dispatch map; counts: rows per expert (list). Returns (num_rows, out).
    Backward: dx = unpermute(dy @ weight[e]) (permute's backward), dw[e] = dy_e^T @ gathered x_e."""

    @staticmethod
    def forward(ctx, x, weight, src_slot, row_map, counts):
        ctx.save_for_backward(x, weight, src_slot, row_map)
        ctx.counts = counts
        return torch.ops.longmoe.moe_grouped_mm(x, weight, counts, 0, src_slot, row_map.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, src_slot, row_map = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.longmoe.moe_grouped_mm_unpermute(
                dy, _dx_operand(weight), ctx.counts, 1, row_map, src_slot, None
            )
        if ctx.needs_input_grad[1]:
            dw = torch.ops.longmoe.moe_grouped_mm(dy, x, ctx.counts, 2, src_slot, row_map.shape[1], True)
        return dx, dw, None, None, None


class _LinearUnpermuteFunction(torch.autograd.Function):
    """The experts' second GEMM and the weighted combine in one: ``out[t] = sum_j p[t, j] y[row_map[t, j]]`` with
    ``y = a_e @ weight[e].T`` for the rows of every expert e, without keeping y for the backward.

    a: (num_rows, ffn) expert-contiguous; weight: (num_experts, hidden, ffn); probs: (num_tokens, top_k) or None
    (unit weights); row_map (num_tokens, top_k) and src_slot (num_rows,) of the dispatch map; counts: rows per
    expert (list). Returns (num_tokens, hidden); the forward is bit for bit ``moe_unpermute(grouped GEMM)``.

    Backward, with G = permute(dout) (unweighted, (num_rows, hidden)) and U = G_e @ weight[e] (num_rows, ffn):
    ``dprobs = <U, a>`` per row (an ffn-wide dot in place of the hidden-wide ``<dout, y>``), ``da = p * U`` and
    ``dweight[e] = G_e^T (p * a)_e``. So y (num_rows, hidden) is neither kept nor re-read: 64 MB less of saved
    activations per layer at 2K tokens x top-8, H 1024, fp32, and one pass over it less. The gradients equal
    those of permute -> GEMM -> unpermute up to rounding (p multiplies U, a (num_rows, ffn) instead of dout).
    """

    @staticmethod
    def forward(ctx, a, weight, probs, row_map, src_slot, counts):
        ctx.save_for_backward(a, weight, probs, row_map, src_slot)
        ctx.counts = counts
        return torch.ops.longmoe.moe_grouped_mm_unpermute(a, weight, counts, 0, row_map, src_slot, probs)

    @staticmethod
    def backward(ctx, dout):
        a, weight, probs, row_map, src_slot = ctx.saved_tensors
        need_a, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_p = probs is not None and ctx.needs_input_grad[2]
        g = torch.ops.longmoe.moe_permute(dout.contiguous(), src_slot, row_map.shape[1], None)
        u = (
            torch.ops.longmoe.moe_grouped_mm(g, _dx_operand(weight), ctx.counts, 1)
            if need_a or need_p
            else None
        )
        da, pa, dprobs = u, a, None
        if probs is not None and (need_a or need_p):  # one pass: p * u, p * a and the rows' dots <u, a>
            p = probs.reshape(-1).index_select(0, src_slot).to(accumulation_dtype(a.dtype))
            da, pa, rows = torch.ops.longmoe.moe_scale_rows_dot(u, a, p)
            if need_p:  # dropped slots have no row: their gradient is 0
                dprobs = rows.new_zeros(probs.numel()).index_copy_(0, src_slot, rows)
                dprobs = dprobs.view(probs.shape).to(probs.dtype)
        elif probs is not None:  # only the weight's gradient
            pa = torch.mul(a, probs.reshape(-1).index_select(0, src_slot)[:, None]).to(a.dtype)
        dw = torch.ops.longmoe.moe_grouped_mm(g, pa, ctx.counts, 2) if need_w else None
        return da if need_a else None, dw, dprobs, None, None, None


def _dx_operand(weight: torch.Tensor) -> torch.Tensor:
    """The (num_experts, out, in) operand of ``dx = dy @ weight[e]``, in the memory layout the CPU GEMM is fast at.

    16-bit GEMMs on CPUs without bf16/fp16 dot-product instructions (this project's AVX2 EPYC) run a slow
    generic kernel for a row-major right operand: 128 experts, 16K rows, 256 -> 1024, bf16, one thread:
    1.1 GFLOP/s as stored vs 6.6 GFLOP/s with the operand transposed in memory (one copy of the weights,
    ~0.5% of the GEMM's bytes at 128 rows per expert). fp32 is faster as stored (29.7 vs 19.7 GFLOP/s), and
    GPUs choose their own layouts: the weight is used as it is.
    """
    if weight.device.type == "cpu" and weight.element_size() == 2 and not _cpu_has_16bit_dot():
        return weight.transpose(-2, -1).contiguous().transpose(-2, -1)
    return weight


@functools.cache
def _cpu_has_16bit_dot() -> bool:
    """The native build saw AVX512-BF16 (bf16 dot products, AMX machines included). There the weight is
    fast as stored and the transposed copy is not: 64 experts 256 -> 1024 x 512, bf16, one thread, dx 19 ms
    as stored vs 24 ms transposed (65 ms counting the copy) on a 2-core AVX-512/AMX Xeon."""
    return native_available() and bool(native_build_info().get("bf16_dot"))


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: list[int] | torch.Tensor,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert linear over expert-contiguous rows, with autograd.

    x: (num_rows, in); weight: (num_experts, out, in); counts: rows per expert (num_experts,), a list or an
    integer tensor, summing to num_rows; offs: optional (num_experts,) int32 cumulative counts on x's device.
    Returns (num_rows, out). The grouped path (one ``torch._grouped_mm`` over all experts) reads the counts
    only as ``offs`` on the device; the per-expert loop (fp64, unaligned widths) brings them to the host.
    """
    # _grouped_mm needs 16-byte-aligned row strides: widths such as 3 fp32 (after slimming) take the loop.
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and (
        weight.shape[1] * weight.element_size()
    ) % 16 == 0
    if x.device.type == "cpu" and x.dtype == weight.dtype and native_available():
        # CPU: the native grouped op (per-expert mm_out into the output, no Python loop; faster than
        # torch._grouped_mm here, see csrc/moe/grouped_gemm.cpp); any width, so slimmed experts too.
        host = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        return GroupedLinearFunction.apply(x, weight, offs, host, "native")
    grouped = aligned and grouped_mm_available(x.device.type, x.dtype) and x.dtype == weight.dtype
    if grouped:
        if offs is None:
            offs = torch.as_tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return GroupedLinearFunction.apply(x, weight, offs, None, True)
    host = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    return GroupedLinearFunction.apply(x, weight, offs, host, False)


@register_fake("moe_scale_rows_dot")
def _moe_scale_rows_dot_fake(u, a, p):
    """Fake (meta) kernel of the C++ op, for torch.compile: (rows, ffn) twice and (rows,) in p's dtype."""
    return u.new_empty(u.shape), u.new_empty(u.shape), p.new_empty(p.shape)


@register_fake("swiglu")
def _swiglu_fake(h):
    """Fake (meta) kernel of the C++ op, for torch.compile: (rows, ffn)."""
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@register_fake("swiglu_backward")
def _swiglu_backward_fake(da, h):
    """Fake (meta) kernel of the C++ op, for torch.compile: (rows, 2 * ffn)."""
    return h.new_empty(h.shape)


def _native_swiglu(h: torch.Tensor) -> bool:
    return h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16) and native_available()


class SwiGLUFunction(torch.autograd.Function):
    """``silu(h[:, :F]) * h[:, F:]`` for h (rows, 2F) -> (rows, F), with a backward that writes the two halves of
    dh (rows, 2F) in place. Autograd of the plain expression zero-fills a full (rows, 2F) gradient for each slice
    and adds them: profiled at 8K tokens, H=1024, F=2816, bf16, that was 0.5 s of a 4 s forward+backward.

    On CPU (fp32, bf16) the native ``torch.ops.longmoe.swiglu`` / ``swiglu_backward`` make one pass over the rows
    each, in fp32 with one rounding per output (csrc/moe/swiglu.cpp); elsewhere the PyTorch expression."""

    @staticmethod
    def forward(ctx, h):
        f = h.shape[1] // 2
        ctx.save_for_backward(h)
        if _native_swiglu(h):
            return torch.ops.longmoe.swiglu(h)
        return F.silu(h[:, :f]) * h[:, f:]

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        if _native_swiglu(h):
            return torch.ops.longmoe.swiglu_backward(da, h)
        f = h.shape[1] // 2
        gate, up = h[:, :f], h[:, f:]
        dh = torch.empty_like(h)
        torch.mul(da, F.silu(gate), out=dh[:, f:])  # d up = da * silu(gate)
        torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dh[:, :f])  # d gate
        return dh


def _activation(h: torch.Tensor, activation: str, width: int) -> torch.Tensor:
    if activation == "swiglu":
        if h.shape[1] == 2 * width:
            return SwiGLUFunction.apply(h)
        return F.silu(h[:, :width]) * h[:, width:]
    return F.gelu(h)


class _SplitExperts(torch.autograd.Function):
    """weight (experts, out, in) -> one view per contiguous expert range ``[bounds[c], bounds[c + 1])``. The
    backward concatenates the ranges' gradients into one tensor: slicing the parameter per range instead
    would make autograd allocate a zero-filled full-size gradient per range and add them (profiled at 256
    experts, top-8, EP 4, 4 ranges: 190 of 700 ms of a forward+backward)."""

    @staticmethod
    def forward(ctx, weight, bounds):
        ctx.bounds = bounds
        return tuple(weight[a:b] for a, b in pairwise(bounds))

    @staticmethod
    def backward(ctx, *grads):
        b = ctx.bounds
        like = next(g for g in grads if g is not None)
        parts = [
            g if g is not None else like.new_zeros((b[c + 1] - b[c], *like.shape[1:]))
            for c, g in enumerate(grads)
        ]
        return torch.cat(parts), None


class GroupedExperts(nn.Module):
    """This rank's routed experts, computed together.

    Parameters: ``linear_fc1 (num_local_experts, fc1_rows, hidden)``, ``linear_fc2 (num_local_experts, hidden,
    ffn)`` (see the module docstring). Under expert parallelism the rank holds global experts
    ``[expert_offset, expert_offset + num_local_experts)``; loading a state dict with all ``num_experts`` rows
    keeps this rank's rows, so checkpoints move between layouts.
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.num_local_experts = config.num_local_experts
        self.expert_offset = config.expert_parallel_rank * self.num_local_experts
        self.ffn = config.ffn_hidden_size
        self.widths = config.expert_widths[self.expert_offset : self.expert_offset + self.num_local_experts]
        self.uniform = all(w == self.ffn for w in self.widths)
        fc1_rows = 2 * self.ffn if config.activation == "swiglu" else self.ffn
        h = config.hidden_size
        self.linear_fc1 = nn.Parameter(
            torch.empty(self.num_local_experts, fc1_rows, h, device=device, dtype=dtype)
        )
        self.linear_fc2 = nn.Parameter(
            torch.empty(self.num_local_experts, h, self.ffn, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.linear_fc1, std=self.config.init_method_std)
        nn.init.normal_(self.linear_fc2, std=self.config.init_method_std)
        self.zero_padding_()

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Zero the padded rows/columns of experts narrower than ``ffn_hidden_size``."""
        for e, w in enumerate(self.widths):
            if w == self.ffn:
                continue
            self.linear_fc1[e, w : self.ffn].zero_()
            if self.config.activation == "swiglu":
                self.linear_fc1[e, self.ffn + w :].zero_()
            self.linear_fc2[e, :, w:].zero_()

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """x: (num_rows, hidden) expert-contiguous rows (local expert 0 first); tokens_per_expert:
        (num_local_experts,) int counts (tensor or list) summing to num_rows. Returns (num_rows, hidden)."""
        on_device = isinstance(tokens_per_expert, torch.Tensor) and tokens_per_expert.device == x.device
        # The counts come to the host only where that is free (CPU) or needed (the per-expert loop): on CUDA
        # the uniform grouped path stays sync-free, and its check is the shape only.
        counts = None
        if not on_device or x.device.type == "cpu" or not self.uniform:
            counts = (
                tokens_per_expert.tolist()
                if isinstance(tokens_per_expert, torch.Tensor)
                else list(tokens_per_expert)
            )
        n = len(counts) if counts is not None else tokens_per_expert.numel()
        if n != self.num_local_experts or (counts is not None and sum(counts) != x.shape[0]):
            raise ValueError(
                f"tokens_per_expert={counts if counts is not None else tuple(tokens_per_expert.shape)} must have "
                f"num_local_experts={self.num_local_experts} entries summing to num_rows={x.shape[0]}"
            )
        act = self.config.activation
        x = x.to(self.linear_fc1.dtype)
        if self.uniform:
            offs = tokens_per_expert.cumsum(0).to(torch.int32) if on_device else None
            c = counts if counts is not None else tokens_per_expert
            h = grouped_linear(x, self.linear_fc1, c, offs)
            return grouped_linear(_activation(h, act, self.ffn), self.linear_fc2, c, offs)
        # Different widths: one expert at a time, each at its own width. Empty experts still run their
        # (0-row) matmuls so the output stays connected to the autograd graph on every rank.
        outs = []
        for e, (s, t) in enumerate(_segments(counts)):
            w, xe = self.widths[e], x[s:t]
            if act == "swiglu":
                w1 = torch.cat((self.linear_fc1[e, :w], self.linear_fc1[e, self.ffn : self.ffn + w]))
                a = _activation(xe @ w1.t(), act, w)
            else:
                a = _activation(xe @ self.linear_fc1[e, :w].t(), act, w)
            outs.append(a @ self.linear_fc2[e, :, :w].t())
        return torch.cat(outs)

    def gathers(self, x: torch.Tensor, backend: str | None = None) -> bool:
        """Whether :meth:`forward_tokens` runs for x (num_tokens, hidden) here: experts of one width, x in the
        weights' dtype, the native CPU backend (``backend`` as :func:`longmoe.runtime.select_backend`), and no
        forward hooks on this module or global ones (hooks see ``forward``'s permuted rows, so with any
        registered the layer keeps that path)."""
        return self._can_gather(x, backend) and not _has_forward_hooks(self)

    def _can_gather(self, x: torch.Tensor, backend: str | None = None) -> bool:
        """Experts of one width, x in the weights' dtype, the native CPU backend."""
        return (
            self.uniform
            and x.dtype == self.linear_fc1.dtype
            and x.device.type == "cpu"
            and select_backend(x, backend=backend) == "native"
        )

    def forward_tokens(self, x: torch.Tensor, dispatch_map, probs: torch.Tensor | None) -> torch.Tensor:
        """``moe_unpermute(self(moe_permute(x, m), m.tokens_per_expert), m, probs)`` for m = ``dispatch_map``
        (a :class:`~longmoe.moe.DispatchMap` over all experts) without the (num_rows, hidden) intermediates: the
        native op gathers x's rows, pass by pass into a reused scratch, for the first GEMM and for its weight
        gradient, so the permuted copy of x is neither written nor kept, and the second GEMM's output is combined
        at once and not kept (:class:`_LinearUnpermuteFunction`: its backward takes the probs gradient from the
        (num_rows, ffn) activations). The output is bit-identical to the permuted path; the gradients equal
        it up to rounding. Saved activations of one layer (2K tokens x top-8, H 1024, fp32), against the permuted
        path: 142 -> 14.5 MB at 256 experts x 64, 177 -> 49 MB at 64 x 256, 164 -> 132 MB at 8 x 2816.
        x: (num_tokens, hidden); probs: (num_tokens, top_k) or None. Returns (num_tokens, hidden). :meth:`gathers`
        says where it runs."""
        if not self._can_gather(x):
            raise ValueError(
                f"forward_tokens needs experts of one width, x in the weights' dtype {self.linear_fc1.dtype} and "
                f"the native CPU backend; got uniform={self.uniform}, x {x.dtype} on {x.device}"
            )
        counts = dispatch_map.tokens_per_expert.tolist()
        if len(counts) != self.num_local_experts:
            raise ValueError(
                f"dispatch_map has {len(counts)} experts; expected num_local_experts={self.num_local_experts}"
            )
        src, row_map = dispatch_map.src_slot, dispatch_map.row_map
        h = _PermuteLinearFunction.apply(x, self.linear_fc1, src, row_map, counts)
        a = _activation(h, self.config.activation, self.ffn)
        return _LinearUnpermuteFunction.apply(a, self.linear_fc2, probs, row_map, src, counts)

    def split(self, bounds: list[int]) -> list:
        """Passes over contiguous ranges of local experts (chunked expert-parallel dispatch): ``bounds`` =
        ``[0, b1, ..., num_local_experts]``; returns one ``f(x, counts) -> y`` per range ``[b[c], b[c + 1])``,
        x (rows, hidden) sorted by expert within the range, counts (b[c + 1] - b[c],). Each pass touches only
        its range's weights, and the weight gradient is assembled once from the ranges' gradients
        (:class:`_SplitExperts`) instead of one zero-filled full-size gradient per range."""
        if bounds[0] != 0 or bounds[-1] != self.num_local_experts or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"bounds={bounds}: expected 0 = b0 < b1 < ... < {self.num_local_experts}")
        if not self.uniform:  # per-expert widths run one expert at a time anyway: zero rows elsewhere

            def padded(lo, hi):
                def run(x, counts):
                    full = torch.zeros(self.num_local_experts, dtype=torch.int64)
                    full[lo:hi] = torch.as_tensor(counts, dtype=torch.int64).cpu()
                    return self.forward(x, full)

                return run

            return [padded(a, b) for a, b in pairwise(bounds)]
        fc1 = _SplitExperts.apply(self.linear_fc1, list(bounds))
        fc2 = _SplitExperts.apply(self.linear_fc2, list(bounds))
        act, ffn = self.config.activation, self.ffn

        def chunk(w1, w2, width):
            def run(x, counts):
                counts = torch.as_tensor(counts)
                if counts.numel() != width or int(counts.sum()) != x.shape[0]:
                    raise ValueError(
                        f"counts={counts.tolist()} must have {width} entries summing to num_rows={x.shape[0]}"
                    )
                h = grouped_linear(x.to(w1.dtype), w1, counts)
                return grouped_linear(_activation(h, act, ffn), w2, counts)

            return run

        return [chunk(w1, w2, b - a) for w1, w2, (a, b) in zip(fc1, fc2, pairwise(bounds), strict=True)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A full (all-experts) checkpoint loads into an expert-parallel layer: keep this rank's rows.
        if self.num_local_experts != self.num_experts:
            lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
            for name in ("linear_fc1", "linear_fc2"):
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == self.num_experts:
                    state_dict[prefix + name] = t[lo:hi]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_local_experts}/{self.num_experts} (offset {self.expert_offset}), "
            f"hidden={self.config.hidden_size}, ffn={self.ffn}, activation={self.config.activation}"
            + ("" if self.uniform else f", widths={list(self.widths)}")
        )


class SharedExpertMLP(nn.Module):
    """A dense MLP every token goes through: ``linear_fc1 (fc1_rows, hidden)``, ``linear_fc2 (hidden, ffn)``.

    x: (num_tokens, hidden) -> (num_tokens, hidden). SwiGLU rows are [gate; up] as in :class:`GroupedExperts`.
    """

    def __init__(self, config: MoEConfig, ffn: int, *, device=None, dtype=None):
        super().__init__()
        self.activation = config.activation
        self.ffn = ffn
        rows = 2 * ffn if config.activation == "swiglu" else ffn
        self.linear_fc1 = nn.Linear(config.hidden_size, rows, bias=False, device=device, dtype=dtype)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.linear_fc1.weight, std=config.init_method_std)
        nn.init.normal_(self.linear_fc2.weight, std=config.init_method_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(_activation(self.linear_fc1(x), self.activation, self.ffn))
