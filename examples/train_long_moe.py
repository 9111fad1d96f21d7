"""Train a small long-context MoE decoder with sequence x expert parallelism; check it against one process.

    python examples/train_long_moe.py --world-size 4 --sp 2 --ep 2          # spawns 4 local CPU ranks (gloo)
    torchrun --nproc-per-node 4 examples/train_long_moe.py --sp 2 --ep 2    # or under torchrun

Model: :class:`longmoe.models.LlamaMoE` (byte vocabulary, RoPE on global positions, GQA, MoE MLPs with
aux-loss-free balancing), built from flags; no download. Data: the Python standard library's own source
(``longmoe.data``: this machine's files, held-out files excluded), one random window of ``--seqlen`` bytes
per data-parallel replica per step (the one-process check runs the same global batch). Parallelism comes from :mod:`longmoe.parallelize`: the world is
``dp x sp`` ranks; sequences are sharded in the zigzag layout over ``sp`` ranks and attention runs
TokenRing / KV ring / Ulysses (``--algorithm``, ``auto`` by default); experts are sharded over ``ep``
consecutive ranks. Each step logs the loss, tokens/s, bytes sent per rank (attention and MoE all-to-all)
and the expert load. The first ``--check-steps`` losses must equal the one-process run of the same model
and data (within fp32 rounding); the script exits 1 if not. It writes a PNG of the loss and expert load.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longmoe.data import stdlib_split, windows
from longmoe.models import LlamaMoE, LlamaMoEConfig
from longmoe.moe import MoELayer
from longmoe.parallel import ALGORITHM_CHOICES, SequenceParallelAttention
from longmoe.parallelize import ParallelConfig, parallelize, shard_batch, sync_gradients
from longmoe.runtime import CommStats, init_from_env, spawn


def build(args) -> LlamaMoE:
    torch.manual_seed(1234)  # identical initial weights on every rank and in the one-process run
    cfg = LlamaMoEConfig(
        vocab_size=256, hidden_size=args.dim, layers=args.layers, heads_q=args.heads, heads_kv=args.kv_heads,
        moe=dict(num_experts=args.experts, top_k=args.top_k, ffn_hidden_size=args.ffn, expert_bias_update_rate=args.bias_rate),
    )  # fmt: skip
    return LlamaMoE(cfg)


def train(args, rank: int, world: int, progress: bool) -> dict:
    """``args.steps`` training steps on this rank; returns losses, timings, bytes and expert loads."""
    config = ParallelConfig(sequence_parallel_size=args.sp if world > 1 else 1,
                            expert_parallel_size=args.ep if world > 1 else 1, algorithm=args.algorithm)  # fmt: skip
    model = build(args)
    stats = CommStats()
    meshes = parallelize(model, config, stats=stats)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data, _, _ = stdlib_split()
    g = torch.Generator().manual_seed(0)  # the same windows on every rank and in the one-process run
    rows = args.world_size // args.sp  # the global batch: one sequence per data-parallel replica of the run
    tokens_per_replica = rows // meshes.dp * args.seqlen
    losses, times, sent, loads = [], [], [], []
    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), TimeRemainingColumn())
        bar.start()
        task = bar.add_task("", total=args.steps)
    for step in range(args.steps):
        batch = windows(data, args.seqlen, rows, g)  # (rows, seqlen + 1), the same on every rank
        tokens, positions = shard_batch(batch[:, :-1], meshes.dense, config)
        targets, _ = shard_batch(batch[:, 1:], meshes.dense, config)
        t0 = time.perf_counter()
        logits, aux_loss, auxes = model(tokens, positions)
        ce = (
            F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="sum")
            / tokens_per_replica
        )
        opt.zero_grad(set_to_none=True)
        (ce + aux_loss).backward()
        sync_gradients(model, meshes)
        opt.step()
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.update_expert_bias()  # global load (all-reduced over the job)
        load = torch.stack([a.tokens_per_expert for a in auxes]).double()  # (moe layers, experts), this rank
        report = torch.cat([ce.detach().double().reshape(1), load.reshape(-1)])
        if world > 1:
            dist.all_reduce(report)
        times.append(time.perf_counter() - t0)
        losses.append(report[0].item() / meshes.dp)
        loads.append(report[1:].view_as(load).tolist())
        moe_bytes = sum(
            m.dispatcher.bytes_sent for m in model.modules() if isinstance(m, MoELayer) and m.dispatcher
        )
        sent.append(stats.total_sent + moe_bytes)
        if bar is not None:
            tps = rows * args.seqlen / times[-1]
            bar.update(task, advance=1, description=f"step {step}  loss {losses[-1]:.3f}  {tps:,.0f} tok/s")
    if bar is not None:
        bar.stop()
    algorithms = sorted({m.last_algorithm for m in model.modules()
                         if isinstance(m, SequenceParallelAttention) and m.last_algorithm})  # fmt: skip
    per_step = [b - a for a, b in zip([0, *sent], sent, strict=False)]
    return dict(rank=rank, world=world, dp=meshes.dp, rows=rows, losses=losses, step_s=times, bytes_per_step=per_step,
                loads=loads, algorithms=algorithms or ["(none: sp 1)"])  # fmt: skip


def _spawned(rank, world, args):
    return train(args, rank, world, progress=rank == 0 and not args.quiet)


def run(args) -> tuple[list[dict], dict]:
    """The distributed run (spawned, or this torchrun rank) and the one-process reference."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = init_from_env()
        args.world_size = world
        return [train(args, rank, world, progress=rank == 0)], None
    results = spawn(_spawned, args.world_size, args, timeout_s=900.0) if args.world_size > 1 else []
    one = argparse.Namespace(**{**vars(args), "steps": args.check_steps})
    single = train(one, 0, 1, progress=False)
    return results or [single], single


