"""Router: scores, top-k selection, capacity, auxiliary losses and aux-loss-free expert bias.

The math lives in pure functions (testable without a module or a process group):

* :func:`topk_routing` - softmax / sigmoid / sparsemixer scores and the top-k gating weights;
* :func:`expert_capacity`, :func:`apply_capacity` - token dropping by probability or by position;
* :func:`load_balancing_loss` (Switch/GShard), :func:`router_z_loss` (ST-MoE), :func:`router_entropy`.

:class:`TopKRouter` holds the weight ``(num_experts, hidden)`` and the expert bias and composes them. Scores are
computed in fp32 (fp64 for fp64 inputs) whatever the activation dtype, as Megatron-core's router does.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longmoe.moe.config import MoEConfig
from longmoe.runtime.backend import select_backend
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.native import native_build_info, register_fake

__all__ = [
    "RouterOutput",
    "TopKRouter",
    "topk_routing",
    "topk_lowest_index",
    "topk_lowest_index_ref",
    "router_logits_f32",
    "sparsemixer_routing",
    "expert_capacity",
    "apply_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
]


def sparsemixer_routing(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer top-2, deterministic form (what Hugging Face's ``sparsemixer`` does in eval mode).

    Expert 1 is the argmax; its weight is its softmax probability among the experts whose logit lies within
    ``2 * eps`` (relative to ``max(|logit|, max)``) of the max. Expert 2 is the argmax of the rest; its weight
    is its softmax probability among the remaining experts within ``2 * eps`` of that second max.
    (Training in Hugging Face samples with Gumbel noise and uses a Heun's-method gradient estimator; here
    selection is always the deterministic argmax and gradients are those of the masked softmaxes.)

    logits: (num_tokens, num_experts). Returns ``(probs, expert_ids)``, both (num_tokens, 2).
    """
    with torch.no_grad():
        top1, ind1 = logits.max(dim=-1, keepdim=True)
        mask1 = (top1 - logits) / logits.abs().clamp(min=top1) > 2 * eps
    p1 = torch.softmax(logits.masked_fill(mask1, float("-inf")), dim=-1).gather(-1, ind1)
    rest = logits.scatter(-1, ind1, float("-inf"))
    with torch.no_grad():
        top2, ind2 = rest.max(dim=-1, keepdim=True)
        mask2 = (top2 - logits) / logits.abs().clamp(min=top2) > 2 * eps
    p2 = torch.softmax(rest.masked_fill(mask2, float("-inf")), dim=-1).gather(-1, ind2)
    return torch.cat((p1, p2), dim=-1), torch.cat((ind1, ind2), dim=-1)


