"""Per-head XAttention threshold calibration, and the thresholds' JSON file.

XAttention keeps, per (head, query block), the highest-scoring key blocks until their share of the
antidiagonal scores reaches the threshold τ. One τ does not fit every head: a head that looks at a local
window or at an attention sink reaches 90% of its attention mass with a few tiles, a diffuse head needs
most of them. :func:`calibrate_thresholds` picks τ per head from sample (q, k) pairs:

* ``target_mass=m``: the smallest τ whose selected tiles hold at least ``m`` of the head's *true*
  attention probability mass (dense softmax, :func:`true_block_mass`) on the worst sequence of the
  calibration set (every batch row of every sample counts as one sequence; taking the worst rather than
  the mean is the safe choice: a held-out input like the hardest calibration input still meets the target).
  A sequence's kept mass is the fraction of its total attention probability (each real query contributes
  1) that falls in the kept tiles.
* ``density_budget=d``: the largest τ whose density (kept fraction of the causally visible tiles), averaged
  over the calibration sequences, is at most ``d``.

Search. The selected set only grows with τ (the score order does not depend on τ; a block is kept when the
mass before it is below ``τ * total``), so both the kept mass and the density are non-decreasing in τ and a
bisection over τ in (0, 1], vectorised over heads, finds the boundary. The estimator runs once per sample
(the block scores do not depend on τ); each bisection step only re-applies the selection rule to the
pre-sorted scores, so 20 steps (resolution 2^-20 ≈ 1e-6 in τ) cost little next to one estimate. With
``grid`` (a 1-D sequence of candidate τ) the search instead returns the smallest (target mode) / largest
(budget mode) candidate that satisfies the constraint.

The paper (arXiv 2503.16428) describes a dynamic-programming search over thresholds that was not released;
this bisection solves the same per-head problem exactly up to its resolution, because the constraint is
monotone in τ.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence

import torch

from longmoe.attention.xattention import (
    _forced_blocks,
    _selection_order,
    _visible_tiles,
    xattention_estimate,
)
from longmoe.runtime.dtypes import accumulation_dtype

__all__ = ["true_block_mass", "calibrate_thresholds", "save_thresholds", "load_thresholds"]

_BISECT_STEPS = 20  # resolution 2^-20 in τ; each step is a compare + masked sum over pre-sorted tiles
_FORMAT = "longmoe.xattention_thresholds"
_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# true attention mass per tile
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def true_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    block_size: int = 128,
    softmax_scale: float | None = None,
    q_offset: int | None = None,
) -> torch.Tensor:
    """Dense attention probability mass per (query block, key block) tile, each block row a distribution.

    q: (batch, seqlen_q, heads_q, head_dim); k: (batch, seqlen_k, heads_kv, head_dim), GQA by indexing the
    KV head (no repeat). ``causal`` defaults to False (as SDPA's ``is_causal``). Queries sit at ``q_offset
    .. q_offset + seqlen_q - 1`` (default ``seqlen_k - seqlen_q``, bottom-right as the attention core). Returns (batch, heads_q, ceil(seqlen_q/block_size),
    ceil(seqlen_k/block_size)) fp32 (fp64 for fp64 inputs): the summed softmax probabilities of the tile's
    (query, key) pairs divided by the number of the block's queries that see a key, so a row sums to 1 (0
    for a block none of whose queries sees a key). Computed one query block at a time: memory is
    O(batch * heads * block_size * seqlen_k), never the full score matrix.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, seqlen, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"heads_q={hq} must be a multiple of heads_kv={hkv}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    off = lk - lq if q_offset is None else q_offset
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    g = hq // hkv
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    pad = nkb * block_size - lk
    kt = k.to(acc).permute(0, 2, 3, 1)  # (B, Hkv, D, Lk)
    kpos = torch.arange(lk, device=k.device)
    out = torch.zeros(b, hq, nqb, nkb, dtype=acc, device=q.device)
    for i in range(nqb):
        qs = q[:, i * block_size : (i + 1) * block_size].to(acc)
        n = qs.shape[1]
        # Query head h = kv * g + j: the g heads of a group are contiguous, so a reshape indexes the KV head.
        qg = qs.permute(0, 2, 1, 3).reshape(b, hkv, g * n, d)
        s = torch.matmul(qg, kt).mul_(scale).view(b, hq, n, lk)
        rows = n
        if causal:
            qpos = off + i * block_size + torch.arange(n, device=q.device)
            s.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))
            rows = int((qpos >= 0).sum())  # queries that see at least key 0
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        p = torch.nn.functional.pad(p, (0, pad)).view(b, hq, n, nkb, block_size).sum(dim=(2, 4))
        out[:, :, i] = p / max(rows, 1)
    return out


