"""A small Llama-style decoder with Mixture-of-Experts MLPs, built from a config (no downloads).

What the composition functions (:mod:`longmoe.parallelize`), the examples and the tests run: RMSNorm,
rotary position embeddings from each token's *global* position (so a sequence shard computes exactly
what the full sequence would), grouped-query attention through a swappable core (:class:`CoreAttention`,
replaced by :class:`~longmoe.parallel.SequenceParallelAttention` under sequence parallelism), and
:class:`~longmoe.moe.MoELayer` MLPs (dense SwiGLU MLPs in the layers listed in ``dense_layers``).

    cfg = LlamaMoEConfig(vocab_size=256, hidden_size=128, layers=2, heads_q=4, heads_kv=2,
                         moe=dict(num_experts=4, top_k=2, ffn_hidden_size=256))
    model = LlamaMoE(cfg)
    logits, aux_loss = model(tokens)                       # tokens: (batch, seqlen) int64
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from longmoe.attention import XAttentionConfig, flash_attention
from longmoe.moe import MoEConfig, MoELayer
from longmoe.runtime.dtypes import accumulation_dtype

__all__ = ["LlamaMoEConfig", "LlamaMoE", "CoreAttention", "rotary"]


@dataclass(kw_only=True, slots=True)
class LlamaMoEConfig:
    """Shape of :class:`LlamaMoE`."""

    vocab_size: int = 256
    """Tokens (256: bytes)."""
    hidden_size: int = 128
    """Residual width; ``heads_q * head_dim``."""
    layers: int = 2
    """Decoder blocks."""
    heads_q: int = 4
    """Query heads."""
    heads_kv: int = 2
    """Key/value heads (GQA: ``heads_q % heads_kv == 0``)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    moe: dict = field(default_factory=lambda: dict(num_experts=4, top_k=2, ffn_hidden_size=256))
    """Keyword arguments of every MoE layer's :class:`~longmoe.moe.MoEConfig` (``hidden_size`` is this
    config's)."""
    dense_layers: tuple[int, ...] = ()
    """Blocks with a dense SwiGLU MLP (width ``moe["ffn_hidden_size"]``) instead of MoE."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "layers", "heads_q", "heads_kv"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LlamaMoEConfig.{name}={getattr(self, name)!r}: expected an int >= 1")
        if self.hidden_size % self.heads_q or (self.hidden_size // self.heads_q) % 2:
            raise ValueError(
                f"LlamaMoEConfig.hidden_size={self.hidden_size} must be heads_q={self.heads_q} times an even head_dim"
            )
        if self.heads_q % self.heads_kv:
            raise ValueError(
                f"LlamaMoEConfig.heads_q={self.heads_q} must be a multiple of heads_kv={self.heads_kv}"
            )
        bad = [i for i in self.dense_layers if not 0 <= i < self.layers]
        if bad:
            raise ValueError(
                f"LlamaMoEConfig.dense_layers={self.dense_layers}: {bad} not in [0, {self.layers})"
            )
        self.moe_config()  # validates the MoE fields

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_q

    def moe_config(self, **overrides) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, **{**self.moe, **overrides})


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x: (batch, seqlen, heads, head_dim); positions: (seqlen,) global token indices.
    Angles in fp32 (fp64 for fp64 x); returns x's dtype."""
    acc = accumulation_dtype(x.dtype)
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=acc, device=x.device) / d)
    ang = positions.to(acc)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CoreAttention(nn.Module):
    """Causal attention on the full local sequence: ``forward(q, k, v) -> out``, q (batch, seqlen,
    heads_q, head_dim), k/v (batch, seqlen, heads_kv, head_dim). The module sequence parallelism swaps out.
    ``sparse`` (a :class:`~longmoe.attention.XAttentionConfig`): XAttention block-sparse instead of dense."""

    def __init__(self, sparse: XAttentionConfig | None = None):
        super().__init__()
        if sparse is not None and not isinstance(sparse, XAttentionConfig):
            raise TypeError(f"sparse={sparse!r}: expected a longmoe.attention.XAttentionConfig or None")
        self.sparse = sparse

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sparse is not None:
            return self.sparse(q, k, v, causal=True)
        return flash_attention(q, k, v, causal=True)

    def extra_repr(self) -> str:
        return "" if self.sparse is None else f"sparse={self.sparse}"


class _Attention(nn.Module):
    def __init__(self, cfg: LlamaMoEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (cfg.heads_q + 2 * cfg.heads_kv) * d, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.core_attention = CoreAttention()

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """x (batch, seqlen, hidden), positions (seqlen,) -> q (batch, seqlen, heads_q, head_dim) and k, v
        (batch, seqlen, heads_kv, head_dim), RoPE applied to q and k."""
        b, s, _ = x.shape
        c, d = self.cfg, self.cfg.head_dim
        q, k, v = self.qkv(x).split([c.heads_q * d, c.heads_kv * d, c.heads_kv * d], dim=-1)
        q = rotary(q.view(b, s, c.heads_q, d), positions, c.rope_theta)
        k = rotary(k.view(b, s, c.heads_kv, d), positions, c.rope_theta)
        return q, k, v.view(b, s, c.heads_kv, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        out = self.core_attention(*self.project(x, positions))
        return self.proj(out.reshape(b, s, self.cfg.hidden_size))


class _DenseMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up), None


class _Block(nn.Module):
    def __init__(self, cfg: LlamaMoEConfig, index: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.hidden_size), nn.RMSNorm(cfg.hidden_size)
        self.attention = _Attention(cfg)
        if index in cfg.dense_layers:
            self.mlp = _DenseMLP(cfg.hidden_size, cfg.moe["ffn_hidden_size"])
        else:
            self.mlp = MoELayer(cfg.moe_config())

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        x = x + self.attention(self.norm1(x), positions)
        y, aux = self.mlp(self.norm2(x))
        return x + y, aux


class LlamaMoE(nn.Module):
    """The decoder. ``forward(tokens, positions=None) -> (logits, aux_loss, auxes)``.

    tokens: (batch, seqlen) int64, a whole sequence or this rank's shard of it; positions: (seqlen,) int64
    global token indices of those tokens (default ``arange(seqlen)``; a shard passes
    ``shard_positions(...)``). Returns logits (batch, seqlen, vocab_size) fp32 (fp64 for fp64), the sum of the MoE layers'
    auxiliary losses (a () tensor, 0 when none is configured) and the per-layer :class:`~longmoe.moe.MoEAux`
    list (routing statistics).
    """

    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config, i) for i in range(config.layers))
        self.norm = nn.RMSNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seqlen); got shape {tuple(tokens.shape)}")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if positions.shape != (tokens.shape[1],):
            raise ValueError(
                f"positions must be (seqlen,) = ({tokens.shape[1]},); got {tuple(positions.shape)}"
            )
        x = self.embed(tokens)
        aux_loss, auxes = x.new_zeros(()), []
        for block in self.blocks:
            x, aux = block(x, positions)
            if aux is not None:
                aux_loss = aux_loss + aux.loss
                auxes.append(aux)
        logits = self.head(self.norm(x))
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), aux_loss, auxes

    def moe_layers(self) -> dict[str, MoELayer]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MoELayer)}