def topk_lowest_index_ref(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of every row, ordered by value (descending); equal values are
    ordered, and selected, by the lower index. key: (num_tokens, n); returns (num_tokens, k) int64.

    ``torch.topk`` leaves ties to the implementation (on this CPU it does not pick the lower index for 2 <= k
    among 8-256 tied experts, and CUDA differs), so the router would route tied tokens differently on
    different devices. This is the rule of a stable descending sort (NaN first, as ``torch.sort``), at the
    cost of a top-(k+1), two sorts of (num_tokens, k) and, only for the rows whose k-th and (k+1)-th values
    tie, a sort of those rows. The reference of :func:`topk_lowest_index`, and its path off the CPU.
    """
    n = key.shape[-1]
    if k >= n:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    vals, ids = torch.topk(key, k + 1, dim=-1)
    a, b = vals[:, k - 1], vals[:, k]
    cut = ((a == b) | (a.isnan() & b.isnan())).nonzero().squeeze(1)  # a tie across the cut (NaN ties NaN)
    ids = ids[:, :k]
    if cut.numel():
        ids = ids.index_put((cut,), torch.sort(key[cut], dim=-1, descending=True, stable=True).indices[:, :k])
    ids = ids.sort(dim=-1).values  # then a stable sort by value: ties in index order
    order = torch.sort(key.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


def topk_lowest_index(key: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """:func:`topk_lowest_index_ref`'s selection and order; on CPU tensors one native pass per row
    (``torch.ops.longmoe.topk_lowest_index``: 4.3 -> 1.3 ms for 2048 tokens x 256 experts, k = 8, one core of
    an AVX-512 Xeon; 8K tokens 18 -> 5.3 ms). key: (num_tokens, n) floating; returns (num_tokens, k) int64 (n columns if k > n).
    ``backend`` as :func:`longmoe.runtime.select_backend`; off the CPU the reference composition runs."""
    if key.dim() == 2 and 1 <= k <= key.shape[-1] and key.is_floating_point():
        if select_backend(key, backend=backend) == "native":
            return torch.ops.longmoe.topk_lowest_index(key, k)
    return topk_lowest_index_ref(key, k)


@functools.cache
def _onednn_f32_gemm() -> bool:
    """Whether :func:`_mm_f32` takes oneDNN's fp32 GEMM: an AMD CPU (the native build reports the vendor; MKL's
    sgemm was measured slow there, not elsewhere), torch built with oneDNN, and ``LONGMOE_ROUTER_ONEDNN`` not
    ``"0"``."""
    if os.environ.get("LONGMOE_ROUTER_ONEDNN") == "0" or not torch.backends.mkldnn.is_available():
        return False
    return native_build_info().get("cpu_vendor") == "amd" and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of fp32 CPU tensors a (M, K) and b (K, N) -> (M, N), any strides.

    torch's CPU fp32 GEMM is MKL's sgemm, which on AMD CPUs ran at half of oneDNN's rate: a Zen 5 core, the
    router backward's two GEMMs at 2K tokens x H 1024 x 256 experts, g @ w 12.2 -> 4.2 ms and g^T @ x 9.8 ->
    4.6 ms (64 experts 2.4 -> 1.1 and 2.6 -> 1.3 ms). There it runs on oneDNN (inductor's linear op,
    ``torch.ops.mkldnn._linear_pointwise``, with weight b^T); elsewhere it is ``a @ b``. The two differ in fp32
    summation order only."""
    if a.numel() and b.numel() and _onednn_f32_gemm():
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


class _RouterLogitsCPU(torch.autograd.Function):
    """fp32 ``x @ weight.T`` of x (num_tokens, hidden) and weight (num_experts, hidden) on the CPU, both bf16 or
    both fp32. bf16: the forward on bf16 micro-kernels with fp32 output (``torch.ops.longmoe.mm_bf16_f32``);
    fp32: through :func:`_mm_f32`. The backward as autograd runs ``F.linear(x.float(), weight.float())``, its two
    GEMMs through :func:`_mm_f32`, the gradients cast to x's and weight's dtypes."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        if x.dtype == torch.bfloat16:
            return torch.ops.longmoe.mm_bf16_f32(x, weight.t())
        return _mm_f32(x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx = _mm_f32(g, weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = _mm_f32(g.t(), x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def router_logits_f32(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Router logits in the accumulation dtype (``MoEConfig.router_dtype="float32"``, as Megatron-core's
    ``moe_router_dtype="fp32"``): ``F.linear(x.to(ct), weight.to(ct))`` with ct fp32 (fp64 for fp64 x), and its
    gradients cast back to x's and weight's dtypes. x: (num_tokens, hidden); weight: (num_experts, hidden);
    returns (num_tokens, num_experts) in ct.

    bf16 x and weight on the CPU (native backend) take the forward on bf16 micro-kernels with fp32
    accumulation instead of an fp32 GEMM: a product of two bf16 values is exact in fp32, so the logits are the
    fp32 GEMM's up to summation order. 2048 tokens x 1024 -> 256 experts, one core of an AMX Xeon: 6.4 -> 1.0 ms;
    8K tokens 26 -> 6.5 ms (a Zen 5 core, AVX512-BF16 without AMX, 2K: 10.6 -> 2.1 ms). The backward's gradient
    is fp32 and stays on fp32 GEMMs, on oneDNN on AMD CPUs (:func:`_mm_f32`), where fp32 x and weight take the
    forward there too (2K tokens x 1024 -> 256 experts, a Zen 5 core: router forward+backward of an fp32 layer
    30.2 -> 14.9 ms, the layer's forward+backward 156 -> 142 ms)."""
    ct = accumulation_dtype(x.dtype)
    if x.dim() == 2 and ct == torch.float32 and select_backend(x, backend=backend) == "native":
        bf16 = x.dtype == weight.dtype == torch.bfloat16
        if bf16 or (x.dtype == weight.dtype == torch.float32 and _onednn_f32_gemm()):
            return _RouterLogitsCPU.apply(x, weight)
    return F.linear(x.to(ct), weight.to(ct))


