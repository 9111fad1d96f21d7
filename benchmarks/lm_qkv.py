"""Q, K, V with real attention structure: a small byte-level causal LM trained here on Python source.

    python benchmarks/lm_qkv.py                  # train 800 steps (~6 min on an idle 2-core CPU), save, report
    python benchmarks/lm_qkv.py --steps 200      # shorter run
    python benchmarks/lm_qkv.py --capture 32768  # load (or train) and capture q/k/v at 32K held-out bytes
    python benchmarks/lm_qkv.py --stages 4096:900 8192:300 --needle-prob 0.5
        # the checkpoint behind the README's XAttention figures (34 min on a 2-core AMX Xeon, bf16)

Model: Llama-style, byte vocabulary (256), RMSNorm, RoPE (theta 500000, so positions past the training
context stay in the slowly rotating range), SwiGLU MLP, no biases; attention is
``longmoe.attention.flash_attention(q, k, v, causal=True)`` with head_dim 128 (what the XAttention
benchmark uses). Data: the Python standard library's own ``.py`` sources (``Path(os.__file__).parent``,
recursively, ``site-packages`` excluded), read in sorted relative-path order, each file preceded by a
``# file: <path>`` line. Every 20th file of that order (index % 20 == 0) is held out: it is never trained
on, the reported held-out loss is measured on it, and :func:`lm_qkv` captures q/k/v on it. No model or
data is downloaded. The checkpoint, its config and its training record go to ``.cache/lm_qkv/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longmoe.attention import flash_attention
from longmoe.data import held_out_tokens, stdlib_split, windows

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "lm_qkv"
ALNUM = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
"""The needles' alphabet: letters and digits."""


