"""Expert slimming (SlimMoE, arXiv 2506.18349): rank the neurons inside every expert, keep the best, distil.

    from longmoe.moe.slimming import neuron_importance, prune_experts, SlimmingPlan, SlimmingStage, run_slimming

    scores = neuron_importance(model, batches, method="sensitivity", teacher=teacher)  # {layer: (E, ffn) fp32}
    prune_experts(model, scores, keep=0.5)        # every expert keeps its best half: smaller GEMMs, not padding

A *neuron* ``j`` of expert ``e`` is row ``j`` of W1 (gate), row ``j`` of W3 (up) and column ``j`` of W2 (down):
``linear_fc1[e, j]``, ``linear_fc1[e, ffn + j]`` (SwiGLU) and ``linear_fc2[e, :, j]`` in
:class:`~longmoe.moe.GroupedExperts`' layout, ``gate_up_proj`` / ``down_proj`` in Hugging Face's. Removing it
removes exactly that neuron's contribution, so a pruned layer equals the original with those weights zeroed.

Scores (``method``), each ``(num_experts, ffn_hidden_size)`` fp32 per MoE layer (columns past a narrower
expert's width are 0 and never kept):

* ``"sensitivity"`` (the paper's): first-order Taylor term ``sum_w |w * dL/dw|`` over the neuron's weights,
  summed over calibration batches (one backward per batch). ``L`` is the top-k-logit KD loss against
  ``teacher`` (:func:`distillation_loss`, the paper uses the top-8 logits of the original model), or the
  next-token LM loss without a teacher. An expert that gets no token has zero gradient, hence score 0.
* ``"activation"`` (ours, a Wanda-style baseline): ``mean_{slots of e} |a_ej| * mass_e``, with ``a_ej`` the
  neuron's activation (``silu(gate) * up``, or ``gelu``) on the rows routed to ``e`` and ``mass_e`` the
  routed-token mass, ``sum_t p_te / num_tokens`` (p the gating weight). No tokens: 0.
* ``"magnitude"``: ``sum_w |w|`` over the neuron's weights. ``"random"``: uniform [0, 1) (seeded).

Calibration batches are ``(batch, seqlen + 1)`` int64 token tensors (inputs ``[:, :-1]``, next-token targets
``[:, 1:]``) for a model; for a bare :class:`MoELayer` they are hidden states ``(..., hidden)`` (then only
``activation``, ``magnitude``, ``random``).

Pruning (:func:`prune_experts`) physically shrinks the weights: a uniform width makes a smaller
``MoEConfig.ffn_hidden_size`` (and a smaller Hugging Face ``intermediate_size`` / ``moe_intermediate_size``);
different widths per expert use :class:`GroupedExperts`' per-expert widths (``expert_ffn_hidden_sizes``).
Under expert parallelism scores are gathered to the full ``(num_experts, ffn)`` on every rank, so every rank
computes the same widths and keeps its own experts' neurons: the result equals pruning the unsharded layer.
Shared experts are not pruned (SlimMoE's Phi-3.5-MoE has none; ours).

Staged slimming (:class:`SlimmingPlan`, :func:`run_slimming`): every stage scores, prunes to its target width
(a fraction of the *original* width) and distils from the unpruned teacher for its token budget; a
safetensors checkpoint is written after each stage and a rerun resumes after the last completed stage
bit-identically (every stage's data and calibration windows come from generators seeded by the stage index;
a fresh optimizer per stage, since the shapes change). Following the paper: neuron pruning inside every
expert, keeping all experts; sensitivity from the KD loss on top-8 logits; multi-stage prune/distil. Ours
(a 2-core CPU budget): 2-3 stages instead of the paper's schedule, tens of thousands of tokens per stage
instead of billions, temperature 1, equal token budgets per stage, AdamW with a cosine schedule per stage,
attention groups ranked by o_proj norm. The teacher runs in the same process or on another rank
(:class:`RemoteTeacher` / :func:`serve_teacher`: only its top-k logits travel).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longmoe.moe.experts import GroupedExperts
from longmoe.moe.layer import MoELayer

__all__ = [
    "METHODS",
    "MoESite",
    "moe_sites",
    "neuron_importance",
    "prune_experts",
    "expert_widths",
    "current_widths",
    "parameter_counts",
    "routed_mass",
    "teacher_topk",
    "RemoteTeacher",
    "serve_teacher",
    "distillation_loss",
    "SlimmingStage",
    "SlimmingPlan",
    "run_slimming",
    "save_stage_checkpoint",
    "load_stage_checkpoint",
    "drop_experts",
    "merge_experts_pairwise",
]

METHODS = ("sensitivity", "activation", "magnitude", "random")
"""Values of ``neuron_importance(method=...)``."""

_HF_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe",
              "PhimoeSparseMoeBlock": "phimoe"}  # fmt: skip
_HF_WIDTH_FIELD = {
    "mixtral": "intermediate_size",
    "qwen2_moe": "moe_intermediate_size",
    "phimoe": "intermediate_size",
}


# ----------------------------------------------------------------------------------------------------
# MoE layers inside a model
# ----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class MoESite:
    """One MoE layer found in a model: a :class:`MoELayer` or a Hugging Face sparse MoE block.

    fc1: (num_local_experts, fc1_rows, hidden) parameter (gate rows ``[0, ffn)``, up rows ``[ffn, 2 ffn)``);
    fc2: (num_local_experts, hidden, ffn) parameter; widths: every expert's width (global order).
    """

    name: str
    module: nn.Module
    family: str  # "longmoe" or a Hugging Face model_type
    num_experts: int
    ffn: int
    widths: tuple[int, ...]
    activation: str
    expert_offset: int
    group: dist.ProcessGroup | None

    @property
    def experts(self) -> nn.Module:
        return self.module.experts

    @property
    def fc1(self) -> nn.Parameter:
        e = self.module.experts
        return e.linear_fc1 if self.family == "longmoe" else e.gate_up_proj

    @property
    def fc2(self) -> nn.Parameter:
        e = self.module.experts
        return e.linear_fc2 if self.family == "longmoe" else e.down_proj

    @property
    def num_local_experts(self) -> int:
        return self.fc1.shape[0]


def moe_sites(model: nn.Module) -> list[MoESite]:
    """Every :class:`MoELayer` and Hugging Face Mixtral/Qwen2-MoE/PhiMoE sparse block in ``model`` (module
    order; a bare :class:`MoELayer` is named ``""``)."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            c = m.config
            sites.append(MoESite(name, m, "longmoe", c.num_experts, c.ffn_hidden_size, tuple(c.expert_widths),
                                 c.activation, m.experts.expert_offset, c.expert_parallel_group))  # fmt: skip
        elif type(m).__name__ in _HF_BLOCKS:
            ffn = m.experts.down_proj.shape[-1]
            n = m.experts.gate_up_proj.shape[0]
            sites.append(
                MoESite(name, m, _HF_BLOCKS[type(m).__name__], n, ffn, (ffn,) * n, "swiglu", 0, None)
            )
    return sites