@register_fake("mm_bf16_f32")
def _mm_bf16_f32_fake(a, b):
    """Fake (meta) kernel of the C++ op, for torch.compile: (M, N) fp32."""
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@register_fake("topk_lowest_index")
def _topk_lowest_index_fake(key, k):
    """Fake (meta) kernel of the C++ op, for torch.compile: (num_tokens, k) int64."""
    return key.new_empty((key.shape[0], k), dtype=torch.int64)


def topk_routing(
    logits: torch.Tensor,
    *,
    top_k: int,
    score_function: str = "softmax",
    normalize_topk: bool = True,
    expert_bias: torch.Tensor | None = None,
    sparsemixer_eps: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing over router logits.

    Args:
        logits: (num_tokens, num_experts), fp32 or fp64 (scores are computed in this dtype).
        top_k: experts per token.
        score_function: ``"softmax"``, ``"sigmoid"`` or ``"sparsemixer"`` (top-2 only).
        normalize_topk: divide each token's top-k weights by their sum.
        expert_bias: None or (num_experts,): added to the scores for the *selection* only (aux-loss-free
            balancing); the gating weights are the unbiased scores.

    Returns:
        ``(probs, expert_ids, scores)``: probs (num_tokens, top_k) gating weights in logits' dtype,
        expert_ids (num_tokens, top_k) int64 (by score, descending; ties go to the lower expert index, see
        :func:`topk_lowest_index`), scores (num_tokens, num_experts) the distribution the balancing
        loss and the entropy use (softmax probabilities; sigmoid scores normalised per token).
    """
    if score_function == "sparsemixer":
        probs, ids = sparsemixer_routing(logits, sparsemixer_eps)
        return probs, ids, torch.softmax(logits, dim=-1)
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"score_function={score_function!r}: expected 'softmax', 'sigmoid' or 'sparsemixer'")
    key = scores.detach() if expert_bias is None else scores.detach() + expert_bias.to(scores.dtype)
    ids = topk_lowest_index(key, top_k)  # ties: the lower expert index, on every device
    top = scores.gather(-1, ids)
    if normalize_topk:
        # The floor only matters for sigmoid scores that all underflow to 0 (softmax top-k sums are > 0).
        top = top / top.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top.dtype).tiny)
    if score_function == "sigmoid":
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    return top, ids, scores


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert accepts: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, capacity: int, drop_policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the slots that overflow each expert's capacity.

    probs, expert_ids: (num_tokens, top_k). ``drop_policy="probs"`` keeps each expert's ``capacity`` slots with
    the highest weight (ties: the earlier token); ``"position"`` keeps its earliest ``capacity`` tokens.
    Returns ``(probs, expert_ids)`` with dropped slots set to weight 0 and expert -1.
    """
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"drop_policy={drop_policy!r}: expected 'probs' or 'position'")
    flat_e = expert_ids.reshape(-1)
    n = flat_e.numel()
    if n == 0:
        return probs, expert_ids
    if drop_policy == "probs":
        # Stable sorts: by weight descending (slot order breaks ties), then by expert.
        order = torch.argsort(probs.detach().reshape(-1), descending=True, stable=True)
        order = order[torch.argsort(flat_e[order], stable=True)]
    else:
        order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=flat_e.device) - starts[flat_e[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep = (rank < capacity).view(expert_ids.shape)
    return torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=probs.device)), torch.where(
        keep, expert_ids, -1
    )


