"""Drop-ins: Hugging Face ``attn_implementation="longmoe_xattention"`` / ``"longmoe_dense"``, and an
SDPA-shaped XAttention function.

The dense name is ``longmoe_dense``, not ``longmoe_flash``: transformers 5.x treats every implementation
whose name contains "flash" as a flash-attention kernel (``utils.generic.is_flash_attention_requested`` is a
substring test) and tries to import one from the hub at model construction.

Written against transformers 5.x, whose attention modules call
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs) -> (out, weights)``
with query ``(batch, heads_q, seqlen_q, head_dim)``, key/value ``(batch, heads_kv, seqlen_k, head_dim)``
(not repeated: GQA is left to the function) and expect ``out`` as ``(batch, seqlen_q, heads_q, head_dim)``
(see ``transformers/integrations/sdpa_attention.py``). That output layout is ours, so the adapter only
transposes the inputs; K/V are never repeated.

    register_hf_attention()
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="longmoe_xattention")
    set_xattention_thresholds(model, load_thresholds("thresholds.json"), stride=8, block_size=128)

Masks. The names are also registered with transformers' mask interface (as SDPA's mask builder), so the
model hands us either ``None`` (plain causal, or decoding one token) or a 4-D mask. Our kernels express the
causal pattern (bottom-right aligned) and "everything visible", plus keys that no query sees at the end (a
static cache's unfilled slots), which are cropped. Any other mask - padding in a batch, packed sequences,
sliding windows, additive biases - raises ``NotImplementedError`` instead of being silently ignored.
"""

from __future__ import annotations

import torch

from longmoe.attention.flash_attention import flash_attention
from longmoe.attention.xattention import xattention

__all__ = [
    "HF_ATTENTION_NAMES",
    "register_hf_attention",
    "set_xattention_thresholds",
    "hf_xattention_forward",
    "hf_flash_attention_forward",
    "xattention_sdpa",
]

HF_ATTENTION_NAMES: tuple[str, ...] = ("longmoe_xattention", "longmoe_dense")
_ATTR = (
    "longmoe_xattention"  # module attribute: {"threshold": float | (heads_q,) tensor, "stride", "block_size"}
)
_DEFAULTS = {"threshold": 0.9, "stride": 8, "block_size": 128}


