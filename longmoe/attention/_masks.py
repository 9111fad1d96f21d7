"""Attention masks our kernels can express: turn a 4-D mask into (causal, keys to keep), or raise.

Shared by the Hugging Face drop-ins (:mod:`longmoe.attention.hf`) and :func:`longmoe.attention.xattention.
xattention_sdpa`. Our kernels express the causal pattern (bottom-right aligned) and "everything visible",
plus keys that no query sees at the end (a static cache's unfilled slots), which are cropped; any other
mask raises ``NotImplementedError`` instead of being silently ignored.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_mask"]


def resolve_mask(
    mask: torch.Tensor | None, lq: int, lk: int, causal_default: bool, who: str, top_left: bool = False
) -> tuple[bool | str, int]:
    """Turn an attention mask into (causal, number of leading keys to keep), or raise.

    mask: None, or bool / additive float (batch|1, heads|1, seqlen_q, seqlen_k). Recognised: all visible
    (non-causal) and the bottom-right causal pattern, each optionally followed by key columns no query sees.
    """
    if mask is None:
        return causal_default, lk
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(f"{who}: attention_mask of type {type(mask).__name__} is not supported")
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (lq, lk):
        raise NotImplementedError(
            f"{who}: attention_mask must be 4-D (batch, heads, {lq}, {lk}); got shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        blocked = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool((allowed | blocked).all()):
            raise NotImplementedError(
                f"{who}: additive attention biases (values other than 0 / -inf) are not supported"
            )
    first = allowed[:1, :1]
    if not bool((allowed == first).all()):
        raise NotImplementedError(
            f"{who}: the attention mask differs between sequences or heads (padding or packed sequences); "
            "only the plain causal mask is supported - use attn_implementation='sdpa' for padded batches"
        )
    a = first[0, 0]
    cols = a.any(0).nonzero()
    if cols.numel() == 0:
        raise NotImplementedError(f"{who}: the attention mask hides every key")
    n = int(cols[-1]) + 1  # keys after the last visible one (a static cache's empty slots) are cropped
    a = a[:, :n]
    if bool(a.all()):
        return False, n
    causal = torch.ones(lq, n, dtype=torch.bool, device=a.device).tril(diagonal=n - lq)
    if torch.equal(a, causal):
        return True, n
    if top_left and lq > n and torch.equal(a, torch.ones(lq, n, dtype=torch.bool, device=a.device).tril()):
        return "top_left", n  # SDPA's causal with more queries than keys (see xattention_sdpa)
    raise NotImplementedError(
        f"{who}: only the causal mask (bottom-right aligned) or no mask is supported; got a custom 4-D mask "
        "(padding, sliding window or packed sequences) - use attn_implementation='sdpa' for those"
    )