# ----------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------
def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    return float(value)


def _check_pair(i: int, pair) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"samples[{i}] must be a (q, k) pair; got {type(pair).__name__}")
    q, k = pair
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        raise TypeError(f"samples[{i}]: q and k must be tensors; got {type(q).__name__}, {type(k).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"samples[{i}]: q must be (batch, seqlen, heads_q, head_dim) and k (batch, seqlen, heads_kv, "
            f"head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"samples[{i}]: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"samples[{i}]: heads_q={q.shape[2]} must be a multiple of heads_kv={k.shape[2]}")
    return q, k


class _Sample:
    """One sample's τ-independent tensors, tiles in the selection rule's candidate order: (B, H, nqb, nkb)."""

    __slots__ = ("before", "total", "positive", "floor", "mass", "visible", "row_weight", "n_visible")

    def __init__(self, q, k, stride, block_size, causal, selection, head_selection, softmax_scale, sharpness):
        scores, _ = xattention_estimate(
            q, k, stride=stride, block_size=block_size, threshold=1.0, causal=causal,
            softmax_scale=softmax_scale, selection=selection, head_selection=head_selection, sharpness=sharpness,
        )  # fmt: skip
        # The estimator's own selection arithmetic (_selection_order, τ * total in the scores' dtype), so the
        # kept set here is the estimator's bit for bit; the bisection's τ is evaluated after rounding to that
        # dtype, and the float32 τ returned is one that was evaluated.
        off = k.shape[1] - q.shape[1]
        forced = _forced_blocks(scores.shape, causal, off, q.shape[1], block_size, scores.device)
        sorted_scores, order, self.before = _selection_order(scores, forced, selection)
        self.total = scores.sum(-1, keepdim=True)
        self.positive = sorted_scores > 0
        self.floor = forced.expand_as(scores).gather(-1, order)  # the always-kept tiles (sink, diagonal)
        mass = true_block_mass(q, k, causal=causal, block_size=block_size, softmax_scale=softmax_scale)
        self.mass = mass.double().gather(-1, order)
        lq, lk = q.shape[1], k.shape[1]
        vis = _visible_tiles(lq, lk, block_size, causal, q.device)
        self.visible = vis.expand_as(scores).gather(-1, order)
        self.n_visible = vis.sum().clamp(min=1).double()
        # Queries per block row that see a key: weights turning row-normalised tile mass into a sequence's
        # fraction of total attention probability.
        qpos = (lk - lq if causal else 0) + torch.arange(lq, device=q.device)
        real = (qpos >= 0) if causal else torch.ones(lq, dtype=torch.bool, device=q.device)
        nqb = scores.shape[2]
        real = torch.nn.functional.pad(real, (0, nqb * block_size - lq)).view(nqb, block_size).sum(-1)
        self.row_weight = real.double() / real.sum().clamp(min=1)

    def keep(self, tau: torch.Tensor) -> torch.Tensor:
        """Kept tiles (sorted order) at per-head τ (H,): the estimator's selection rule."""
        t = tau.to(self.before.dtype).view(1, -1, 1, 1)
        return self.floor | ((self.before < t * self.total) & self.positive)

    def kept_mass(self, tau: torch.Tensor) -> torch.Tensor:
        """(B, H): each sequence's fraction of true attention mass inside the kept tiles."""
        rows = (self.mass * self.keep(tau)).sum(-1)  # (B, H, nqb)
        return (rows * self.row_weight).sum(-1)

    def density(self, tau: torch.Tensor) -> torch.Tensor:
        """(B, H): kept fraction of the causally visible tiles."""
        return (self.keep(tau) & self.visible).sum(dim=(2, 3)).double() / self.n_visible


def calibrate_thresholds(
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    target_mass: float | None = None,
    density_budget: float | None = None,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = False,
    softmax_scale: float | None = None,
    selection: str = "paper",
    head_selection: str = "group",
    sharpness: float = 1.0,
    grid: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head XAttention thresholds from sample inputs (see the module docstring for the search).

    Args:
        samples: iterable of (q, k): q (batch, seqlen_q, heads_q, head_dim), k (batch, seqlen_k, heads_kv,
            head_dim); every sample has the same heads_q; lengths may differ between samples.
        target_mass: in (0, 1]: smallest τ per head whose kept tiles hold at least this fraction of the
            head's true attention mass on every calibration sequence (worst sequence, not the mean).
        density_budget: in (0, 1]: largest τ per head whose mean density over the sequences is at most
            this. Exactly one of ``target_mass`` and ``density_budget``.
        stride, block_size, causal, softmax_scale, selection, head_selection, sharpness: the estimator
            settings the thresholds will be used with (``causal`` defaults to False, as SDPA's ``is_causal``;
            the true mass always uses ``softmax_scale``, never the sharpness).
        grid: None for bisection (resolution 2^-20), or candidate τ values in (0, 1] to choose from.

    Returns:
        (heads_q,) float32 thresholds in (0, 1]. A head that cannot reach ``target_mass`` even at τ = 1
        gets 1.0, and a head whose always-kept tiles (sink, diagonal; with ``"ranked"`` the top block) exceed ``density_budget``
        gets the smallest τ searched; both cases warn.
    """
    if (target_mass is None) == (density_budget is None):
        raise ValueError(
            f"give exactly one of target_mass and density_budget; got target_mass={target_mass!r}, "
            f"density_budget={density_budget!r}"
        )
    mode = "mass" if target_mass is not None else "density"
    goal = _check_fraction("target_mass" if mode == "mass" else "density_budget",
                           target_mass if mode == "mass" else density_budget)  # fmt: skip
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int; got {stride!r}")
    if not isinstance(block_size, int) or block_size < 1 or block_size % stride:
        raise ValueError(f"block_size={block_size!r} must be a positive multiple of stride={stride}")
    cands = None
    if grid is not None:
        cands = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if cands.numel() == 0 or bool(((cands <= 0) | (cands > 1) | torch.isnan(cands)).any()):
            raise ValueError(f"grid must be a non-empty sequence of values in (0, 1]; got {cands.tolist()}")
        cands = torch.unique(cands)  # sorted ascending
    prepared: list[_Sample] = []
    heads = None
    for i, pair in enumerate(samples):
        q, k = _check_pair(i, pair)
        if heads is None:
            heads = q.shape[2]
        elif q.shape[2] != heads:
            raise ValueError(f"samples[{i}] has heads_q={q.shape[2]}; samples[0] has heads_q={heads}")
        prepared.append(
            _Sample(q, k, stride, block_size, causal, selection, head_selection, softmax_scale, sharpness)
        )
    if not prepared:
        raise ValueError("samples must hold at least one (q, k) pair; got none")
    device = prepared[0].before.device

    def feasible(tau: torch.Tensor) -> torch.Tensor:  # (H,) -> (H,) bool, at τ rounded to the returned fp32
        tau = tau.float().double()
        if mode == "mass":
            worst = torch.stack([s.kept_mass(tau).min(0).values for s in prepared]).min(0).values
            return worst >= goal - 1e-12  # the kept mass is a sum of fp64 terms; forgive the last ulp
        mean = torch.cat([s.density(tau) for s in prepared]).mean(0)
        return mean <= goal + 1e-12

    ones = torch.ones(heads, dtype=torch.float64, device=device)
    if cands is not None:
        ok = torch.stack([feasible(c * ones) for c in cands])  # (n_cands, H)
        idx = torch.arange(len(cands), device=device)[:, None].expand_as(ok)
        if mode == "mass":
            first = torch.where(ok, idx, len(cands)).min(0).values
            tau = torch.where(first < len(cands), cands[first.clamp(max=len(cands) - 1)], ones)
            unreachable = first == len(cands)
        else:
            last = torch.where(ok, idx, -1).max(0).values
            tau = cands[last.clamp(min=0)]
            unreachable = last < 0
    else:
        at_one = feasible(ones)
        lo, hi = torch.zeros_like(ones), ones.clone()
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            ok = feasible(mid)
            if mode == "mass":  # invariant: hi feasible (or 1.0), lo infeasible
                hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
            else:  # invariant: lo feasible (or 0), hi infeasible (or 1.0)
                lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        if mode == "mass":
            tau, unreachable = hi, ~at_one
        else:
            tau = torch.where(at_one, ones, lo)
            unreachable = tau == 0
            tau = torch.where(unreachable, torch.full_like(tau, 2.0**-_BISECT_STEPS), tau)
    if bool(unreachable.any()):
        heads_bad = unreachable.nonzero().flatten().tolist()
        what = (f"cannot keep target_mass={goal} even at threshold 1.0" if mode == "mass"
                else f"exceed density_budget={goal} with only their always-kept tiles")  # fmt: skip
        warnings.warn(f"heads {heads_bad} {what}; returning {tau[unreachable].tolist()}", stacklevel=2)
    return tau.float().cpu()  # every value here was evaluated by feasible() at exactly this fp32 value


# ----------------------------------------------------------------------------------------------------
# JSON file
# ----------------------------------------------------------------------------------------------------
def _to_list(name: str, t) -> list[float]:
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"thresholds[{name!r}] must be a non-empty (heads,) vector; got shape {tuple(t.shape)}"
        )
    if bool(((t <= 0) | (t > 1) | torch.isnan(t)).any()):
        raise ValueError(f"thresholds[{name!r}] values must be in (0, 1]; got {t.tolist()}")
    return [float(x) for x in t]


def save_thresholds(
    path: str | os.PathLike,
    thresholds: dict[str, torch.Tensor] | torch.Tensor,
    *,
    model: str,
    meta: dict | None = None,
) -> None:
    """Write per-layer thresholds as JSON.

    Args:
        path: file to write.
        thresholds: ``{layer_name: (heads_q,) tensor}`` (layer names as in ``model.named_modules()``, for
            example ``"model.layers.0.self_attn"``), or one tensor, stored under the name ``"default"``.
        model: the model the thresholds belong to (a hub id or any name).
        meta: extra JSON-serialisable settings; the keys ``stride``, ``block_size``, ``causal``,
            ``target_mass`` and ``density_budget`` are validated when present.

    File: ``{"format": "longmoe.xattention_thresholds", "version": 1, "model": ..., "meta": {...},
    "layers": {name: [tau_head0, tau_head1, ...]}}``.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string; got {model!r}")
    if isinstance(thresholds, torch.Tensor):
        thresholds = {"default": thresholds}
    if not isinstance(thresholds, dict) or not thresholds:
        raise ValueError(
            f"thresholds must be a tensor or a non-empty dict of tensors; got {type(thresholds).__name__}"
        )
    layers = {}
    for name, t in thresholds.items():
        if not isinstance(name, str):
            raise ValueError(f"thresholds keys must be layer names (str); got {name!r}")
        layers[name] = _to_list(name, t)
    meta = dict(meta or {})
    _check_meta(meta)
    doc = {"format": _FORMAT, "version": _VERSION, "model": model, "meta": meta, "layers": layers}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _check_meta(meta: dict) -> None:
    for key in ("stride", "block_size"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 1):
            raise ValueError(f"meta.{key} must be a positive int; got {meta[key]!r}")
    if "stride" in meta and "block_size" in meta and meta["block_size"] % meta["stride"]:
        raise ValueError(
            f"meta.block_size={meta['block_size']} must be a multiple of meta.stride={meta['stride']}"
        )
    if "causal" in meta and not isinstance(meta["causal"], bool):
        raise ValueError(f"meta.causal must be a bool; got {meta['causal']!r}")
    for key in ("target_mass", "density_budget"):
        if key in meta and meta[key] is not None:
            _check_fraction(f"meta.{key}", meta[key])


def load_thresholds(path: str | os.PathLike, *, return_info: bool = False):
    """Read a file written by :func:`save_thresholds`.

    Returns ``{layer_name: (heads,) float32 tensor}``, and with ``return_info`` also ``{"model": str,
    "meta": dict}``. Malformed files raise ``ValueError`` naming the offending field.
    """
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{os.fspath(path)}: top level must be an object; got {type(doc).__name__}")
    if doc.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)}: field 'format' must be {_FORMAT!r}; got {doc.get('format')!r}")
    if doc.get("version") != _VERSION:
        raise ValueError(f"{os.fspath(path)}: field 'version' must be {_VERSION}; got {doc.get('version')!r}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{os.fspath(path)}: field 'model' must be a non-empty string; got {model!r}")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{os.fspath(path)}: field 'meta' must be an object; got {type(meta).__name__}")
    _check_meta(meta)
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{os.fspath(path)}: field 'layers' must be a non-empty object of name -> list")
    out = {}
    for name, vals in layers.items():
        if not isinstance(vals, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals
        ):
            raise ValueError(
                f"{os.fspath(path)}: field 'layers.{name}' must be a list of numbers; got {vals!r}"
            )
        try:
            _to_list(name, vals)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: field 'layers.{name}': {e}") from None
        out[name] = torch.tensor(vals, dtype=torch.float32)
    return (out, {"model": model, "meta": meta}) if return_info else out
