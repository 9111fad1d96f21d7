"""Per-token loop reference of MoELayer: the oracle the layer tests compare against.

Each token is routed and sent through its experts one at a time, straight from the formulas (no permute, no
grouped GEMM, no capacity), with autograd, so it yields the output and every gradient. Run in fp64 it is
the oracle; run in the test dtype it is the same-dtype baseline of the tolerance rule (tests/oracle.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longmoe.moe import MoEConfig


def clone_params(layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's (unsharded) parameters as fresh leaf tensors of ``dtype`` that require grad."""
    return {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in layer.named_parameters()}


def _mlp(x, fc1, fc2, activation, width, ffn):
    """One expert on one token. x: (H,); fc1: (fc1_rows, H); fc2: (H, ffn)."""
    if activation == "swiglu":
        gate = fc1[:width] @ x
        up = fc1[ffn : ffn + width] @ x
        a = F.silu(gate) * up
    else:
        a = F.gelu(fc1[:width] @ x)
    return fc2[:, :width] @ a


def moe_loop_reference(
    cfg: MoEConfig, params: dict[str, torch.Tensor], x: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE forward, one token at a time; dropless unless ``keep`` says which slots survive capacity.

    cfg: the layer's config; params: :func:`clone_params` output; x: (num_tokens, hidden) in the params' dtype;
    keep: None or (num_tokens, top_k) bool, slot ``j`` of token ``t`` in top-k order (score descending): a
    dropped slot adds nothing and the kept weights are not renormalised (capacity drops, as the router's).
    Returns ``(out (num_tokens, hidden), expert_ids (num_tokens, top_k))``.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32  # router scores in fp32 (fp64 oracle)
    w_router = params["router.weight"]
    fc1, fc2 = params["experts.linear_fc1"], params["experts.linear_fc2"]
    widths = cfg.expert_widths
    outs, chosen = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        logits = w_router.to(ct) @ xt.to(ct)
        scores = torch.softmax(logits, 0) if cfg.score_function == "softmax" else torch.sigmoid(logits)
        top, ids = torch.topk(scores, cfg.top_k)
        if cfg.normalize_topk:
            top = top / top.sum()
        acc = torch.zeros(x.shape[1], dtype=ct)
        for j in range(cfg.top_k):
            if keep is not None and not bool(keep[t, j]):
                continue
            e = int(ids[j])
            y = _mlp(xt, fc1[e], fc2[e], cfg.activation, widths[e], cfg.ffn_hidden_size)
            acc = acc + top[j] * y.to(ct)
        out = acc.to(x.dtype)
        if cfg.shared_expert_ffn_hidden_size is not None:
            f = cfg.shared_expert_ffn_hidden_size
            s = _mlp(
                xt,
                params["shared_expert.linear_fc1.weight"],
                params["shared_expert.linear_fc2.weight"],
                cfg.activation,
                f,
                f,
            )
            if cfg.shared_expert_gate:
                s = torch.sigmoid(params["shared_expert_gate.weight"][0] @ xt) * s
            out = out + s
        outs.append(out)
        chosen.append(ids)
    return torch.stack(outs), torch.stack(chosen)


def dense_mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, activation: str) -> torch.Tensor:
    """A dense MLP over all rows. x: (n, H); fc1: (fc1_rows, H); fc2: (H, ffn)."""
    h = x @ fc1.t()
    if activation == "swiglu":
        ffn = fc2.shape[1]
        h = F.silu(h[:, :ffn]) * h[:, ffn:]
    else:
        h = F.gelu(h)
    return h @ fc2.t()