def load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` (1 at perfect balance).

    ``f_e = tokens_per_expert[e] / (num_tokens * top_k)`` (fraction of routed slots; not differentiable),
    ``P_e = mean_t scores[t, e]``. scores: (num_tokens, num_experts); tokens_per_expert: (num_experts,).
    Megatron-core's ``switch_load_balancing_loss_func`` normalisation; Hugging Face's ``load_balancing_loss_func``
    divides f by num_tokens only, i.e. returns ``top_k`` times this. 0 for an empty batch.
    """
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return scores.sum() * 0.0
    f = tokens_per_expert.to(scores.dtype) / (num_tokens * top_k)
    return num_experts * torch.sum(f * scores.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``; logits (num_tokens, num_experts). 0 if empty."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of each token's score distribution (num_tokens, num_experts)."""
    if scores.shape[0] == 0:
        return scores.new_zeros(())
    return -(scores * torch.log(scores.clamp(min=torch.finfo(scores.dtype).tiny))).sum(-1).mean()


@dataclass(slots=True)
class RouterOutput:
    """What :class:`TopKRouter` returns for ``num_tokens`` tokens and ``num_experts`` experts.

    logits: (num_tokens, num_experts) fp32 (fp64 for fp64 inputs).
    scores: (num_tokens, num_experts) the distribution used by the balancing loss and the entropy.
    probs: (num_tokens, top_k) gating weights, 0 for dropped slots.
    expert_ids: (num_tokens, top_k) int64, -1 for dropped slots.
    routed_tokens_per_expert: (num_experts,) int64, slots routed to each expert *before* capacity.
    load_balancing_loss: () unweighted balancing loss (computed without autograd when its coefficient is 0).
    z_loss: () unweighted z-loss, or None when ``z_loss_coeff`` is 0 (not computed).
    """

    logits: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    expert_ids: torch.Tensor
    routed_tokens_per_expert: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor | None


class TopKRouter(nn.Module):
    """Linear router ``logits = x @ weight.T`` with top-k selection, capacity and auxiliary losses.

    Parameters: ``weight (num_experts, hidden_size)``. Buffers (only with ``expert_bias_update_rate``):
    ``expert_bias (num_experts,)`` fp32, saved in the state dict, and ``local_tokens_per_expert
    (num_experts,)`` fp32, the slots each expert *kept* (after capacity) in the forwards run with autograd
    enabled since the last :meth:`update_expert_bias` (not saved). As in Megatron-core, the load that
    steers the bias is what the experts really processed, and forwards under ``torch.no_grad()``
    (evaluation, a teacher's forward) do not count.
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, device=device, dtype=dtype)
        )
        if config.expert_bias_update_rate is not None:
            self.register_buffer(
                "expert_bias", torch.zeros(config.num_experts, device=device, dtype=torch.float32)
            )
            self.register_buffer(
                "local_tokens_per_expert",
                torch.zeros(config.num_experts, device=device, dtype=torch.float32),
                persistent=False,
            )
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.init_method_std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
            self.local_tokens_per_expert.zero_()

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: (num_tokens, hidden_size) -> :class:`RouterOutput`."""
        cfg = self.config
        ct = accumulation_dtype(x.dtype)
        if cfg.router_dtype == "input":  # as Hugging Face: logits in the activation dtype, scores upcast
            logits = F.linear(x, self.weight.to(x.dtype)).to(ct)
        else:
            logits = router_logits_f32(x, self.weight)
        probs, ids, scores = topk_routing(
            logits,
            top_k=cfg.top_k,
            score_function=cfg.score_function,
            normalize_topk=cfg.normalize_topk,
            expert_bias=self.expert_bias,
            sparsemixer_eps=cfg.sparsemixer_eps,
        )
        routed = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
        kept = routed
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            probs, ids = apply_capacity(probs, ids, cfg.num_experts, capacity, cfg.drop_policy)
            flat = ids.reshape(-1)
            kept = torch.bincount(flat[flat >= 0], minlength=cfg.num_experts)
        if self.expert_bias is not None and torch.is_grad_enabled():
            self.local_tokens_per_expert += kept.to(torch.float32)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.aux_loss_coeff > 0):
            lb = load_balancing_loss(scores, routed, cfg.top_k)
        # The z-loss needs a logsumexp over every token: only computed when it is used.
        z = router_z_loss(logits) if cfg.z_loss_coeff > 0 else None
        return RouterOutput(logits, scores, probs, ids, routed, lb, z)

    @torch.no_grad()
    def update_expert_bias(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``; return the global load.

        ``load`` is ``local_tokens_per_expert`` summed over ``group`` with ``all_reduce`` (default: every rank of
        the default group when torch.distributed is initialised, else this process only), so every replica
        moves its bias identically. Under pipeline parallelism pass the group of the ranks that hold this
        layer. The local counts are reset.
        """
        if self.expert_bias is None:
            raise RuntimeError(
                "update_expert_bias(): MoEConfig.expert_bias_update_rate is None, so this router has no expert "
                "bias; expected expert_bias_update_rate set"
            )
        load = self.local_tokens_per_expert.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        self.expert_bias += self.config.expert_bias_update_rate * torch.sign(load.mean() - load)
        self.local_tokens_per_expert.zero_()
        return load