@dataclass(kw_only=True, slots=True)
class LMConfig:
    """Shape of the byte-level LM."""

    d_model: int = 256
    """Residual width; ``heads * head_dim`` must equal it."""
    heads: int = 2
    """Attention heads (no GQA: every head has its own K/V)."""
    head_dim: int = 128
    """Per-head width; 128 because the XAttention benchmark runs at D=128."""
    layers: int = 4
    """Transformer blocks."""
    ffn: int = 704
    """SwiGLU hidden width (8/3 * d_model rounded up to a multiple of 64, as Llama does)."""
    rope_theta: float = 500000.0
    """RoPE base; a large base keeps positions past the training context (up to 32K) in range."""
    context: int = 4096
    """Training sequence length."""
    vocab: int = 256
    """Bytes."""

    def __post_init__(self):
        if self.heads * self.head_dim != self.d_model:
            raise ValueError(
                f"heads={self.heads} * head_dim={self.head_dim} must equal d_model={self.d_model}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
def rope_cos_sin(seqlen: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seqlen, 1, head_dim) fp32 for rotate-half RoPE; angles in fp64 so 32K positions stay exact."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seqlen, heads, head_dim) rotated by position; computed in fp32, returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention through ``longmoe.attention.flash_attention``.

    When ``capture`` is a list, each forward appends its post-RoPE ``(q, k, v)``, each
    (batch, seqlen, heads, head_dim) fp32, exactly the tensors attention was computed from (up to the cast
    to fp32). When ``attn_fn`` is set, it replaces the dense causal attention: ``attn_fn(q, k, v) -> out``,
    all (batch, seqlen, heads, head_dim) (the XAttention quality benchmark plugs block-sparse prefill in here).
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.d_model, bias=False)
        self.capture: list | None = None
        self.attn_fn = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.contiguous() for t in (q, k, v))
        if self.capture is not None:
            self.capture.append(tuple(t.detach().float() for t in (q, k, v)))
        out = flash_attention(q, k, v, causal=True) if self.attn_fn is None else self.attn_fn(q, k, v)
        return self.wo(out.reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=1e-6), nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg)
        self.w_gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn, bias=False)
        self.w_down = nn.Linear(cfg.ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class ByteLM(nn.Module):
    """tokens (batch, seqlen) int64 -> logits (batch, seqlen, 256) fp32."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2/Llama init: 0.02, residual-output projections scaled down by sqrt(2 * layers)
                std = (
                    0.02 / math.sqrt(2 * cfg.layers)
                    if name.endswith(("wo.weight", "w_down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def rope(self, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seqlen not in self._rope:
            self._rope[seqlen] = rope_cos_sin(seqlen, self.cfg.head_dim, self.cfg.rope_theta)
        return tuple(t.to(device) for t in self._rope[seqlen])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x)).float()


def bits_per_byte(model: ByteLM, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Mean next-byte cross-entropy in bits over batch (n, seqlen + 1) int64."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        total = 0.0
        for row in batch:
            logits = model(row[None, :-1])
            total += F.cross_entropy(logits[0], row[1:]).item()
    return total / len(batch) / math.log(2)


# ----------------------------------------------------------------------------------------------------
# needles: random key-value lines planted in text and recalled later
# ----------------------------------------------------------------------------------------------------
def needle_lines(g: torch.Generator) -> tuple[bytes, bytes, bytes]:
    """(plant, cue, needle) for one random assignment: ``plant = b'\\n<name> = "<needle>"\\n'``, ``cue =
    b'\\n<name> = "'``; name: 6 random lowercase letters; needle: 16-32 random letters and digits."""
    name = bytes(97 + int(x) for x in torch.randint(0, 26, (6,), generator=g))
    n = int(torch.randint(16, 33, (1,), generator=g))
    needle = bytes(ALNUM[int(x)] for x in torch.randint(0, len(ALNUM), (n,), generator=g))
    return b"\n" + name + b' = "' + needle + b'"\n', b"\n" + name + b' = "', needle


def plant_needles(window: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """Training text with ``count`` needles: window (seqlen + 1,) int64 of text -> the same shape, where each
    needle's line is inserted at a random point of the first half and recalled (cue, needle, closing quote)
    at a random later point; text past seqlen + 1 bytes is cut. A synthetic retrieval task mixed into
    training, as long-context training mixes do. (At 4 layers x 2 heads it did not teach the model to copy:
    1,400 steps with needles in every window still copied 0/20; see the README's XAttention figures.)"""
    n = window.numel()
    text = bytes(window.tolist())
    inserts = []  # (position in the original text, bytes): all chosen first, so no line lands inside another
    for _ in range(count):
        plant, cue, needle = needle_lines(g)
        at = int(torch.randint(0, n // 2, (1,), generator=g))
        # recalls end 3 lines (<= 48 bytes each) before the window's end, so most survive the cut
        recall = int(torch.randint(at + 1, max(at + 2, n - 3 * 48), (1,), generator=g))
        inserts += [(at, plant), (recall, cue + needle + b'"\n')]
    for at, line in sorted(inserts, key=lambda x: x[0], reverse=True):
        text = text[:at] + line + text[at:]
    return torch.tensor(list(text[:n]), dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
def train(
    cfg: LMConfig,
    *,
    steps: int = 800,
    batch: int = 1,
    lr: float = 2e-3,
    dtype: str = "bfloat16",
    seed: int = 0,
    out: Path = CACHE,
    quiet: bool = False,
    needle_prob: float = 0.0,
    stages: list[tuple[int, int]] | None = None,
    init: Path | None = None,
) -> dict:
    """Train for ``steps`` optimizer steps; save ``out/model.pt``; return the training record.

    ``needle_prob``: the probability that a training window gets 1-3 planted needles (:func:`plant_needles`,
    from their own random stream, so the windows drawn are the same whatever the probability).
    ``stages``: ``[(context, steps), ...]`` trains the first ``steps`` steps at the first context and so on
    (short then long, as long-context training does); the steps must sum to ``steps`` and the last context
    must be ``cfg.context``. None: every step at ``cfg.context``.
    ``init``: a checkpoint to continue from (its weights; the optimizer and schedule start afresh); its
    training record is kept under ``record["init"]``.

    A fixed step count (not a wall-time budget) makes the run reproducible: the same seed, steps and batch
    see the same windows in the same order and give the same schedule on any machine, however loaded.
    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), 20-step warmup then cosine decay to 10% over the
    steps, gradient clipping at 1.0. ``dtype="bfloat16"`` (default) runs the forward under CPU autocast: 9.2K vs
    3.3K bytes/s for fp32 on a 2-core CPU with AVX512-BF16 matmuls and attention (after one minute each
    held-out 3.47 vs 3.50 bits/byte). On a CPU without native bf16 (AVX2 only) bf16 is emulated and far
    slower: use ``dtype="float32"`` there (measured 77 s vs 10 s per 4096-byte step on a contended AVX2 VM).
    Batch 1 x 4096 bytes: ~0.45 s per step on the AVX512-BF16 machine.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not 0.0 <= needle_prob <= 1.0:
        raise ValueError(f"needle_prob must be in [0, 1]; got {needle_prob!r}")
    stages = [(cfg.context, steps)] if stages is None else [(int(c), int(n)) for c, n in stages]
    if sum(n for _, n in stages) != steps or stages[-1][0] != cfg.context or min(min(s) for s in stages) < 1:
        raise ValueError(
            f"stages={stages} must be positive (context, steps) pairs whose steps sum to steps={steps} and whose "
            f"last context is cfg.context={cfg.context}"
        )
    context_at = [c for c, n in stages for _ in range(n)]
    torch.manual_seed(seed)
    train_data, held_data, data_info = stdlib_split()
    model = ByteLM(cfg)
    init_record = None
    if init is not None:
        ckpt = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        init_record = {"path": str(init), **ckpt["record"]}
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    amp = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    gn = torch.Generator().manual_seed(seed + 1000)  # the needles' own stream
    steps_done, tokens, ema, t0 = 0, 0, None, time.perf_counter()
    columns = (TextColumn("[bold]training[/] step {task.fields[step]}"), BarColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("loss {task.fields[loss]} bits/byte, {task.fields[tps]} tok/s"))  # fmt: skip
    with Progress(*columns, disable=quiet) as progress:
        task = progress.add_task("train", total=steps, step=0, loss="-", tps="-")
        for _ in range(steps):
            frac = steps_done / steps
            warm = min(1.0, (steps_done + 1) / 20)
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            chunk = windows(train_data, context_at[steps_done], batch, g)
            if needle_prob > 0:
                rows = []
                for row in chunk:
                    planted = float(torch.rand((), generator=gn)) < needle_prob
                    count = int(torch.randint(1, 4, (1,), generator=gn))
                    rows.append(plant_needles(row, count, gn) if planted else row)
                chunk = torch.stack(rows)
            with torch.autocast("cpu", dtype=amp, enabled=amp != torch.float32):
                logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps_done, tokens = steps_done + 1, tokens + chunk[:, 1:].numel()
            bits = loss.item() / math.log(2)
            ema = bits if ema is None else 0.9 * ema + 0.1 * bits
            now = time.perf_counter() - t0
            if not quiet and not progress.console.is_terminal and steps_done % 50 == 0:
                print(f"step {steps_done}/{steps}: loss {ema:.3f} bits/byte, {now:.0f} s", flush=True)
            progress.update(task, completed=steps_done, step=steps_done, loss=f"{ema:.2f}",
                            tps=f"{tokens / now:.0f}")  # fmt: skip
    seconds = time.perf_counter() - t0
    model.eval()
    ge = torch.Generator().manual_seed(seed + 1)  # the same evaluation windows for every run
    train_bpb = bits_per_byte(model, windows(train_data, cfg.context, 8, ge))
    held_bpb = bits_per_byte(model, windows(held_data, cfg.context, 8, ge))
    record = dict(steps=steps, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, batch=batch,
                  lr=lr, dtype=dtype, seed=seed, needle_prob=needle_prob, stages=stages, init=init_record, threads=torch.get_num_threads(), train_bpb=train_bpb,
                  held_out_bpb=held_bpb, eval=f"8 random {cfg.context}-byte windows of each stream", **data_info)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(cfg), "state_dict": model.state_dict(), "record": record},
               out / "model.pt")  # fmt: skip
    return record


def load(path: Path = CACHE / "model.pt", *, train_steps: int = 800) -> tuple[ByteLM, dict]:
    """The trained model (eval mode) and its training record; trains with the defaults first if missing."""
    if not path.exists():
        print(f"{path} not found: training the byte-level LM for {train_steps} steps first")
        train(LMConfig(), steps=train_steps, out=path.parent)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = ByteLM(LMConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), {"config": ckpt["config"], **ckpt["record"]}


def describe(record: dict) -> str:
    """One paragraph on the model, data and training behind a checkpoint, for benchmark output."""
    c = record["config"]
    return (
        f"byte-level Llama-style LM ({c['layers']} layers, d_model {c['d_model']}, {c['heads']} heads x "
        f"{c['head_dim']}, SwiGLU {c['ffn']}, RoPE theta {c['rope_theta']:g}) trained here for "
        f"{record['seconds'] / 60:.1f} min ({record['steps']} steps, {record['tokens'] / 1e6:.2f}M bytes at "
        f"context {_stages_text(record, c)}, {record['dtype']}) on the Python standard library's .py sources "
        f"({record['train_files']} files, {record['train_bytes'] / 1e6:.1f} MB); held out: {record['held_out_files']} "
        f"files ({record['holdout_rule']}); train {record['train_bpb']:.2f} / held-out "
        f"{record['held_out_bpb']:.2f} bits/byte"
        + (
            f"; {record['needle_prob']:.0%} of the training windows had 1-3 planted needles (a synthetic "
            f"retrieval task)"
            if record.get("needle_prob")
            else ""
        )
        + (
            f"; this run continued from a checkpoint trained for {record['init']['steps']} steps "
            f"({record['init']['seconds'] / 60:.1f} min, {record['init'].get('needle_prob', 0):.0%} needle windows, "
            f"held-out {record['init']['held_out_bpb']:.2f} bits/byte)"
            if record.get("init")
            else ""
        )
    )


def _stages_text(record: dict, config: dict) -> str:
    stages = record.get("stages") or [(config["context"], record["steps"])]
    if len(stages) == 1:
        return str(stages[0][0])
    return " then ".join(f"{c} ({n} steps)" for c, n in stages)


# ----------------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------------
def capture_qkv(
    model: ByteLM, tokens: torch.Tensor, *, layer: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run ``model`` on tokens (1, seqlen + 1) int64; return the post-RoPE (q, k, v) per layer, each
    (1, seqlen, heads, head_dim) fp32 (only ``layer``'s when given), and the next-byte loss per position
    (seqlen,) fp32 in bits.
    """
    attns = [blk.attn for blk in model.blocks]
    keep = range(len(attns)) if layer is None else [layer]
    try:
        for i in keep:
            attns[i].capture = []
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens[:, :-1])
        bits = F.cross_entropy(logits[0], tokens[0, 1:], reduction="none") / math.log(2)
        return [attns[i].capture[0] for i in keep], bits
    finally:
        for a in attns:
            a.capture = None


def lm_qkv(
    seqlen: int, *, layer: int | None = None, device: str = "cpu", checkpoint: Path = CACHE / "model.pt"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE (q, k, v), each (1, seqlen, heads, 128) fp32, of every layer (or only ``layer``) of the
    trained byte LM run on ``seqlen`` bytes of held-out standard-library source. Trains the model first
    (default budget) when no checkpoint exists.
    """
    model, _ = load(checkpoint)
    tokens = held_out_tokens(seqlen)
    qkv, _ = capture_qkv(model.to(device), tokens.to(device), layer=layer)
    return qkv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="optimizer steps (batch x context bytes each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--needle-prob", type=float, default=0.0,
                    help="probability that a training window gets 1-3 planted needles (see plant_needles)")  # fmt: skip
    ap.add_argument("--stages", nargs="*", default=None, metavar="CONTEXT:STEPS",
                    help="train in stages, e.g. 4096:900 8192:300 (overrides --context and --steps)")  # fmt: skip
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this checkpoint's weights (same shape; fresh optimizer and schedule)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=CACHE)
    ap.add_argument("--capture", type=int, nargs="*", default=None,
                    help="skip training: load the checkpoint (training it if missing) and capture at these lengths")  # fmt: skip
    args = ap.parse_args()
    if args.capture is not None:
        model, record = load(args.out / "model.pt")
        print(describe(record))
        for s in args.capture or [32768]:
            t0 = time.perf_counter()
            qkv, bits = capture_qkv(model, held_out_tokens(s))
            ctx = model.cfg.context
            beyond = f", past the training context {bits[ctx:].mean():.2f}" if s > ctx else ""
            print(f"S={s}: captured {len(qkv)} layers of q/k/v {tuple(qkv[0][0].shape)} in "
                  f"{time.perf_counter() - t0:.1f} s; held-out bits/byte {bits.mean():.2f} (first {ctx}: "
                  f"{bits[:ctx].mean():.2f}{beyond})")  # fmt: skip
        return
    stages = None
    if args.stages:
        try:
            stages = [tuple(int(x) for x in st.split(":")) for st in args.stages]
        except ValueError:
            ap.error(f"--stages {' '.join(args.stages)}: expected CONTEXT:STEPS pairs such as 4096:900")
        args.context, args.steps = stages[-1][0], sum(n for _, n in stages)
    ffn = 64 * math.ceil(8 * args.d_model / 3 / 64)
    cfg = LMConfig(d_model=args.d_model, heads=args.heads, head_dim=args.d_model // args.heads,
                   layers=args.layers, ffn=ffn, context=args.context)  # fmt: skip
    record = train(cfg, steps=args.steps, batch=args.batch, lr=args.lr, dtype=args.dtype, seed=args.seed,
                   out=args.out, needle_prob=args.needle_prob, stages=stages, init=args.init)  # fmt: skip
    print(describe({"config": dataclasses.asdict(cfg), **record}))
    print(
        f"{record['tokens_per_s']:.0f} bytes/s over {record['steps']} steps; checkpoint: {args.out / 'model.pt'}"
    )


if __name__ == "__main__":
    main()