def check(results: list[dict], single: dict | None, steps: int) -> float:
    """Max relative difference of the first ``steps`` losses between the run and one process."""
    if single is None:
        return float("nan")
    dist_losses = results[0]["losses"][:steps]
    return max(abs(a - b) / abs(b) for a, b in zip(dist_losses, single["losses"][:steps], strict=True))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(r["losses"], marker="o")
    a.set(xlabel="step", ylabel="loss (nats/byte)", title=f"LlamaMoE on stdlib source, world {r['world']}")
    load = torch.tensor(r["loads"][-1])  # (layers, experts), last step
    im = b.imshow(load / load.sum(1, keepdim=True) * load.shape[1], cmap="viridis", aspect="auto")
    b.set(
        xlabel="expert",
        ylabel="MoE layer",
        title="expert load, last step (1 = balanced)",
        xticks=range(load.shape[1]),
        yticks=range(load.shape[0]),
    )
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4, help="local ranks to spawn (ignored under torchrun)")
    ap.add_argument("--sp", type=int, default=2, help="sequence-parallel size")
    ap.add_argument("--ep", type=int, default=2, help="expert-parallel size")
    ap.add_argument("--algorithm", default="auto", choices=list(ALGORITHM_CHOICES))
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--check-steps", type=int, default=3, help="steps compared with the one-process run")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--bias-rate",
        type=float,
        default=2e-2,
        help="aux-loss-free balancing step (expert bias += rate * sign(mean load - load))",
    )
    ap.add_argument("--png", type=Path, default=Path("benchmarks/results/train_long_moe.png"))
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse()
    results, single = run(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    r = results[0]
    console = Console(width=140)
    table = Table(title=f"LlamaMoE, world {r['world']} = dp {r['dp']} x sp {args.sp}, ep {args.ep}, "
                  f"seqlen {args.seqlen}; data: this machine's Python standard library source")  # fmt: skip
    for col in ("step", "loss", "tokens/s", "MB sent (rank 0)", "expert load max/mean"):
        table.add_column(col, justify="right")
    for i, loss in enumerate(r["losses"]):
        load = torch.tensor(r["loads"][i])
        imbalance = (load.max(1).values / load.mean(1)).max().item()
        table.add_row(str(i), f"{loss:.4f}", f"{r['rows'] * args.seqlen / r['step_s'][i]:,.0f}",
                      f"{r['bytes_per_step'][i] / 1e6:.2f}", f"{imbalance:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"attention algorithm(s) chosen: {', '.join(r['algorithms'])}")
    plot(results, args.png)
    console.print(f"plot: {args.png}")
    diff = check(results, single, args.check_steps)
    if math.isnan(diff):
        return 0
    ok = diff <= 1e-4  # fp32: only the order of sums over ranks differs, a few ulp per op over a few steps
    console.print(f"{'OK' if ok else 'FAIL'}: max relative loss difference vs one process over the first "
                  f"{args.check_steps} steps: {diff:.2e}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