# ----------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------
def _resolve_mask(
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


# ----------------------------------------------------------------------------------------------------
# Hugging Face attention functions
# ----------------------------------------------------------------------------------------------------
def _hf_prepare(module, query, key, value, attention_mask, dropout, kwargs, who):
    if dropout and module.training:
        raise NotImplementedError(f"{who}: attention dropout is not supported; got dropout={dropout}")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{who}: softcap is not supported")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"{who}: sliding-window attention is not supported")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    lq, lk = query.shape[2], key.shape[2]
    causal, n = _resolve_mask(attention_mask, lq, lk, is_causal and lq > 1, who)
    if attention_mask is None and causal and lk > lq:
        # transformers passes no mask with more keys than queries (q > 1) only for a prefill into an empty
        # static cache (SDPA's top-left `is_causal` then holds): the keys past seqlen_q are empty slots.
        n = lq
    q = query.transpose(1, 2)
    k = key[:, :, :n].transpose(1, 2)
    v = value[:, :, :n].transpose(1, 2)
    return q, k, v, causal


def hf_xattention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: XAttention with the module's thresholds.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim).
    Returns ((batch, seqlen_q, heads_q, head_dim), None). Settings come from
    ``module.longmoe_xattention`` (see :func:`set_xattention_thresholds`), defaulting to threshold 0.9,
    stride 8, block size 128.
    """
    q, k, v, causal = _hf_prepare(
        module, query, key, value, attention_mask, dropout, kwargs, "longmoe_xattention"
    )
    cfg = {**_DEFAULTS, **getattr(module, _ATTR, {})}
    thr = cfg["threshold"]
    if isinstance(thr, torch.Tensor):
        thr = thr.to(q.device)
    out = xattention(q, k, v, threshold=thr, stride=cfg["stride"], block_size=cfg["block_size"],
                     causal=causal, softmax_scale=scaling)  # fmt: skip
    return out, None


def hf_flash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: dense :func:`flash_attention` (same layouts as
    :func:`hf_xattention_forward`)."""
    q, k, v, causal = _hf_prepare(module, query, key, value, attention_mask, dropout, kwargs, "longmoe_dense")
    return flash_attention(q, k, v, causal=causal, softmax_scale=scaling), None


def register_hf_attention() -> None:
    """Register ``"longmoe_xattention"`` and ``"longmoe_dense"`` with transformers' attention and mask
    interfaces (idempotent). The mask builder is SDPA's: ``None`` for plain causal, else a 4-D bool mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("longmoe_xattention", hf_xattention_forward)
    AttentionInterface.register("longmoe_dense", hf_flash_attention_forward)
    for name in HF_ATTENTION_NAMES:
        AttentionMaskInterface.register(name, sdpa_mask)


def _attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Named attention modules: those with a ``layer_idx`` and the ``num_key_value_groups`` of HF attention."""
    return {
        n: m
        for n, m in model.named_modules()
        if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
    }


def set_xattention_thresholds(
    model: torch.nn.Module,
    thresholds: float | torch.Tensor | dict,
    *,
    stride: int | None = None,
    block_size: int | None = None,
) -> None:
    """Set XAttention thresholds (and optionally stride / block size) on every attention module of ``model``.

    thresholds: one float or (heads_q,) tensor for every layer, or a dict keyed by attention-module name
    (``"model.layers.0.self_attn"``, as :func:`~longmoe.attention.xattention_calibrate.load_thresholds`
    returns), by layer index (int), or ``"default"`` for the layers not named. Values are in (0, 1].
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            "model has no Hugging Face attention modules (modules with layer_idx and num_key_value_groups)"
        )
    by_idx = {m.layer_idx: n for n, m in modules.items()}
    if isinstance(thresholds, dict):
        per = {}
        default = None
        for key, val in thresholds.items():
            if key == "default":
                default = val
            elif isinstance(key, int) and key in by_idx:
                per[by_idx[key]] = val
            elif isinstance(key, str) and key in modules:
                per[key] = val
            else:
                raise ValueError(
                    f"threshold key {key!r} names no attention module; expected one of {sorted(modules)}, a layer "
                    "index or 'default'"
                )
        missing = [n for n in modules if n not in per]
        if missing and default is None:
            raise ValueError(f"no threshold for attention modules {missing}; give them or a 'default' entry")
        per.update({n: default for n in missing})
    else:
        per = dict.fromkeys(modules, thresholds)
    for name, val in per.items():
        mod = modules[name]
        heads = getattr(getattr(mod, "config", None), "num_attention_heads", None)
        if isinstance(val, torch.Tensor):
            val = val.detach().float()
            if val.dim() != 1 or (heads is not None and val.numel() != heads):
                raise ValueError(
                    f"thresholds for {name!r} must have shape ({heads},); got {tuple(val.shape)}"
                )
            if bool(((val <= 0) | (val > 1) | torch.isnan(val)).any()):
                raise ValueError(f"thresholds for {name!r} must be in (0, 1]; got {val.tolist()}")
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val <= 1:
            raise ValueError(f"threshold for {name!r} must be in (0, 1]; got {val!r}")
        cfg = dict(getattr(mod, _ATTR, {}))
        cfg["threshold"] = val
        if stride is not None:
            cfg["stride"] = stride
        if block_size is not None:
            cfg["block_size"] = block_size
        setattr(mod, _ATTR, cfg)


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
) -> torch.Tensor:
    """XAttention with ``torch.nn.functional.scaled_dot_product_attention``'s signature and layout.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim), heads_kv
    < heads_q only with ``enable_gqa`` (as SDPA). Returns (batch, heads_q, seqlen_q, head_dim).
    ``is_causal`` is SDPA's top-left aligned causal mask: with seqlen_q <= seqlen_k keys past seqlen_q are
    invisible and cropped; with seqlen_q > seqlen_k the queries from seqlen_k on see every key and run as a
    second, non-causal call. ``attn_mask`` may be the causal pattern or all-visible (see the module
    docstring); anything else, and ``dropout_p > 0``, raise ``NotImplementedError``.
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
    kw = dict(threshold=threshold, stride=stride, block_size=block_size, softmax_scale=scale)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attn_mask is not None:
        if attn_mask.dim() < 4:  # SDPA broadcasts (seqlen_q, seqlen_k) masks
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        causal, n = _resolve_mask(attn_mask, lq, lk, False, "xattention_sdpa", top_left=True)
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
