"""Train a small causal transformer with sequence-parallel attention on CPU ranks; compare with 1 process.

    torchrun --nproc-per-node 4 examples/long_context_train.py --algorithm auto
    python examples/long_context_train.py --world-size 4          # spawns local gloo ranks itself

Data: byte-level text of the Python standard library's own source files (already on this machine; no
download). Each step takes one sequence of --seqlen bytes, shards it along the sequence in the zigzag
layout, and every rank runs the whole model on its shard: embeddings, MLPs and norms are per token;
attention is ``SequenceParallelAttention`` (TokenRing / KV ring / Ulysses). RoPE uses each token's global
position. The loss is summed over every rank's tokens and divided by the global count, and gradients are
all-reduced (the model is replicated, as in DDP). The same model trained in one process with ordinary
attention on the full sequence must produce the same losses; the script checks that and exits 1 if not.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longmoe.attention import flash_attention
from longmoe.data import stdlib_split, windows
from longmoe.parallel import ALGORITHM_CHOICES, SequenceParallelAttention, shard_positions, shard_sequence


class Rotary:
    """RoPE on (batch, seq, heads, head_dim) given each token's global position (seq,)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        self.inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ang = positions.float()[:, None] * self.inv_freq[None, :]  # (seq, head_dim / 2)
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attention: nn.Module | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )
        self.attention = attention  # None: single-process flash attention on the full sequence
        self.rope = Rotary(self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = self.rope(q.view(b, s, self.heads, self.head_dim), positions)
        k = self.rope(k.view(b, s, self.kv_heads, self.head_dim), positions)
        v = v.view(b, s, self.kv_heads, self.head_dim)
        a = self.attention(q, k, v) if self.attention is not None else flash_attention(q, k, v, causal=True)
        x = x + self.proj(a.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, *, dim=128, layers=2, heads=8, kv_heads=2, attention_factory=None):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, kv_heads, attention_factory() if attention_factory else None)
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, positions)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, seqlen: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chunk = windows(data, seqlen, 1, g)
        yield chunk[:, :-1], chunk[:, 1:]  # (1, seqlen) inputs and next-byte targets


def train(args, rank: int, world: int) -> list[float]:
    torch.manual_seed(1234)  # identical initial weights on every rank and in the 1-process run
    sp = world > 1
    factory = (lambda: SequenceParallelAttention(causal=True, algorithm=args.algorithm)) if sp else None
    model = TinyLM(
        dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, attention_factory=factory
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data, _, _ = stdlib_split()  # the training stream; held-out files are not used here
    losses = []
    for tokens, targets in batches(data, args.seqlen, args.steps):
        if sp:
            positions = shard_positions(args.seqlen, rank, world, "zigzag")
            tokens, targets = shard_sequence(tokens, None, "zigzag"), shard_sequence(targets, None, "zigzag")
        else:
            positions = torch.arange(args.seqlen)
        logits = model(tokens, positions)
        loss_sum = F.cross_entropy(logits.view(-1, 256).float(), targets.view(-1), reduction="sum")
        loss = loss_sum / args.seqlen  # every rank divides by the global token count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sp:
            for p in model.parameters():
                dist.all_reduce(p.grad)  # the loss is a sum over ranks' tokens: sum the gradients
            total = loss.detach().clone()
            dist.all_reduce(total)
        else:
            total = loss.detach()
        opt.step()
        losses.append(total.item())
    if sp and rank == 0:
        algs = [blk.attention.last_algorithm for blk in model.blocks]
        print(f"attention algorithm per layer: {algs}")
    return losses


def _spawned(rank, world, args):
    return train(args, rank, world)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--algorithm", default="auto", choices=list(ALGORITHM_CHOICES))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    if "RANK" in os.environ:
        from longmoe.runtime import init_from_env

        rank, world = init_from_env()
        losses = train(args, rank, world)
        if rank != 0:
            return 0
    else:
        from longmoe.runtime import spawn

        world = args.world_size
        losses = spawn(_spawned, world, args, timeout_s=1800)[0]
    reference = train(args, 0, 1)
    print(
        "Training a 2-layer byte-level LM on the Python standard library's source (local files, no download)"
    )
    print(f"{'step':>4}  {'loss, ' + str(world) + ' ranks':>16}  {'loss, 1 process':>16}  {'diff':>9}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(losses, reference, strict=True)):
        worst = max(worst, abs(a - b))
        print(f"{i:>4}  {a:>16.5f}  {b:>16.5f}  {abs(a - b):>9.2e}")
    # fp32 end to end: the sharded run differs only by summation order, which AdamW amplifies slowly.
    ok = worst < 1e-3 and math.isfinite(worst) and losses[-1] < losses[0]
    print(
        ("OK" if ok else "MISMATCH")
        + f": max |loss difference| {worst:.2e}; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
