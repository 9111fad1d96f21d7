"""XAttention (arXiv 2503.16428): antidiagonal block scoring and block-sparse attention.

The sum of each ``stride x stride`` tile's antidiagonal is a cheap proxy for the tile's attention mass.
Regrouping keys as ``K_r[j] = concat_i K[j*S + i]`` and queries in reverse as ``Q_r[r] = concat_i
Q[r*S + S-1-i]`` turns every antidiagonal sum into one entry of ``Q_r K_r^T`` (inner dimension ``S*d``,
cost about ``L^2 d / S``). Scaled by ``softmax_scale / S`` (default ``1/(sqrt(d) * S)``), masked causally on
the stride grid and softmax-normalised per row in fp32, the entries are summed over each ``(block/S) x
(block/S)`` sub-grid to give block scores. Per (head, query block) a selection rule keeps key blocks until
their share of the row reaches the threshold τ (``selection=``):

* ``"paper"`` (default), the official ``find_blocks_chunked`` (mit-han-lab/x-attention,
  ``xattn/src/utils.py``): causal rows first keep their forced blocks - the first key block (attention
  sink) and the diagonal block - and credit their score; then the other blocks, in descending score, are
  added while the credited mass before a block is below ``τ * row total`` (the block that crosses is kept).
* ``"ranked"``: rank every block (forced ones included) by score, keep while the mass before a block is
  below ``τ * row total``, then OR the forced blocks in. The forced blocks' mass is not credited, so this
  keeps 1-3% more tiles on real inputs.

Without ``causal`` nothing is forced and both rules are plain greedy top-mass selection.

Where we differ from the official code, and why:

* Positions are token-exact: queries sit at ``q_offset .. q_offset + seqlen_q - 1`` (default ``seqlen_k -
  seqlen_q``, bottom-right as the attention core), so a chunked prefill whose offset is not a multiple of the
  block size gets the right causal grid and diagonal block (the diagonal is the key block holding the
  query block's last query). The official code pads Q and K to whole chunks and aligns in block units.
* Padded keys (past ``seqlen_k``) are masked out of the softmax, and padded query groups are dropped from a
  block's average; the official code scores the zero padding as real keys and queries.
* A full prefill (``current_index`` 0 in the official code) forces the sink and the diagonal like any other
  offset. The official code's ``mask[..., 0:chunk_num] = eye`` overwrites the sink column it set just before,
  so there it forces only the diagonal, and the slot reserved for the second forced block lets one more
  block in uncredited; for chunked prefills (``current_index > 0``) our rule and theirs agree tile for tile
  (``tests/test_xattention_selection.py`` checks this against a transcription of their function).
* Without ``causal`` nothing is forced. The official code marks key block 0 in every row in both modes, as a
  side effect of writing unkept positions as index 0 before its scatter.
* Only blocks with a positive score are added by the threshold (the official code can add zero-score blocks
  at τ = 1 through rounding); a block row none of whose queries sees a key (``seqlen_q >= seqlen_k +
  block_size`` with causal) keeps nothing, not a sink or diagonal at a negative index.
* GQA: ``head_selection="group"`` (default) averages the block scores of the query heads that share a KV
  head and selects once per group, so the KV tiles a group skips are skipped for all its heads;
  ``"head"`` selects per query head, what the official code does after ``repeat_kv``.

This module holds the estimator (per-head block scores from the C++ op ``longmoe::xattn_block_scores``
on CPU, the Triton kernel ``longmoe.kernels.xattention`` on CUDA, or the pure-PyTorch math; then the GQA
group mean and the selection, shared by every backend), its reference ``xattention_estimate_ref``, the
block-sparse attention entry on top of the attention core's block mask, ``xattention`` combining both, and
the SDPA-shaped ``xattention_sdpa``.

Memory: every backend scores query chunks against the keys, never the whole ``(L/S) x (L/S)`` matrix. The
C++ kernel holds ``64 x (L/S)`` fp32 scores per thread, the Triton kernel none (it recomputes), and the
reference ``_REF_CHUNK`` query tokens at a time (``O(chunk/S * L/S)`` per head). The selection works on the
``(L/block)^2`` block scores.

Conventions: q ``(batch, seqlen_q, heads_q, head_dim)``, k/v ``(batch, seqlen_k, heads_kv, head_dim)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from longmoe.attention._masks import resolve_mask
from longmoe.attention.flash_attention import flash_attention
from longmoe.runtime.backend import select_backend
from longmoe.runtime.dtypes import accumulation_dtype
from longmoe.runtime.native import register_fake

__all__ = [
    "xattention_estimate",
    "xattention_estimate_ref",
    "block_sparse_attention",
    "xattention",
    "xattention_sdpa",
    "XAttentionConfig",
    "SELECTIONS",
    "HEAD_SELECTIONS",
]

Selection = Literal["paper", "ranked"]
HeadSelection = Literal["group", "head"]
SELECTIONS: tuple[str, ...] = ("paper", "ranked")
HEAD_SELECTIONS: tuple[str, ...] = ("group", "head")
# Reference scorer: query tokens per chunk (rounded up to a whole number of blocks). 2048 tokens at S=8 is
# 256 query groups: a 64K-key row chunk is 256 x 8192 fp32 = 8 MiB per head, against 256 MiB for the
# unchunked (L/S)^2 matrix at 64K.
_REF_CHUNK = 2048


def _check_positive_finite(value, name: str, also: str = "") -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive finite int or float (not a bool)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number{also}; got {value!r}")


def _estimate_scale(softmax_scale: float | None, head_dim: int, sharpness: float) -> float | None:
    """The scale of the estimate's softmax: ``sharpness * softmax_scale`` (None: the kernels' default)."""
    if sharpness == 1:
        return None if softmax_scale is None else float(softmax_scale)
    base = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    return float(sharpness) * base


def _check_estimate_args(
    q, k, stride, block_size, threshold, causal, q_offset, softmax_scale=None, selection="paper",
    head_selection="group", sharpness=1.0,
):  # fmt: skip
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, seqlen, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"heads_q={q.shape[2]} must be a multiple of heads_kv={k.shape[2]}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int; got {stride!r}")
    if not isinstance(block_size, int) or block_size < 1 or block_size % stride:
        raise ValueError(f"block_size={block_size!r} must be a positive multiple of stride={stride}")
    heads = q.shape[2]
    if isinstance(threshold, torch.Tensor):
        if threshold.shape not in ((heads,), ()):
            raise ValueError(
                f"threshold tensor must have shape (heads_q,) = ({heads},); got {tuple(threshold.shape)}"
            )
        bad = (threshold <= 0) | (threshold > 1) | torch.isnan(threshold)
        if bool(bad.any()):
            raise ValueError(f"threshold values must be in (0, 1]; got {threshold.tolist()}")
    elif not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    if q_offset is not None and (not isinstance(q_offset, int) or q_offset < 0):
        raise ValueError(f"q_offset must be a non-negative int; got {q_offset!r}")
    if softmax_scale is not None:
        _check_positive_finite(softmax_scale, "softmax_scale", " or None")
    _check_positive_finite(sharpness, "sharpness")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    if head_selection not in HEAD_SELECTIONS:
        raise ValueError(f"head_selection must be one of {HEAD_SELECTIONS}; got {head_selection!r}")


def _block_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    stride: int,
    block_size: int,
    causal: bool,
    off: int,
    softmax_scale: float | None = None,
    chunk: int = _REF_CHUNK,
) -> torch.Tensor:
    """Per-query-head block scores (batch, heads_q, nqb, nkb) before GQA averaging, in fp32 (fp64 for fp64).

    The math every backend implements (``torch.ops.longmoe.xattn_block_scores``,
    ``longmoe.kernels.xattention``); ``off`` is the resolved absolute position of the first query (negative
    when queries precede key 0). Query blocks are scored ``chunk`` tokens (rounded up to whole blocks) at a
    time, so the score buffer is (batch, heads_q, chunk/S, seqlen_k/S), not (seqlen_q/S, seqlen_k/S).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    s = stride
    scale = (1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)) / s
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    lk_p = nkb * block_size
    group = hq // hkv
    r = block_size // s
    # Keys regrouped once: group j = concat of K rows jS..jS+S-1 (padded keys are zero, then masked).
    kp = torch.zeros(b, lk_p, hkv, d, dtype=acc, device=k.device)
    kp[:, :lk] = k.to(acc)
    kr = kp.view(b, lk_p // s, s, hkv, d).permute(0, 3, 1, 2, 4).reshape(b, hkv, 1, lk_p // s, s * d)
    gk = torch.arange(lk_p // s, device=q.device)
    real_k = gk * s < lk
    out = torch.zeros(b, hq, nqb, nkb, dtype=acc, device=q.device)
    bpc = max(1, -(-chunk // block_size))  # query blocks per chunk
    for qb0 in range(0, nqb, bpc):
        qb1 = min(nqb, qb0 + bpc)
        t0, t1 = qb0 * block_size, min(lq, qb1 * block_size)
        n_p = (qb1 - qb0) * block_size
        qp = torch.zeros(b, n_p, hq, d, dtype=acc, device=q.device)
        qp[:, : t1 - t0] = q[:, t0:t1].to(acc)
        # Query group r = rows rS+S-1..rS (reversed); head h = kv * group + g indexes its KV head.
        qr = (
            qp.view(b, n_p // s, s, hq, d)
            .flip(2)
            .permute(0, 3, 1, 2, 4)
            .reshape(b, hkv, group, n_p // s, s * d)
        )
        scores = torch.matmul(qr, kr.transpose(-1, -2)).mul_(scale).view(b, hq, n_p // s, lk_p // s)
        gq = t0 // s + torch.arange(n_p // s, device=q.device)  # absolute query-group index
        visible = real_k[None, :].expand(gq.numel(), -1)
        if causal:
            # A key group is visible to a query group if its first key is at or before the group's last query.
            visible = visible & (gk[None, :] * s <= (off + gq[:, None] * s + s - 1))
        scores = scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        real_q = gq * s < lq  # query groups holding at least one real query (padding groups are dropped)
        probs = torch.nan_to_num_(probs, nan=0.0).mul_(real_q[:, None])  # rows with no visible key group: 0
        blocks = probs.view(b, hq, qb1 - qb0, r, nkb, r).sum(dim=(3, 5))
        # Average over the block's real query groups, so a block row is a distribution over key blocks.
        out[:, :, qb0:qb1] = blocks / real_q.view(qb1 - qb0, r).sum(-1).clamp(min=1).to(acc)[:, None]
    return out


def _group_mean(blocks: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(batch, heads_q, nqb, nkb) per-head scores -> the mean over each KV group, repeated per query head."""
    b, hq = blocks.shape[:2]
    group = hq // heads_kv
    if group == 1:
        return blocks
    return blocks.view(b, heads_kv, group, *blocks.shape[2:]).mean(2).repeat_interleave(group, dim=1)


def _forced_blocks(shape, causal: bool, off: int, seqlen_q: int, block_size: int, device) -> torch.Tensor:
    """(nqb, nkb) bool: the blocks every causal row keeps, the sink (key block 0) and the diagonal (the key
    block holding the query block's last query). Rows none of whose queries sees a key (last query before
    position 0) force nothing; without ``causal`` nothing is forced."""
    nqb, nkb = shape[-2:]
    forced = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
    if not causal:
        return forced
    qb = torch.arange(nqb, device=device)
    last_q = torch.clamp(off + (qb + 1) * block_size - 1, max=off + seqlen_q - 1)
    has_keys = last_q >= 0
    diag = torch.div(last_q.clamp(min=0), block_size, rounding_mode="floor").clamp(max=nkb - 1)
    forced[:, 0] = has_keys
    forced[qb, diag] |= has_keys
    return forced


def _selection_order(
    blocks: torch.Tensor, forced: torch.Tensor, selection: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """τ-independent part of a selection rule: (sorted_scores, order, before), each like ``blocks``.

    ``order`` sorts the candidate blocks by descending score; ``before[..., i]`` is the mass credited before
    the i-th candidate. A candidate is kept at τ when ``before < τ * total`` and its score is positive.
    ``"paper"``: the forced blocks are no candidates (sorted last with score -1) and their mass is credited
    first; ``"ranked"``: every block is a candidate and nothing is credited.
    """
    if selection == "paper":
        credit = (blocks * forced).sum(-1, keepdim=True)
        sorted_scores, order = torch.sort(blocks.masked_fill(forced, -1.0), dim=-1, descending=True)
    else:
        credit = 0.0
        sorted_scores, order = torch.sort(blocks, dim=-1, descending=True)
    before = torch.cumsum(sorted_scores.clamp(min=0), dim=-1) - sorted_scores.clamp(min=0) + credit
    return sorted_scores, order, before


def _threshold_tensor(threshold, like: torch.Tensor) -> torch.Tensor:
    """τ as a tensor broadcasting against (batch, heads, nqb, 1)."""
    tau = threshold if isinstance(threshold, torch.Tensor) else torch.tensor(float(threshold))
    tau = tau.to(device=like.device, dtype=like.dtype)
    return tau.reshape(-1, 1, 1) if tau.dim() == 1 else tau


def _select_blocks(
    blocks: torch.Tensor,
    threshold: float | torch.Tensor,
    causal: bool,
    off: int,
    seqlen_q: int,
    block_size: int,
    selection: str = "paper",
) -> torch.Tensor:
    """Bool mask like ``blocks`` (batch, heads, nqb, nkb): the tiles ``selection`` keeps at ``threshold``
    (see the module docstring); causal rows always keep their sink and diagonal blocks."""
    forced = _forced_blocks(blocks.shape, causal, off, seqlen_q, block_size, blocks.device)
    sorted_scores, order, before = _selection_order(blocks, forced, selection)
    total = blocks.sum(-1, keepdim=True)
    keep_sorted = (before < _threshold_tensor(threshold, blocks) * total) & (sorted_scores > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) | forced


def _estimate_finish(blocks, k, threshold, causal, off, lq, block_size, selection, head_selection):
    if head_selection == "group":
        blocks = _group_mean(blocks, k.shape[2])
    return blocks, _select_blocks(blocks, threshold, causal, off, lq, block_size, selection)


@torch.no_grad()
def xattention_estimate_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    threshold: float | torch.Tensor = 0.9,
    causal: bool = False,
    q_offset: int | None = None,
    softmax_scale: float | None = None,
    selection: Selection = "paper",
    head_selection: HeadSelection = "group",
    sharpness: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antidiagonal block scores and the selected block mask, in plain PyTorch (fp32, fp64 for fp64 inputs).

    Args:
        q: (batch, seqlen_q, heads_q, head_dim); k: (batch, seqlen_k, heads_kv, head_dim).
        stride: antidiagonal length S; block_size: a multiple of S.
        threshold: keep-mass fraction τ in (0, 1], a float or a (heads_q,) tensor of per-head thresholds
            (with GQA group selection each query head applies its own τ to its group's averaged scores).
        causal: mask future key groups, aligned at ``q_offset`` (default False, as SDPA's ``is_causal``).
        q_offset: absolute position of the first query (default ``seqlen_k - seqlen_q``).
        softmax_scale: the attention's logit scale (default ``1/sqrt(head_dim)``); the antidiagonal sums are
            scaled by ``softmax_scale / stride``.
        selection: ``"paper"`` (default; forced sink/diagonal mass credited first, as the official
            ``find_blocks_chunked``) or ``"ranked"`` (rank all blocks, OR the forced ones in); see the module
            docstring.
        head_selection: ``"group"`` (default; GQA group mean, one mask per KV group) or ``"head"`` (each
            query head selects on its own scores).
        sharpness: multiplies the estimate's softmax scale (the sums are scaled by ``sharpness *
            softmax_scale / stride``); 1 (default) is the paper's estimator. Not in the paper: an antidiagonal
            sum averages ``stride`` logits, so the block distribution it gives is flatter than the true
            one and a row's τ cutoff keeps too many tiles where attention is peaked. On the byte LM's
            held-out 8K Q/K (``benchmarks/xattention_ablation.py``) ``sharpness=2`` kept the same true mass
            with fewer tiles (density over the oracle's at equal mass, stride 4: 1.32x -> 1.24x at mass
            0.95). It also lowers the mass kept at a given τ, so τ needs recalibrating with it.

    Returns:
        block_scores: (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)) fp32 (fp64),
            each row a distribution over key blocks (rows with no visible key are 0); with group selection
            the scores are averaged over the query heads of a KV group and repeated for each of them.
        block_mask: bool, same shape, the tiles to compute.
    """
    _check_estimate_args(q, k, stride, block_size, threshold, causal, q_offset, softmax_scale, selection,
                         head_selection, sharpness)  # fmt: skip
    lq, lk = q.shape[1], k.shape[1]
    off = lk - lq if q_offset is None else q_offset
    scale = _estimate_scale(softmax_scale, q.shape[3], sharpness)
    blocks = _block_scores_ref(q, k, stride, block_size, causal, off, scale)
    return _estimate_finish(blocks, k, threshold, causal, off, lq, block_size, selection, head_selection)


@torch.no_grad()
@register_fake("xattn_block_scores")
def _xattn_block_scores_fake(q, k, stride, block_size, causal, q_offset, softmax_scale=None):
    """Fake (meta) kernel of the C++ op, for torch.compile: (batch, heads_q, q blocks, k blocks) fp32."""
    nqb, nkb = -(-q.shape[1] // block_size), -(-k.shape[1] // block_size)
    return q.new_empty((q.shape[0], q.shape[2], nqb, nkb), dtype=torch.float32)


def xattention_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = 8,
    block_size: int = 128,
    threshold: float | torch.Tensor = 0.9,
    causal: bool = False,
    q_offset: int | None = None,
    softmax_scale: float | None = None,
    selection: Selection = "paper",
    head_selection: HeadSelection = "group",
    sharpness: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores and block mask (see :func:`xattention_estimate_ref` for shapes and semantics).

    The per-head block scores come from ``torch.ops.longmoe.xattn_block_scores`` (C++, CPU tensors), the
    Triton kernel ``longmoe.kernels.xattention`` (CUDA, or CPU under ``TRITON_INTERPRET=1`` when
    ``backend='triton'``) or the reference math, chosen by :func:`longmoe.runtime.select_backend`; fp64
    inputs always take the reference math (the kernels compute in fp32). The GQA group mean and the
    selection are shared PyTorch code. Scores are fp32 (fp64 for fp64 inputs).
    """
    _check_estimate_args(q, k, stride, block_size, threshold, causal, q_offset, softmax_scale, selection,
                         head_selection, sharpness)  # fmt: skip
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(
            f"q and k must share dtype and device; got {q.dtype}/{q.device} and {k.dtype}/{k.device}"
        )
    lq, lk = q.shape[1], k.shape[1]
    off = lk - lq if q_offset is None else q_offset
    name = select_backend(q, backend=backend)
    if name in ("native", "triton") and q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        name = "reference"  # the kernels compute in fp32; fp64 is the test oracle's dtype
    scale = _estimate_scale(softmax_scale, q.shape[3], sharpness)
    if name == "native":
        blocks = torch.ops.longmoe.xattn_block_scores(q, k, stride, block_size, bool(causal), off, scale)
    elif name == "triton":
        from longmoe.kernels.xattention import xattn_block_scores_triton  # noqa: PLC0415

        blocks = xattn_block_scores_triton(q, k, stride, block_size, bool(causal), off, softmax_scale=scale)
    else:
        blocks = _block_scores_ref(q, k, stride, block_size, causal, off, scale)
    return _estimate_finish(blocks, k, threshold, causal, off, lq, block_size, selection, head_selection)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_mask: torch.Tensor,
    block_size: int = 128,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention over the tiles ``block_mask`` keeps (masked tiles are skipped, not computed), with autograd.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim); block_mask
    (keyword-only): bool (batch, heads_q, ceil(seqlen_q/block_size), ceil(seqlen_k/block_size)). ``causal``
    defaults to False (as SDPA's ``is_causal``). Returns out like q (and lse (batch, heads_q, seqlen_q)
    fp32). An all-ones mask equals dense attention.
    """
    return flash_attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, block_mask=block_mask,
        block_size=block_size, backend=backend,
    )  # fmt: skip


def xattention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float | torch.Tensor = 0.9,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = False,
    softmax_scale: float | None = None,
    selection: Selection = "paper",
    head_selection: HeadSelection = "group",
    sharpness: float = 1.0,
    return_lse: bool = False,
    return_density: bool = False,
    backend: str | None = None,
):
    """XAttention: estimate the block mask (no gradient), then block-sparse attention (with autograd).

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim). ``causal``
    defaults to False (as SDPA's ``is_causal``); ``softmax_scale`` (default ``1/sqrt(head_dim)``) is used by
    both the estimate and the attention; ``selection`` / ``head_selection`` / ``sharpness`` (the estimate's
    only) as :func:`xattention_estimate_ref`. Returns out like q; with ``return_lse`` also lse (batch, heads_q,
    seqlen_q) fp32 (as :func:`~longmoe.attention.flash_attention`); with ``return_density`` last the kept
    fraction of the causally visible tiles (a float). ``backend`` (``native`` / ``triton`` /
    ``reference``) forces one for both the estimate and the attention.
    """
    _, mask = xattention_estimate(q.detach(), k.detach(), stride=stride, block_size=block_size,
                                  threshold=threshold, causal=causal, softmax_scale=softmax_scale,
                                  selection=selection, head_selection=head_selection, sharpness=sharpness,
                                  backend=backend)  # fmt: skip
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, block_size=block_size, causal=causal,
                                      softmax_scale=softmax_scale, return_lse=True, backend=backend)  # fmt: skip
    res = (out, lse) if return_lse else (out,)
    if return_density:
        res = (*res, block_density(mask, q.shape[1], k.shape[1], block_size, causal))
    return res if len(res) > 1 else out


@dataclass(frozen=True, kw_only=True)
class XAttentionConfig:
    """XAttention settings for the composed paths (``ParallelConfig.sparse``, the sequence-parallel
    attention's ``sparse=``, ``longmoe.megatron.gpt_layer_spec(sparse=)``). Validated on construction.

    ``threshold``: τ in (0, 1], one float or a (heads_q,) tensor of per-head thresholds (global head
    indices: under Ulysses each rank applies the slice of its heads, :meth:`for_heads`). The other fields
    as :func:`xattention`. Calling it runs :func:`xattention` on whole local sequences.
    """

    threshold: float | torch.Tensor = 0.9
    stride: int = 8
    block_size: int = 128
    selection: Selection = "paper"
    head_selection: HeadSelection = "group"
    sharpness: float = 1.0

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, torch.Tensor):
            if t.dim() > 1:
                raise ValueError(
                    f"XAttentionConfig.threshold: expected a float or a (heads_q,) tensor; got shape {tuple(t.shape)}"
                )
            bad = (t <= 0) | (t > 1) | torch.isnan(t)
            if bool(bad.any()):
                raise ValueError(f"XAttentionConfig.threshold={t.tolist()}: expected values in (0, 1]")
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(
                f"XAttentionConfig.threshold={t!r}: expected a float in (0, 1] or a (heads_q,) tensor"
            )
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"XAttentionConfig.stride={self.stride!r}: expected a positive int")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1 or bs % self.stride:
            raise ValueError(
                f"XAttentionConfig.block_size={bs!r}: expected a positive multiple of stride={self.stride}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"XAttentionConfig.selection={self.selection!r}: expected one of {SELECTIONS}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(
                f"XAttentionConfig.head_selection={self.head_selection!r}: expected one of {HEAD_SELECTIONS}"
            )
        _check_positive_finite(self.sharpness, "XAttentionConfig.sharpness")

    def for_heads(self, start: int, stop: int, heads_q: int) -> XAttentionConfig:
        """The settings for query heads ``start:stop`` of ``heads_q`` (slices a per-head threshold)."""
        t = self.threshold
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return self
        if t.shape[0] != heads_q:
            raise ValueError(
                f"XAttentionConfig.threshold has {t.shape[0]} per-head values; the attention has heads_q={heads_q}"
            )
        return dataclasses.replace(self, threshold=t[start:stop])

    def __call__(
        self, q, k, v, *, causal: bool, softmax_scale: float | None = None, return_lse: bool = False
    ):
        """q: (batch, seqlen, heads_q, head_dim); k, v: (batch, seqlen, heads_kv, head_dim), whole sequences.
        Returns out like q (and lse (batch, heads_q, seqlen) fp32 with ``return_lse``)."""
        return xattention(q, k, v, threshold=self.threshold, stride=self.stride, block_size=self.block_size,
                          causal=causal, softmax_scale=softmax_scale, selection=self.selection,
                          head_selection=self.head_selection, sharpness=self.sharpness,
                          return_lse=return_lse)  # fmt: skip


def block_density(mask: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: int, causal: bool) -> float:
    """Kept fraction of the visible tiles: mask (batch, heads, nqb, nkb) bool; causal bottom-right aligned."""
    visible = _visible_tiles(seqlen_q, seqlen_k, block_size, causal, mask.device)
    kept = (mask & visible).sum().item()
    return kept / max(visible.sum().item() * mask.shape[0] * mask.shape[1], 1)


def _visible_tiles(lq: int, lk: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """(nqb, nkb) bool: tiles holding at least one (query, key) pair the causal mask lets through."""
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    off = lk - lq
    last_q = torch.clamp(off + (torch.arange(nqb, device=device) + 1) * block_size - 1, max=off + lq - 1)
    first_k = torch.arange(nkb, device=device) * block_size
    return first_k[None, :] <= last_q[:, None]


# ----------------------------------------------------------------------------------------------------
# SDPA-shaped function
# ----------------------------------------------------------------------------------------------------
def xattention_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    threshold: float | torch.Tensor = 0.9,
    stride: int = 8,
    block_size: int = 128,
    selection: Selection = "paper",
    head_selection: HeadSelection = "group",
) -> torch.Tensor:
    """XAttention with ``torch.nn.functional.scaled_dot_product_attention``'s signature and layout.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim), heads_kv
    < heads_q only with ``enable_gqa`` (as SDPA). Returns (batch, heads_q, seqlen_q, head_dim).
    ``is_causal`` is SDPA's top-left aligned causal mask: with seqlen_q <= seqlen_k keys past seqlen_q are
    invisible and cropped; with seqlen_q > seqlen_k the queries from seqlen_k on see every key and run as a
    second, non-causal call. ``attn_mask`` may be the causal pattern or all-visible (see
    :func:`longmoe.attention._masks.resolve_mask`); anything else, and ``dropout_p > 0``, raise ``NotImplementedError``.
    """
    if dropout_p:
        raise NotImplementedError(f"xattention_sdpa: dropout is not supported; got dropout_p={dropout_p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seqlen, head_dim)")
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"query heads {hq} != key heads {hkv}: pass enable_gqa=True for GQA (as SDPA)")
    if attn_mask is not None and is_causal:
        raise ValueError("xattention_sdpa: give attn_mask or is_causal, not both (as SDPA)")
    lq, lk = query.shape[2], key.shape[2]
    kw = dict(threshold=threshold, stride=stride, block_size=block_size, softmax_scale=scale, selection=selection,
              head_selection=head_selection)  # fmt: skip
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attn_mask is not None:
        if attn_mask.dim() < 4:  # SDPA broadcasts (seqlen_q, seqlen_k) masks
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        causal, n = resolve_mask(attn_mask, lq, lk, False, "xattention_sdpa", top_left=True)
        k, v, lk = k[:, :n], v[:, :n], n
        if causal == "top_left":
            is_causal = True
        else:
            return xattention(q, k, v, causal=causal, **kw).transpose(1, 2)
    if not is_causal:
        out = xattention(q, k, v, causal=False, **kw)
    elif lq <= lk:  # top-left causal: key j visible to query i iff j <= i, so keys >= seqlen_q are never seen
        out = xattention(q, k[:, :lq], v[:, :lq], causal=True, **kw)
    else:  # queries 0..lk-1 causal on a square; the rest see every key
        head = xattention(q[:, :lk], k, v, causal=True, **kw)
        tail = xattention(q[:, lk:], k, v, causal=False, **kw)
        out = torch.cat([head, tail], dim=1)
    return out.transpose(1, 2)