def _require_sites(model: nn.Module, fn: str) -> list[MoESite]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model={type(model).__name__}): expected a torch.nn.Module")
    sites = moe_sites(model)
    if not sites:
        raise ValueError(
            f"{fn}(model={type(model).__name__}): the model has no MoE layers (no longmoe.moe.MoELayer and no "
            f"Hugging Face {sorted(_HF_BLOCKS)}); expected at least one"
        )
    return sites


def _gather_experts(site: MoESite, local: torch.Tensor) -> torch.Tensor:
    """(num_local_experts, ...) -> (num_experts, ...), all-gathered over the expert-parallel group."""
    if site.group is None or site.num_local_experts == site.num_experts:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(site.group))]
    dist.all_gather(parts, local.contiguous(), group=site.group)
    return torch.cat(parts)


def _width_mask(site: MoESite, device) -> torch.Tensor:
    """(num_experts, ffn) bool: True for the neurons each expert has."""
    return torch.arange(site.ffn, device=device)[None, :] < torch.tensor(site.widths, device=device)[:, None]


def _neuron_sum(site: MoESite, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """Per-neuron sums of elementwise terms laid out like the weights: fc1 (E_l, rows, H), fc2 (E_l, H, ffn)
    -> (E_l, ffn) (gate row + up row + down column)."""
    f = site.ffn
    s = fc2.sum(dim=1) + fc1[:, :f].sum(dim=-1)
    if site.activation == "swiglu":
        s = s + fc1[:, f : 2 * f].sum(dim=-1)
    return s


# ----------------------------------------------------------------------------------------------------
# distillation loss
# ----------------------------------------------------------------------------------------------------
def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k logits: logits (..., vocab) -> (values (..., k) fp32, indices (..., k) int64)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k!r}: expected an int in [1, vocab={logits.shape[-1]}]")
    v, i = torch.topk(logits.detach().float(), k, dim=-1)
    return v, i


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    *,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    lm_weight: float = 0.0,
) -> torch.Tensor:
    """Top-k logit distillation (+ optional LM loss), mean over tokens.

    ``T^2 * KL(p || q)`` with ``p = softmax(teacher_values / T)`` over the teacher's top-k tokens and ``q`` the
    student's full-vocabulary ``softmax(student_logits / T)`` at those tokens (so ``q`` sums to <= 1 there and
    the loss is >= 0, 0 only when the student puts all its mass on the teacher's top-k in the same
    proportions), plus ``lm_weight * cross_entropy(student_logits, targets)``.

    student_logits: (..., vocab); teacher_values, teacher_indices: (..., k) from :func:`teacher_topk`;
    targets: (...) int64 or None. Returns a () fp32 tensor.
    """
    if (
        teacher_values.shape != teacher_indices.shape
        or teacher_values.shape[:-1] != student_logits.shape[:-1]
    ):
        raise ValueError(
            f"teacher top-k values {tuple(teacher_values.shape)} / indices {tuple(teacher_indices.shape)} do not "
            f"match student_logits {tuple(student_logits.shape)}: expected (..., k) with the same leading dims"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    s = student_logits.float()
    p_log = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    q_log = torch.log_softmax(s / temperature, dim=-1).gather(-1, teacher_indices)
    loss = (p_log.exp() * (p_log - q_log)).sum(-1).mean() * temperature**2
    if lm_weight:
        if targets is None:
            raise ValueError(f"lm_weight={lm_weight} needs targets; got targets=None")
        loss = loss + lm_weight * F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    return loss


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _check_token_batch(batch, i: int) -> torch.Tensor:
    if (
        not isinstance(batch, torch.Tensor)
        or batch.dtype != torch.int64
        or batch.dim() != 2
        or batch.shape[1] < 2
    ):
        got = (
            f"{tuple(batch.shape)} {batch.dtype}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        )
        raise ValueError(
            f"batches[{i}]: expected a (batch, seqlen + 1) int64 token tensor with seqlen >= 1, got {got}"
        )
    return batch


class RemoteTeacher:
    """The teacher on another rank: sends the inputs there and receives its top-k logits.

    The teacher rank runs :func:`serve_teacher`; this side calls :meth:`topk` for every batch (blocking
    ``send``/``recv`` on ``group`` with the group's timeout) and :meth:`close` at the end. Usable wherever a
    teacher module is: ``neuron_importance(..., teacher=RemoteTeacher(1, k=8))``, ``run_slimming(student,
    RemoteTeacher(1, k=8), ...)``. Only the top-k values (fp32) and indices travel, ``2 * k`` numbers a token.
    """

    def __init__(self, src: int, *, k: int, group: dist.ProcessGroup | None = None):
        self.src, self.k, self.group = src, k, group
        self.vocab: int | None = None

    def topk(self, inputs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """inputs (batch, seqlen) int64 -> (values (batch, seqlen, k) fp32, indices int64, teacher vocab)."""
        if k != self.k:
            raise ValueError(f"k={k}: this RemoteTeacher serves k={self.k} logits")
        if self.vocab is None:
            v = torch.zeros(1, dtype=torch.int64)
            dist.recv(v, src=self.src, group=self.group)
            self.vocab = int(v)
        header = torch.tensor([inputs.shape[0], inputs.shape[1]], dtype=torch.int64)
        dist.send(header, dst=self.src, group=self.group)
        dist.send(inputs.contiguous().cpu(), dst=self.src, group=self.group)
        values = torch.empty(*inputs.shape, self.k, dtype=torch.float32)
        indices = torch.empty(*inputs.shape, self.k, dtype=torch.int64)
        dist.recv(values, src=self.src, group=self.group)
        dist.recv(indices, src=self.src, group=self.group)
        return values.to(inputs.device), indices.to(inputs.device), self.vocab

    def close(self) -> None:
        """Tell the teacher rank to stop serving."""
        if self.vocab is None:
            v = torch.zeros(1, dtype=torch.int64)
            dist.recv(v, src=self.src, group=self.group)
        dist.send(torch.zeros(2, dtype=torch.int64), dst=self.src, group=self.group)


@torch.no_grad()
def serve_teacher(model: nn.Module, *, dst: int, k: int, group: dist.ProcessGroup | None = None) -> int:
    """Teacher rank: answer :class:`RemoteTeacher` requests from rank ``dst`` with ``model``'s top-``k`` logits
    until it closes; returns the number of batches served."""
    model.eval()
    first = True
    served = 0
    while True:
        if first:
            probe = _logits(model, torch.zeros(1, 1, dtype=torch.int64))
            dist.send(torch.tensor([probe.shape[-1]], dtype=torch.int64), dst=dst, group=group)
            first = False
        header = torch.zeros(2, dtype=torch.int64)
        dist.recv(header, src=dst, group=group)
        b, t = header.tolist()
        if b == 0:
            return served
        inputs = torch.empty(b, t, dtype=torch.int64)
        dist.recv(inputs, src=dst, group=group)
        values, indices = teacher_topk(_logits(model, inputs), k)
        dist.send(values.contiguous(), dst=dst, group=group)
        dist.send(indices.contiguous(), dst=dst, group=group)
        served += 1


def _teacher_topk(
    teacher, inputs: torch.Tensor, k: int, student_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k logits for inputs, from a local module or a :class:`RemoteTeacher`."""
    if isinstance(teacher, RemoteTeacher):
        values, indices, vocab = teacher.topk(inputs, k)
    else:
        with torch.no_grad():
            t_logits = _logits(teacher, inputs)
        vocab = t_logits.shape[-1]
        values = indices = None
    if vocab != student_vocab:
        raise ValueError(
            f"teacher vocabulary {vocab} != student vocabulary {student_vocab}: "
            "expected the teacher and the model to share a vocabulary"
        )
    if values is None:
        values, indices = teacher_topk(t_logits, k)
    return values, indices


# ----------------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------------
def neuron_importance(
    model: nn.Module,
    batches: Iterable[torch.Tensor] | None,
    *,
    method: str,
    teacher: nn.Module | RemoteTeacher | None = None,
    progress: bool = True,
    top_k_logits: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Importance of every neuron of every expert, ``{layer name: (num_experts, ffn_hidden_size) fp32}``.

    Args:
        model: a :class:`MoELayer`, or a model containing MoE layers (:class:`MoELayer` or Hugging Face
            Mixtral/Qwen2-MoE/PhiMoE blocks) called as ``model(tokens (batch, seqlen))`` returning logits
            ``(batch, seqlen, vocab)`` (or an output with ``.logits``).
        batches: calibration data (see the module docstring); needed by ``sensitivity`` and ``activation``,
            ignored by ``magnitude`` and ``random``.
        method: ``"sensitivity"``, ``"activation"``, ``"magnitude"`` or ``"random"``.
        teacher: for ``sensitivity``, the model whose top-``top_k_logits`` logits the KD loss (at
            ``temperature``) compares with, or a :class:`RemoteTeacher`; None = next-token LM loss. Same
            vocabulary as ``model``.
        progress: show a rich progress bar over the batches.
        seed: the generator seed of ``random``.

    The model is scored in eval mode (no jitter or dropout) and its mode and ``requires_grad`` flags are
    restored. Under expert parallelism this is collective over each layer's group and every rank returns
    the full scores.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    sites = _require_sites(model, "neuron_importance")
    device = sites[0].fc1.device
    if method == "magnitude":
        with torch.no_grad():
            return {s.name: _gather_experts(s, _neuron_sum(s, s.fc1.abs().float(), s.fc2.abs().float()))
                    * _width_mask(s, device) for s in sites}  # fmt: skip
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return {s.name: (torch.rand(s.num_experts, s.ffn, generator=g) * _width_mask(s, "cpu")).to(device)
                for s in sites}  # fmt: skip
    if batches is None:
        raise ValueError(f"batches=None: method={method!r} needs a non-empty calibration set")
    batches = list(batches)
    if not batches:
        raise ValueError(f"batches is empty: method={method!r} needs a non-empty calibration set")
    bare = isinstance(model, MoELayer)
    if bare and method == "sensitivity":
        raise ValueError(
            "neuron_importance(model=MoELayer, method='sensitivity'): a bare MoE layer has no loss; expected a "
            "language model (or method 'activation', 'magnitude' or 'random')"
        )
    if not bare:
        batches = [_check_token_batch(b, i) for i, b in enumerate(batches)]
    if teacher is not None and method != "sensitivity":
        raise ValueError(f"teacher is only used by method='sensitivity'; got method={method!r}")
    from rich.progress import Progress

    was_training = model.training
    model.eval()
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"importance ({method})", total=len(batches))
            if method == "sensitivity":
                return _sensitivity(model, sites, batches, teacher, top_k_logits, temperature, bar, task)
            return _activation_scores(model, sites, batches, bare, bar, task)
    finally:
        model.train(was_training)


def _sensitivity(model, sites, batches, teacher, k, temperature, bar, task) -> dict[str, torch.Tensor]:
    params = [(s.fc1, s.fc2) for s in sites]
    flags = {p: p.requires_grad for p in model.parameters()}
    acc = [torch.zeros(s.num_local_experts, s.ffn, dtype=torch.float32, device=s.fc1.device) for s in sites]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w1, w2 in params:
            w1.requires_grad_(True)
            w2.requires_grad_(True)
            w1.grad = w2.grad = None
        for batch in batches:
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with torch.enable_grad():
                logits = _logits(model, inputs)
            if teacher is None:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            else:
                tv, ti = _teacher_topk(teacher, inputs, k, logits.shape[-1])
                loss = distillation_loss(logits, tv, ti, temperature=temperature)
            loss.backward()
            with torch.no_grad():
                for a, s, (w1, w2) in zip(acc, sites, params, strict=True):
                    g1 = w1.grad if w1.grad is not None else torch.zeros_like(w1)
                    g2 = w2.grad if w2.grad is not None else torch.zeros_like(w2)
                    a += _neuron_sum(s, (w1 * g1).abs().float(), (w2 * g2).abs().float())
                    w1.grad = w2.grad = None
            bar.advance(task)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return {s.name: _gather_experts(s, a) * _width_mask(s, a.device) for s, a in zip(sites, acc, strict=True)}


def _act(site: MoESite, w1: torch.Tensor, x: torch.Tensor, width: int) -> torch.Tensor:
    """One expert's neuron activations: x (rows, H), w1 (fc1_rows, H) -> (rows, width)."""
    f = site.ffn
    if site.activation == "swiglu":
        return F.silu(x @ w1[:width].t()) * (x @ w1[f : f + width].t())
    return F.gelu(x @ w1[:width].t())


def _activation_scores(model, sites, batches, bare, bar, task) -> dict[str, torch.Tensor]:
    dev = sites[0].fc1.device
    abs_sum = [torch.zeros(s.num_local_experts, s.ffn, dtype=torch.float64, device=dev) for s in sites]
    slots = [torch.zeros(s.num_local_experts, dtype=torch.float64, device=dev) for s in sites]
    mass = [torch.zeros(s.num_experts, dtype=torch.float64, device=dev) for s in sites]
    tokens = [torch.zeros((), dtype=torch.float64, device=dev) for _ in sites]
    hooks = []

    def add_rows(i: int, x: torch.Tensor, counts: list[int]) -> None:
        s, start = sites[i], 0
        w1 = s.fc1.detach()
        for e, c in enumerate(counts):
            if c:
                a = _act(s, w1[e], x[start : start + c].to(w1.dtype), s.widths[s.expert_offset + e])
                abs_sum[i][e, : a.shape[1]] += a.abs().double().sum(0)
                slots[i][e] += c
            start += c

    def add_mass(i: int, probs: torch.Tensor, ids: torch.Tensor, n: int) -> None:
        keep = ids >= 0
        mass[i].index_add_(0, ids[keep], probs[keep].double())
        tokens[i] += n

    for i, s in enumerate(sites):
        if s.family == "longmoe":

            def experts_hook(mod, args, i=i):
                x, counts = args[0], args[1]
                add_rows(i, x.detach(), counts.tolist() if isinstance(counts, torch.Tensor) else list(counts))

            def router_hook(mod, args, out, i=i):
                add_mass(i, out.probs.detach(), out.expert_ids, args[0].shape[0])

            hooks.append(s.module.experts.register_forward_pre_hook(experts_hook))
            hooks.append(s.module.router.register_forward_hook(router_hook))
        else:

            def hf_hook(mod, args, kwargs, i=i):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                vals = list(args) + [kwargs[n] for n in names[len(args) :]]
                x, ids, probs = vals[0].detach(), vals[1], vals[2].detach()
                order = torch.sort(ids.reshape(-1), stable=True).indices
                counts = torch.bincount(ids.reshape(-1), minlength=sites[i].num_experts).tolist()
                add_rows(i, x[order // ids.shape[1]], counts)
                add_mass(i, probs, ids, x.shape[0])

            hooks.append(s.module.experts.register_forward_pre_hook(hf_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch) if bare else _logits(model, batch[:, :-1])
                bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, s in enumerate(sites):
        m, n = mass[i], tokens[i]
        if s.group is not None and s.num_local_experts != s.num_experts:
            dist.all_reduce(m, group=s.group)
            dist.all_reduce(n, group=s.group)
        lo = s.expert_offset
        local_mass = m[lo : lo + s.num_local_experts] / n.clamp(min=1)
        mean_abs = abs_sum[i] / slots[i].clamp(min=1)[:, None]
        out[s.name] = _gather_experts(s, (mean_abs * local_mass[:, None]).float())
    return out


# ----------------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------------
def expert_widths(
    model: nn.Module, keep: float | Mapping[str, int | Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """The per-expert widths ``keep`` asks for, ``{layer: (num_experts,) widths}``, validated.

    ``keep``: a fraction in (0, 1] of each expert's current width (rounded to nearest, at least 1), or
    ``{layer name: width | [width per expert]}`` naming every MoE layer, each width in [1, current width].
    """
    sites = _require_sites(model, "prune_experts")
    out = {}
    if isinstance(keep, Mapping):
        names = [s.name for s in sites]
        missing, extra = [n for n in names if n not in keep], [n for n in keep if n not in names]
        if missing or extra:
            raise ValueError(
                f"keep is missing MoE layers {missing} / names unknown layers {extra}: expected exactly {names}"
            )
        for s in sites:
            w = keep[s.name]
            ws = (w,) * s.num_experts if isinstance(w, int) and not isinstance(w, bool) else tuple(w)
            if len(ws) != s.num_experts:
                raise ValueError(
                    f"keep[{s.name!r}] has {len(ws)} widths: expected num_experts={s.num_experts}"
                )
            for e, (x, cur) in enumerate(zip(ws, s.widths, strict=True)):
                if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= cur:
                    raise ValueError(
                        f"keep[{s.name!r}][{e}]={x!r}: expected an int in [1, current width {cur}]"
                    )
            out[s.name] = ws
        return out
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0 < keep <= 1):
        raise ValueError(
            f"keep={keep!r}: expected a fraction in (0, 1] of each expert's width, or a dict of widths per layer"
        )
    for s in sites:
        out[s.name] = tuple(max(1, math.floor(keep * w + 0.5)) for w in s.widths)
    return out


@torch.no_grad()
def prune_experts(
    model: nn.Module, scores: Mapping[str, torch.Tensor], *, keep: float | Mapping[str, int | Sequence[int]]
) -> nn.Module:
    """Keep the highest-scoring neurons of every expert and shrink the weights (in place; returns ``model``).

    Args:
        model: a :class:`MoELayer`, a model containing them, or a Hugging Face Mixtral/Qwen2-MoE/PhiMoE model.
        scores: ``{layer name: (num_experts, ffn_hidden_size)}`` as :func:`neuron_importance` returns (every
            MoE layer, full shape even under expert parallelism). Ties keep the lower neuron index; kept
            neurons stay in their original order.
        keep: see :func:`expert_widths`.

    A :class:`MoELayer` gets a new :class:`GroupedExperts` and config (``ffn_hidden_size`` = the widest expert;
    ``expert_ffn_hidden_sizes`` when widths differ). A Hugging Face block gets smaller ``gate_up_proj`` /
    ``down_proj`` and the model config's ``intermediate_size`` (Mixtral, PhiMoE) or ``moe_intermediate_size``
    (Qwen2-MoE) is updated, so ``save_pretrained`` -> ``from_pretrained`` reloads it; Hugging Face has one
    width for every expert of every layer, so other widths raise. A model with ``sync_config()`` (e.g.
    :class:`~longmoe.models.byte_moe_lm.ByteMoELM`) has it called afterwards.
    """
    sites = _require_sites(model, "prune_experts")
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"scores={type(scores).__name__}: expected a dict {{layer name: (num_experts, ffn) tensor}}"
        )
    for s in sites:
        if s.name not in scores:
            raise ValueError(
                f"scores is missing MoE layer {s.name!r}: expected a key for each of {[x.name for x in sites]}"
            )
        t = scores[s.name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (s.num_experts, s.ffn):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"scores[{s.name!r}] has shape {got}: expected (num_experts, ffn_hidden_size) = "
                             f"({s.num_experts}, {s.ffn})")  # fmt: skip
    widths = expert_widths(model, keep)
    hf = [s for s in sites if s.family != "longmoe"]
    if hf:
        all_w = {w for s in hf for w in widths[s.name]}
        if len(all_w) != 1:
            raise ValueError(
                f"keep gives the Hugging Face experts widths {sorted(all_w)}: a {hf[0].family} config has one width "
                "for every expert of every layer; expected one uniform width"
            )
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ValueError(
                f"prune_experts(model={type(model).__name__}): Hugging Face blocks need the model (with .config) so "
                "the config width can be updated; expected a transformers model"
            )
    for s in sites:
        idx = _kept_indices(s, scores[s.name], widths[s.name])
        if s.family == "longmoe":
            _prune_layer(s, idx, widths[s.name])
        else:
            _prune_hf_block(s, idx)
    if hf:
        setattr(model.config, _HF_WIDTH_FIELD[hf[0].family], widths[hf[0].name][0])
    if hasattr(model, "sync_config"):
        model.sync_config()
    return model


def _kept_indices(site: MoESite, scores: torch.Tensor, widths: Sequence[int]) -> list[torch.Tensor]:
    """For each of this rank's experts, the kept neuron indices (ascending)."""
    out = []
    sc = scores.detach().float().cpu().masked_fill(~_width_mask(site, "cpu"), float("-inf"))
    for e in range(site.expert_offset, site.expert_offset + site.num_local_experts):
        order = torch.sort(sc[e], descending=True, stable=True).indices[: widths[e]]
        out.append(torch.sort(order).values.to(site.fc1.device))
    return out


def _rows(site: MoESite, idx: torch.Tensor) -> torch.Tensor:
    return torch.cat((idx, idx + site.ffn)) if site.activation == "swiglu" else idx


def _prune_layer(site: MoESite, idx: list[torch.Tensor], widths: Sequence[int]) -> None:
    layer: MoELayer = site.module
    new_ffn = max(widths)
    uniform = all(w == new_ffn for w in widths)
    cfg = dataclasses.replace(layer.config, ffn_hidden_size=new_ffn,
                              expert_ffn_hidden_sizes=None if uniform else tuple(widths))  # fmt: skip
    old = layer.experts
    new = GroupedExperts(cfg, device=old.linear_fc1.device, dtype=old.linear_fc1.dtype)
    new.linear_fc1.zero_()
    new.linear_fc2.zero_()
    for e, i in enumerate(idx):
        w = len(i)
        new.linear_fc1[e, :w] = old.linear_fc1[e, i]
        if cfg.activation == "swiglu":
            new.linear_fc1[e, new_ffn : new_ffn + w] = old.linear_fc1[e, i + site.ffn]
        new.linear_fc2[e, :, :w] = old.linear_fc2[e][:, i]
    new.linear_fc1.requires_grad_(old.linear_fc1.requires_grad)
    new.linear_fc2.requires_grad_(old.linear_fc2.requires_grad)
    new.train(old.training)
    layer.experts = new
    layer.config = cfg
    layer.router.config = cfg


def _prune_hf_block(site: MoESite, idx: list[torch.Tensor]) -> None:
    ex = site.module.experts
    fc1 = torch.stack([ex.gate_up_proj[e, _rows(site, i)] for e, i in enumerate(idx)])
    fc2 = torch.stack([ex.down_proj[e][:, i] for e, i in enumerate(idx)])
    ex.gate_up_proj = nn.Parameter(fc1.contiguous(), requires_grad=ex.gate_up_proj.requires_grad)
    ex.down_proj = nn.Parameter(fc2.contiguous(), requires_grad=ex.down_proj.requires_grad)
    if hasattr(ex, "intermediate_dim"):
        ex.intermediate_dim = fc2.shape[-1]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters of ``model`` (this rank's, under expert parallelism).

    Total excludes the zero padding of experts narrower than their layer's ``ffn_hidden_size``; active counts
    ``top_k`` routed experts per MoE layer at the layer's mean expert size (and every non-expert parameter).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    hf_top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    for s in moe_sites(model):
        h = s.fc1.shape[-1]
        local = s.widths[s.expert_offset : s.expert_offset + s.num_local_experts]
        sizes = [(3 if s.activation == "swiglu" else 2) * h * w for w in local]
        total -= s.fc1.numel() + s.fc2.numel() - sum(sizes)
        top_k = s.module.config.top_k if s.family == "longmoe" else hf_top_k
        inactive += sum(sizes) - top_k * sum(sizes) / len(sizes)
    return total, int(round(total - inactive))


def current_widths(model: nn.Module) -> dict[str, list[int]]:
    """``{layer name: per-expert widths}`` of every MoE layer (what a stage checkpoint records)."""
    return {s.name: list(s.widths) for s in _require_sites(model, "current_widths")}


# ----------------------------------------------------------------------------------------------------
# expert-level baselines (the paper's comparisons): drop experts, merge experts
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _replace_experts(
    layer: MoELayer, keep: list[int], fc1: torch.Tensor, fc2: torch.Tensor, router: torch.Tensor
):
    c = layer.config
    if c.expert_parallel_size != 1:
        raise ValueError(
            "expert-level baselines run without expert parallelism; expected expert_parallel_group=None"
        )
    widths = None if c.expert_ffn_hidden_sizes is None else tuple(c.expert_ffn_hidden_sizes[e] for e in keep)
    cfg = dataclasses.replace(
        c, num_experts=len(keep), top_k=min(c.top_k, len(keep)), expert_ffn_hidden_sizes=widths
    )
    new = MoELayer(cfg, device=fc1.device, dtype=fc1.dtype, backend=layer.backend)
    new.experts.linear_fc1.copy_(fc1)
    new.experts.linear_fc2.copy_(fc2)
    new.router.weight.copy_(router)
    for name in ("shared_expert", "shared_expert_gate"):
        setattr(new, name, getattr(layer, name))
    return new.train(layer.training)


def _swap_layers(model: nn.Module, fn: Callable[[str, MoELayer], MoELayer]) -> nn.Module:
    sites = [s for s in _require_sites(model, "expert baseline") if s.family == "longmoe"]
    for s in sites:
        new = fn(s.name, s.module)
        parent_name, _, attr = s.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    if hasattr(model, "sync_config"):
        model.sync_config()
    return model


def drop_experts(model: nn.Module, mass: Mapping[str, torch.Tensor], *, keep_experts: int) -> nn.Module:
    """Expert-dropping baseline: keep the ``keep_experts`` experts with the most routed mass per layer
    (``mass[layer]`` (num_experts,)), remove the others and their router rows. Returns ``model``."""

    def fn(name, layer):
        keep = sorted(
            torch.sort(mass[name].float().cpu(), descending=True, stable=True).indices[:keep_experts].tolist()
        )
        ex = layer.experts
        return _replace_experts(
            layer, keep, ex.linear_fc1[keep], ex.linear_fc2[keep], layer.router.weight[keep]
        )

    return _swap_layers(model, fn)


def merge_experts_pairwise(model: nn.Module, mass: Mapping[str, torch.Tensor]) -> nn.Module:
    """Expert-merging baseline: pair experts ``(0, 1), (2, 3), ...`` after sorting by routed mass, and replace
    each pair by one expert whose weights (and router row) are the mass-weighted average. Halves the experts
    (uniform widths only). Returns ``model``."""

    def fn(name, layer):
        m = mass[name].double().cpu() + 1e-9
        order = torch.sort(m, descending=True, stable=True).indices.tolist()
        pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
        ex = layer.experts
        fc1, fc2, router = [], [], []
        for a, b in pairs:
            wa, wb = float(m[a] / (m[a] + m[b])), float(m[b] / (m[a] + m[b]))
            fc1.append(wa * ex.linear_fc1[a] + wb * ex.linear_fc1[b])
            fc2.append(wa * ex.linear_fc2[a] + wb * ex.linear_fc2[b])
            router.append(wa * layer.router.weight[a] + wb * layer.router.weight[b])
        return _replace_experts(
            layer, list(range(len(pairs))), torch.stack(fc1), torch.stack(fc2), torch.stack(router)
        )

    return _swap_layers(model, fn)


def routed_mass(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{layer: (num_experts,) fp64}`` summed gating weight each expert received over ``batches`` (tokens)."""
    sites = [s for s in _require_sites(model, "routed_mass") if s.family == "longmoe"]
    acc = {s.name: torch.zeros(s.num_experts, dtype=torch.float64) for s in sites}
    hooks = []
    for s in sites:

        def hook(mod, args, out, name=s.name):
            keep = out.expert_ids >= 0
            acc[name].index_add_(0, out.expert_ids[keep].cpu(), out.probs[keep].detach().double().cpu())

        hooks.append(s.module.router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                _logits(model, b[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    return acc


# ----------------------------------------------------------------------------------------------------
# staged slimming
# ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class SlimmingStage:
    """One prune -> distil stage."""

    keep: float
    """Target width of every expert as a fraction in (0, 1] of its *original* width (the teacher's)."""
    tokens: int
    """Distillation tokens of this stage (rounded up to whole steps of ``batch * seqlen``); 0 = prune only."""
    kv_groups: int | None = None
    """Also prune attention to this many GQA groups per layer (whole KV heads with their query heads, as the
    paper does at large ratios) through the student's ``prune_kv_groups(n)`` (e.g.
    :class:`~longmoe.models.byte_moe_lm.ByteMoELM`, which ranks groups by their o_proj columns' norm: ours, the
    paper ranks them by sensitivity). None = attention untouched."""

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"SlimmingStage.keep={self.keep!r}: expected a fraction in (0, 1]")
        if self.kv_groups is not None and (
            isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int) or self.kv_groups < 1
        ):
            raise ValueError(f"SlimmingStage.kv_groups={self.kv_groups!r}: expected None or an int >= 1")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"SlimmingStage.tokens={self.tokens!r}: expected an int >= 0")


@dataclass(kw_only=True, slots=True)
class SlimmingPlan:
    """Stages and the distillation recipe of :func:`run_slimming`.

    ``SlimmingPlan.uniform(keep=0.25, stages=3, tokens=N)`` spaces the widths geometrically (0.63, 0.40,
    0.25 of the original) and splits ``N`` tokens equally, our choice for the paper's schedule at this scale.
    """

    stages: list[SlimmingStage]
    """Stages in order; their ``keep`` must not increase."""
    method: str = "sensitivity"
    """Neuron score (:data:`METHODS`)."""
    calibration_batches: int = 4
    """Calibration batches scored before each stage's pruning."""
    batch: int = 8
    """Sequences per distillation step (and per calibration batch)."""
    seqlen: int = 256
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak AdamW learning rate (10-step warmup, cosine to 10% within each stage)."""
    top_k_logits: int = 8
    """Teacher logits kept for the KD loss (the paper: top-8)."""
    temperature: float = 1.0
    """KD temperature (ours; the loss is scaled by T^2)."""
    lm_weight: float = 0.0
    """Weight of the next-token LM loss added to the KD loss."""
    seed: int = 0
    """Seed of the data, calibration and random-score generators (combined with the stage index)."""

    def __post_init__(self):
        if not self.stages or not all(isinstance(s, SlimmingStage) for s in self.stages):
            raise ValueError(
                f"SlimmingPlan.stages={self.stages!r}: expected a non-empty list of SlimmingStage"
            )
        keeps = [s.keep for s in self.stages]
        if any(b > a for a, b in zip(keeps, keeps[1:], strict=False)):
            raise ValueError(f"SlimmingPlan.stages keep={keeps}: expected non-increasing widths")
        if self.method not in METHODS:
            raise ValueError(f"SlimmingPlan.method={self.method!r}: expected one of {METHODS}")
        for name in ("calibration_batches", "batch", "seqlen", "top_k_logits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SlimmingPlan.{name}={v!r}: expected an int >= 1")

    @classmethod
    def uniform(cls, *, keep: float, stages: int, tokens: int, **kw) -> SlimmingPlan:
        """``stages`` stages with widths ``keep ** ((i + 1) / stages)`` and ``tokens // stages`` tokens each."""
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages={stages!r}: expected an int >= 1")
        return cls(stages=[SlimmingStage(keep=keep ** ((i + 1) / stages), tokens=tokens // stages)
                           for i in range(stages)], **kw)  # fmt: skip


def save_stage_checkpoint(model: nn.Module, path: Path, meta: dict) -> None:
    """``path`` (a ``.safetensors`` file): the model's state dict, with ``meta`` (JSON) and the expert widths
    in the safetensors metadata. Written to a temporary name and renamed, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    md = {"meta": json.dumps(meta), "widths": json.dumps(current_widths(model))}
    if hasattr(model, "prune_kv_groups"):
        md["heads_kv"] = str(model.cfg.heads_kv)
    save_file(sd, str(tmp), metadata=md)
    tmp.replace(path)


def load_stage_checkpoint(model: nn.Module, path: Path) -> dict:
    """Shrink ``model``'s experts to the widths recorded in ``path`` and load its weights; returns its meta."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    widths = {k: [int(x) for x in v] for k, v in json.loads(md["widths"]).items()}
    cur = current_widths(model)
    if widths != cur:
        zeros = {s.name: torch.zeros(s.num_experts, s.ffn) for s in moe_sites(model)}
        prune_experts(model, zeros, keep=widths)
    if "heads_kv" in md and int(md["heads_kv"]) != model.cfg.heads_kv:
        model.prune_kv_groups(
            int(md["heads_kv"])
        )  # which groups does not matter: the weights are loaded next
    model.load_state_dict(load_file(str(path)), strict=True)
    return json.loads(md["meta"])


def _stage_generator(seed: int, stage: int, what: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 101 + what)


def run_slimming(
    student: nn.Module,
    teacher: nn.Module | RemoteTeacher,
    plan: SlimmingPlan,
    train_data: torch.Tensor,
    *,
    out_dir: Path | None = None,
    progress: bool = True,
    evaluate: Callable[[nn.Module], float] | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Run ``plan`` on ``student`` (in place) against the frozen ``teacher``; return one record per stage.

    Args:
        student: the model to slim (a copy of the teacher at the start); pruned and trained in place.
        teacher: the original model (eval mode, no gradient), same vocabulary; or a :class:`RemoteTeacher` when
            it runs on another rank (which calls :func:`serve_teacher`; call ``close()`` after the run).
        train_data: (n,) uint8/int64 token stream; distillation and calibration windows come from it.
        out_dir: where ``stage{i}.safetensors`` is written after stage i; when it already holds stage
            checkpoints, the run resumes after the last one (bit-identical to an uninterrupted run).
        evaluate: ``f(model) -> held-out loss`` recorded after every stage (None: not measured).
        stop_after: stop after this many stages (to simulate an interruption in tests).

    Each record: stage, keep, widths, tokens, steps, final distillation loss, held-out loss right after pruning
    and after distillation (None without ``evaluate``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from longmoe.data import windows

    original = {s.name: s.widths for s in _require_sites(student, "run_slimming")}
    records: list[dict] = []
    first = 0
    if out_dir is not None:
        done = sorted(Path(out_dir).glob("stage*.safetensors"), key=lambda p: int(p.stem[5:]))
        if done:
            meta = load_stage_checkpoint(student, done[-1])
            records, first = meta["records"], meta["stage"] + 1
    if isinstance(teacher, nn.Module):
        teacher.eval()  # its forwards run under no_grad; its requires_grad flags are left alone
    cols = (TextColumn("[bold]stage {task.fields[stage]}[/] keep {task.fields[keep]}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("KD loss {task.fields[loss]}"))  # fmt: skip
    for si in range(first, len(plan.stages)):
        if stop_after is not None and si >= stop_after:
            break
        stage = plan.stages[si]
        g_cal = _stage_generator(plan.seed, si, 1)
        calib = [windows(train_data, plan.seqlen, plan.batch, g_cal) for _ in range(plan.calibration_batches)]
        scores = neuron_importance(student, calib, method=plan.method,
                                   teacher=teacher if plan.method == "sensitivity" else None, progress=progress,
                                   top_k_logits=plan.top_k_logits, temperature=plan.temperature, seed=plan.seed + si)  # fmt: skip
        target = {n: [max(1, math.floor(stage.keep * w + 0.5)) for w in ws] for n, ws in original.items()}
        cur = current_widths(student)
        target = {n: [min(t, c) for t, c in zip(target[n], cur[n], strict=True)] for n in target}
        prune_experts(student, scores, keep=target)
        if stage.kv_groups is not None:
            if not hasattr(student, "prune_kv_groups"):
                raise ValueError(
                    f"SlimmingStage.kv_groups={stage.kv_groups} needs a student with prune_kv_groups(); "
                    f"{type(student).__name__} has none"
                )
            if stage.kv_groups < student.cfg.heads_kv:
                student.prune_kv_groups(stage.kv_groups)
        pruned_loss = evaluate(student) if evaluate else None
        steps = math.ceil(stage.tokens / (plan.batch * plan.seqlen))
        last = _distil(student, teacher, plan, train_data, si, steps, progress, cols, stage.keep)
        rec = dict(stage=si, keep=stage.keep, widths=current_widths(student), tokens=steps * plan.batch * plan.seqlen,
                   steps=steps, distil_loss=last,
            held_out_loss_pruned=pruned_loss, held_out_loss=evaluate(student) if evaluate else None)  # fmt: skip
        records.append(rec)
        if out_dir is not None:
            save_stage_checkpoint(student, Path(out_dir) / f"stage{si}.safetensors",
                                  {"stage": si, "records": records, "plan": _plan_json(plan)})  # fmt: skip
    return records


def _plan_json(plan: SlimmingPlan) -> dict:
    d = dataclasses.asdict(plan)
    return d


def _distil(student, teacher, plan, train_data, si, steps, progress, cols, keep) -> float | None:
    from rich.progress import Progress

    from longmoe.data import windows

    if steps == 0:
        return None
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "student has no parameter with requires_grad=True: expected trainable weights to distil"
        )
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=plan.lr, betas=(0.9, 0.95))  # fmt: skip
    g = _stage_generator(plan.seed, si, 0)
    loss_v = None
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("distil", total=steps, stage=si, keep=f"{keep:.3f}", loss="-")
        for step in range(steps):
            warm = min(1.0, (step + 1) / 10)
            for group in opt.param_groups:
                group["lr"] = plan.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            batch = windows(train_data, plan.seqlen, plan.batch, g)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = _logits(student, inputs)
            tv, ti = _teacher_topk(teacher, inputs, plan.top_k_logits, logits.shape[-1])
            loss = distillation_loss(logits, tv, ti, temperature=plan.temperature, targets=targets,
                                     lm_weight=plan.lm_weight)  # fmt: skip
            aux = getattr(student, "aux_loss", None)
            total = loss + aux if isinstance(aux, torch.Tensor) and aux.requires_grad else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss_v = float(loss.detach())
            bar.update(task, advance=1, loss=f"{loss_v:.4f}")
    student.eval()
    return loss_v
