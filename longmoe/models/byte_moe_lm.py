"""A small byte-level MoE causal LM: Mixtral's architecture on longmoe's modules.

    from longmoe.models.byte_moe_lm import ByteMoEConfig, ByteMoELM, load_or_train, export_hf

    model, record = load_or_train()          # trains (fixed step count) and caches under .cache/byte_moe_lm/
    logits = model(tokens)                   # tokens (batch, seqlen) int64 bytes -> (batch, seqlen, 256) fp32
    export_hf(model, "out/")                 # Hugging Face MixtralForCausalLM directory (config + safetensors)

Architecture (exactly Mixtral's, so :func:`export_hf` gives a ``MixtralForCausalLM`` with the same logits):
byte embedding (256), ``layers`` pre-norm blocks of RMSNorm -> GQA self-attention with rotate-half RoPE ->
RMSNorm -> :class:`longmoe.moe.MoELayer` (softmax top-k router, renormalised top-k, SwiGLU experts), a final
RMSNorm and an untied output head. Attention is ``longmoe.attention.flash_attention(q, k, v, causal=True)``
(C++ kernels on CPU). Head pruning (:meth:`ByteMoELM.prune_kv_groups`) removes whole KV groups, the unit
SlimMoE prunes attention in.

Training data is :func:`longmoe.data.stdlib_split` (the standard library's ``.py`` files, every 20th file held
out). Training runs a fixed number of steps (not a wall-clock budget), so the model does not depend on how
loaded the machine is; with the default config it takes ~10 min on a contended 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longmoe.attention import flash_attention
from longmoe.data import stdlib_split, windows
from longmoe.moe import MoEConfig, MoELayer
from longmoe.moe.slimming import parameter_counts

__all__ = [
    "ByteMoEConfig",
    "ByteMoELM",
    "CACHE",
    "train",
    "load_or_train",
    "save",
    "load",
    "export_hf",
    "hf_config",
    "lm_loss",
    "held_out_bits_per_byte",
    "parameter_counts",
]

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "byte_moe_lm"
"""Where the trained teacher is cached (git-ignored ``.cache/`` at the repository root)."""


@dataclass(kw_only=True, slots=True)
class ByteMoEConfig:
    """Shape of :class:`ByteMoELM` (defaults: the slimming teacher)."""

    d_model: int = 128
    """Residual width H."""
    layers: int = 4
    """Transformer blocks."""
    heads_q: int = 4
    """Query heads."""
    heads_kv: int = 2
    """Key/value heads (GQA groups); ``heads_q % heads_kv == 0``."""
    head_dim: int = 32
    """Per-head width (even, for RoPE)."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts per token."""
    ffn: int = 256
    """Intermediate width of each SwiGLU expert."""
    expert_ffn_hidden_sizes: tuple[tuple[int, ...], ...] | None = None
    """Per-layer, per-expert widths after heterogeneous slimming (``None``: every expert has ``ffn``)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    context: int = 256
    """Training sequence length (also Mixtral's ``max_position_embeddings`` on export)."""
    vocab: int = 256
    """Bytes."""
    aux_loss_coeff: float = 0.01
    """Load-balancing loss weight during training (Mixtral's ``router_aux_loss_coef``)."""

    def __post_init__(self):
        for name in ("d_model", "layers", "heads_q", "heads_kv", "head_dim", "num_experts", "top_k", "ffn",
                     "context", "vocab"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ByteMoEConfig.{name}={v!r}: expected an int >= 1")
        if self.heads_q % self.heads_kv:
            raise ValueError(
                f"ByteMoEConfig.heads_q={self.heads_q} is not a multiple of heads_kv={self.heads_kv}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ByteMoEConfig.head_dim={self.head_dim}: expected an even number (RoPE)")
        if self.top_k > self.num_experts:
            raise ValueError(f"ByteMoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.expert_ffn_hidden_sizes is not None:
            sizes = tuple(tuple(int(w) for w in layer) for layer in self.expert_ffn_hidden_sizes)
            if len(sizes) != self.layers or any(len(s) != self.num_experts for s in sizes):
                raise ValueError(
                    f"ByteMoEConfig.expert_ffn_hidden_sizes: expected {self.layers} layers x "
                    f"{self.num_experts} widths, got {[len(s) for s in sizes]}"
                )
            self.expert_ffn_hidden_sizes = sizes

    def moe_config(self, layer: int) -> MoEConfig:
        """The :class:`MoEConfig` of block ``layer``'s MoE layer."""
        widths = None
        if self.expert_ffn_hidden_sizes is not None:
            widths = self.expert_ffn_hidden_sizes[layer]
            if all(w == self.ffn for w in widths):
                widths = None
        return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=self.ffn, num_experts=self.num_experts,
                         top_k=self.top_k, aux_loss_coeff=self.aux_loss_coeff, expert_ffn_hidden_sizes=widths)  # fmt: skip


def rope_cos_sin(seqlen: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seqlen, 1, head_dim) fp32 for rotate-half RoPE (Hugging Face's ``default`` rope: inverse
    frequencies and angles in fp32)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    )
    ang = torch.arange(seqlen, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seqlen, heads, head_dim) rotated by position (fp32 math, returned in x's dtype)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention: ``q_proj (heads_q*D, H)``, ``k_proj``/``v_proj (heads_kv*D, H)``,
    ``o_proj (H, heads_q*D)``, no biases (Mixtral's names and layout)."""

    def __init__(self, cfg: ByteMoEConfig):
        super().__init__()
        self.heads_q, self.heads_kv, self.head_dim = cfg.heads_q, cfg.heads_kv, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.heads_q * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.heads_kv * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.heads_kv * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads_q * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (batch, seqlen, H) -> (batch, seqlen, H)."""
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.heads_q, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.heads_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.heads_kv, self.head_dim)
        out = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
        return self.o_proj(out.reshape(b, s, -1))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + moe(norm(x))``."""

    def __init__(self, cfg: ByteMoEConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MoELayer(cfg.moe_config(layer))

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux.loss


class ByteMoELM(nn.Module):
    """tokens (batch, seqlen) int64 in [0, 256) -> logits (batch, seqlen, 256) fp32.

    After a forward, :attr:`aux_loss` holds the summed load-balancing losses of the MoE layers (a () tensor
    to add to the training loss).
    """

    def __init__(self, cfg: ByteMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.aux_loss: torch.Tensor | None = None
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = math.sqrt(2 * cfg.layers) if name.endswith(("o_proj.weight", "linear_fc2")) else 1.0
                nn.init.normal_(p, std=std / scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.int64 or tokens.dim() != 2:
            raise ValueError(
                f"tokens: expected (batch, seqlen) int64, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        cos, sin = rope_cos_sin(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        x = self.embed_tokens(tokens)
        aux = x.new_zeros(())
        for blk in self.layers:
            x, a = blk(x, cos, sin)
            aux = aux + a
        self.aux_loss = aux
        return self.lm_head(self.norm(x)).float()

    def sync_config(self) -> ByteMoEConfig:
        """Refresh :attr:`cfg` from the modules after pruning (expert widths and count, KV groups); returns it."""
        widths = tuple(tuple(blk.mlp.config.expert_widths) for blk in self.layers)
        ffn = max(max(w) for w in widths)
        uniform = all(x == ffn for w in widths for x in w)
        heads_kv = {blk.self_attn.heads_kv for blk in self.layers}
        heads_q = {blk.self_attn.heads_q for blk in self.layers}
        if len(heads_kv) != 1 or len(heads_q) != 1:
            raise ValueError(f"layers have different head counts (heads_q {heads_q}, heads_kv {heads_kv})")
        experts = {(blk.mlp.config.num_experts, blk.mlp.config.top_k) for blk in self.layers}
        if len(experts) != 1:
            raise ValueError(f"layers have different (num_experts, top_k): {sorted(experts)}")
        num_experts, top_k = experts.pop()
        self.cfg = dataclasses.replace(self.cfg, ffn=ffn, expert_ffn_hidden_sizes=None if uniform else widths,
                                       heads_q=heads_q.pop(), heads_kv=heads_kv.pop(), num_experts=num_experts,
                                       top_k=top_k)  # fmt: skip
        return self.cfg

    @torch.no_grad()
    def prune_kv_groups(self, keep_groups: dict[int, list[int]] | int, scores: torch.Tensor | None = None):
        """Remove whole GQA groups (a KV head and its ``heads_q / heads_kv`` query heads) from every layer.

        keep_groups: an int (keep that many groups in every layer, chosen by ``scores``, a
        (layers, heads_kv) tensor, highest kept; by the L2 norm of the group's o_proj columns when None), or
        ``{layer: [kv group indices to keep]}`` for every layer. Every layer must keep the same count.
        """
        cfg, g = self.cfg, self.cfg.heads_q // self.cfg.heads_kv
        if isinstance(keep_groups, int):
            if not 1 <= keep_groups <= cfg.heads_kv:
                raise ValueError(
                    f"keep_groups={keep_groups}: expected an int in [1, heads_kv={cfg.heads_kv}]"
                )
            if scores is None:
                scores = torch.stack([
                    blk.self_attn.o_proj.weight.view(cfg.d_model, cfg.heads_kv, g * cfg.head_dim).norm(dim=(0, 2))
                    for blk in self.layers
                ])  # fmt: skip
            if tuple(scores.shape) != (cfg.layers, cfg.heads_kv):
                raise ValueError(
                    f"scores shape {tuple(scores.shape)}: expected ({cfg.layers}, {cfg.heads_kv})"
                )
            keep_groups = {
                i: sorted(torch.sort(scores[i], descending=True, stable=True).indices[:keep_groups].tolist())
                for i in range(cfg.layers)
            }
        if sorted(keep_groups) != list(range(cfg.layers)) or len({len(v) for v in keep_groups.values()}) != 1:
            raise ValueError(
                f"keep_groups={keep_groups}: expected the same number of groups for every layer 0..{cfg.layers - 1}"
            )
        d = cfg.head_dim
        for i, blk in enumerate(self.layers):
            kv = torch.tensor(keep_groups[i], dtype=torch.int64)
            q_heads = (kv[:, None] * g + torch.arange(g)[None]).reshape(-1)
            q_rows = (q_heads[:, None] * d + torch.arange(d)[None]).reshape(-1)
            kv_rows = (kv[:, None] * d + torch.arange(d)[None]).reshape(-1)
            att = blk.self_attn
            att.q_proj.weight = nn.Parameter(att.q_proj.weight[q_rows].clone())
            att.k_proj.weight = nn.Parameter(att.k_proj.weight[kv_rows].clone())
            att.v_proj.weight = nn.Parameter(att.v_proj.weight[kv_rows].clone())
            att.o_proj.weight = nn.Parameter(att.o_proj.weight[:, q_rows].clone())
            att.heads_kv, att.heads_q = len(kv), len(kv) * g
            att.q_proj.out_features = att.o_proj.in_features = len(kv) * g * d
            att.k_proj.out_features = att.v_proj.out_features = len(kv) * d
        self.sync_config()
        return self


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats). logits (batch, seqlen, V); targets (batch, seqlen) int64."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def held_out_bits_per_byte(
    model: nn.Module, *, windows_count: int = 16, seqlen: int = 256, seed: int = 1
) -> float:
    """Mean next-byte cross-entropy in bits on ``windows_count`` fixed random windows of the held-out files
    (the same windows for every model and run: generator seeded with ``seed``)."""
    _, held, _ = stdlib_split()
    batch = windows(held, seqlen, windows_count, torch.Generator().manual_seed(seed))
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, windows_count, 8):
        chunk = batch[i : i + 8]
        out = model(chunk[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        total += float(lm_loss(logits.float(), chunk[:, 1:])) * len(chunk)
    model.train(was)
    return total / windows_count / math.log(2)


def train(cfg: ByteMoEConfig | None = None, *, steps: int = 300, batch: int = 8, lr: float = 3e-3,
          seed: int = 0, out: Path | None = CACHE, quiet: bool = False) -> tuple[ByteMoELM, dict]:  # fmt: skip
    """Train for exactly ``steps`` AdamW steps (betas 0.9/0.95, weight decay 0.1 on matrices, 20-step warmup,
    cosine to 10%, clip 1.0) on ``batch`` random ``cfg.context``-byte windows of the training stream per step,
    fp32. Saves ``out/model.safetensors`` + ``out/config.json`` + ``out/record.json`` unless ``out`` is None."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = cfg if cfg is not None else ByteMoEConfig()
    torch.manual_seed(seed)
    train_data, _, info = stdlib_split()
    model = ByteMoELM(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    t0, ema = time.perf_counter(), None
    cols = (TextColumn("[bold]teacher[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("loss {task.fields[loss]} bits/byte"))  # fmt: skip
    with Progress(*cols, disable=quiet) as progress:
        task = progress.add_task("train", total=steps, loss="-")
        for step in range(steps):
            warm = min(1.0, (step + 1) / 20)
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            chunk = windows(train_data, cfg.context, batch, g)
            logits = model(chunk[:, :-1])
            loss = lm_loss(logits, chunk[:, 1:])
            opt.zero_grad(set_to_none=True)
            (loss + model.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bits = loss.item() / math.log(2)
            ema = bits if ema is None else 0.95 * ema + 0.05 * bits
            progress.update(task, advance=1, loss=f"{ema:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    record = dict(steps=steps, batch=batch, lr=lr, seed=seed, tokens=steps * batch * cfg.context, seconds=seconds,
                  threads=torch.get_num_threads(), held_out_bpb=held_out_bits_per_byte(model), **info)  # fmt: skip
    if out is not None:
        save(model, out, record)
    return model, record


def save(model: ByteMoELM, out: Path, record: dict | None = None) -> None:
    """``out/model.safetensors`` (state dict), ``out/config.json`` (the :class:`ByteMoEConfig`), and
    ``out/record.json`` when given."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.sync_config()
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
    )
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=1))
    if record is not None:
        (out / "record.json").write_text(json.dumps(record, indent=1))


def load(path: Path) -> tuple[ByteMoELM, dict]:
    """The model saved by :func:`save` under ``path`` (eval mode) and its record (``{}`` if none)."""
    from safetensors.torch import load_file

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("expert_ffn_hidden_sizes") is not None:
        raw["expert_ffn_hidden_sizes"] = tuple(tuple(w) for w in raw["expert_ffn_hidden_sizes"])
    model = ByteMoELM(ByteMoEConfig(**raw))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    rec = path / "record.json"
    return model.eval(), (json.loads(rec.read_text()) if rec.exists() else {})


def load_or_train(path: Path = CACHE, **train_kw) -> tuple[ByteMoELM, dict]:
    """The cached teacher under ``path``, training it first (:func:`train`, fixed steps) when missing."""
    if not (Path(path) / "model.safetensors").exists():
        print(f"{path} has no model: training the byte-level MoE teacher first")
        train(out=Path(path), **train_kw)
    return load(path)


def hf_config(cfg: ByteMoEConfig):
    """The ``transformers.MixtralConfig`` of a model with uniform expert widths."""
    import transformers

    if cfg.expert_ffn_hidden_sizes is not None:
        raise ValueError(
            "ByteMoEConfig.expert_ffn_hidden_sizes is set: Mixtral has one intermediate_size for every expert; "
            "expected uniform widths for a Hugging Face export"
        )
    return transformers.MixtralConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads_q, num_key_value_heads=cfg.heads_kv, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coeff,
        router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0,
    )  # fmt: skip


def hf_state_dict(model: ByteMoELM) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``MixtralForCausalLM``'s state-dict keys."""
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}  # fmt: skip
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = blk.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = blk.post_attention_layernorm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(blk.self_attn, n).weight
        sd[p + "mlp.gate.weight"] = blk.mlp.router.weight
        sd[p + "mlp.experts.gate_up_proj"] = blk.mlp.experts.linear_fc1
        sd[p + "mlp.experts.down_proj"] = blk.mlp.experts.linear_fc2
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf(model: ByteMoELM):
    """A ``transformers.MixtralForCausalLM`` (eval, eager experts) with ``model``'s weights."""
    import transformers

    model.sync_config()
    cfg = hf_config(model.cfg)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf


def export_hf(model: ByteMoELM, out: Path) -> Path:
    """Save ``model`` as a Hugging Face Mixtral directory (``config.json`` + ``model.safetensors``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads."""
    to_hf(model).save_pretrained(str(out))
    return Path(out)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=CACHE)
    args = ap.parse_args()
    model, record = train(steps=args.steps, batch=args.batch, lr=args.lr, out=args.out)
    export_hf(model, args.out / "hf")
    print(f"trained {record['steps']} steps in {record['seconds'] / 60:.1f} min; held-out "
          f"{record['held_out_bpb']:.3f} bits/byte; saved {args.out} and the HF Mixtral export {args.out / 'hf'}")  # fmt: skip


if __name__ == "__main__":
    main()
