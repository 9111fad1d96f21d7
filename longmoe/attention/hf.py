"""Drop-ins: Hugging Face ``attn_implementation="longmoe_xattention"`` / ``"longmoe_dense"``. (The
SDPA-shaped ``xattention_sdpa``, which is not Hugging Face code, lives in :mod:`longmoe.attention.xattention`.)

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

from longmoe.attention._masks import resolve_mask
from longmoe.attention.flash_attention import flash_attention
from longmoe.attention.xattention import HEAD_SELECTIONS, SELECTIONS, _check_positive_finite, xattention

__all__ = [
    "HF_ATTENTION_NAMES",
    "register_hf_attention",
    "set_xattention_thresholds",
    "hf_xattention_forward",
    "hf_flash_attention_forward",
]

HF_ATTENTION_NAMES: tuple[str, ...] = ("longmoe_xattention", "longmoe_dense")
# module attribute: {"threshold", "stride", "block_size", "selection", "head_selection", "sharpness"}
_ATTR = "longmoe_xattention"
_DEFAULTS = {
    "threshold": 0.9,
    "stride": 8,
    "block_size": 128,
    "selection": "paper",
    "head_selection": "group",
    "sharpness": 1.0,
}


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
    causal, n = resolve_mask(attention_mask, lq, lk, is_causal and lq > 1, who)
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
    # softmax_scale: the model's `scaling`, used by the estimate as well as the attention.
    out = xattention(q, k, v, threshold=thr, stride=cfg["stride"], block_size=cfg["block_size"],
                     causal=causal, softmax_scale=scaling, selection=cfg["selection"],
                     head_selection=cfg["head_selection"], sharpness=cfg["sharpness"])  # fmt: skip
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
    selection: str | None = None,
    head_selection: str | None = None,
    sharpness: float | None = None,
) -> None:
    """Set XAttention thresholds (and optionally stride, block size, selection rule ``"paper"`` / ``"ranked"``,
    GQA ``head_selection`` ``"group"`` / ``"head"`` and the estimate's ``sharpness``, see
    :func:`~longmoe.attention.xattention_estimate_ref`) on every attention module of ``model``.

    thresholds: one float or (heads_q,) tensor for every layer, or a dict keyed by attention-module name
    (``"model.layers.0.self_attn"``, as :func:`~longmoe.attention.xattention_calibrate.load_thresholds`
    returns), by layer index (int), or ``"default"`` for the layers not named. Values are in (0, 1].
    """
    if selection is not None and selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    if head_selection is not None and head_selection not in HEAD_SELECTIONS:
        raise ValueError(f"head_selection must be one of {HEAD_SELECTIONS}; got {head_selection!r}")
    if sharpness is not None:
        _check_positive_finite(sharpness, "sharpness")
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
        if selection is not None:
            cfg["selection"] = selection
        if head_selection is not None:
            cfg["head_selection"] = head_selection
        if sharpness is not None:
            cfg["sharpness"] = float(sharpness)
        setattr(mod, _ATTR, cfg)
