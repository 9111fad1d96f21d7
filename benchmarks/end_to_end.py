"""End-to-end training step of a long-context MoE model under every SP x EP factorisation of the world.

    python benchmarks/end_to_end.py                      # world 1, 2, 4 on local CPU ranks (gloo)
    python benchmarks/end_to_end.py --worlds 4 --seqlen 4096

For each world size and each (sequence-parallel, expert-parallel) pair that divides it, the plain-PyTorch
path (:mod:`longmoe.parallelize`) trains a byte-level :class:`~longmoe.models.LlamaMoE` on this machine's
Python standard library source and measures tokens/s of the full step (forward, backward, gradient sync,
optimizer) and each rank's peak resident memory (every configuration runs in spawned ranks, one thread each). The global batch is fixed
(``--rows`` sequences of ``--seqlen`` bytes), so rows are split over data-parallel replicas and sequences
over sequence-parallel ranks. The ratio column compares each configuration with the one-process run in
the same invocation. CSV under benchmarks/results/, a table, a PNG.

On this 2-core machine every extra rank shares the same two cores: more ranks cannot be faster in
aggregate, so the figures measure the overhead of each factorisation (communication, smaller kernels,
Python per rank), not scaling. Megatron-core is not installed here, so its spec is not in the table.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, run_metadata, write_csv
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from longmoe.data import stdlib_split, windows
from longmoe.models import LlamaMoE, LlamaMoEConfig
from longmoe.moe import MoELayer
from longmoe.parallelize import ParallelConfig, parallelize, shard_batch, sync_gradients
from longmoe.runtime import spawn


def _step_rank(rank: int, world: int, args, sp: int, ep: int) -> dict:
    torch.manual_seed(0)
    model = LlamaMoE(LlamaMoEConfig(
        vocab_size=256, hidden_size=args.dim, layers=args.layers, heads_q=args.heads, heads_kv=args.kv_heads,
        moe=dict(num_experts=args.experts, top_k=2, ffn_hidden_size=args.ffn),
    ))  # fmt: skip
    config = ParallelConfig(sequence_parallel_size=sp, expert_parallel_size=ep, algorithm=args.algorithm)
    meshes = parallelize(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, _, _ = stdlib_split()
    g = torch.Generator().manual_seed(0)
    per_replica = args.rows // meshes.dp * args.seqlen
    times = []
    for step in range(args.steps + 1):  # step 0: warm-up (auto's measurements, allocator)
        batch = windows(data, args.seqlen, args.rows, g)
        tokens, positions = shard_batch(batch[:, :-1], meshes.dense, config)
        targets, _ = shard_batch(batch[:, 1:], meshes.dense, config)
        t0 = time.perf_counter()
        logits, aux, _ = model(tokens, positions)
        loss = (
            F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="sum") / per_replica + aux
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model, meshes)
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux: this rank's peak RSS
    algs = sorted({m.last_algorithm for m in model.modules() if getattr(m, "last_algorithm", None)})
    moe = sum(isinstance(m, MoELayer) for m in model.modules())
    return dict(step_s=statistics.median(times), peak_mb=peak / 2**20, algorithm="/".join(algs) or "-",
                moe_layers=moe)  # fmt: skip


def _spawned(rank, world, args, sp, ep):
    return _step_rank(rank, world, args, sp, ep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "end_to_end.csv")
    args = ap.parse_args()
    console = Console(width=150)

    points = [(w, sp, ep) for w in args.worlds for sp in (1, 2, 4) for ep in (1, 2, 4)
              if w % sp == 0 and w % ep == 0 and args.rows % (w // sp) == 0 and args.experts % ep == 0]  # fmt: skip
    rows = []
    meta = run_metadata(seqlen=args.seqlen, global_rows=args.rows, dim=args.dim, layers=args.layers,
                        experts=args.experts, data="python stdlib source on this machine")  # fmt: skip
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("end to end", total=len(points))
        for world, sp, ep in points:
            progress.update(task, description=f"world {world} sp {sp} ep {ep}")
            # every configuration, one process included, runs in spawned ranks with the same thread count
            res = spawn(_spawned, world, args, sp, ep, timeout_s=1800)
            step = max(r["step_s"] for r in res)
            rows.append(dict(world=world, sp=sp, ep=ep, dp=world // sp, algorithm=res[0]["algorithm"],
                             step_s=step, tokens_per_s=args.rows * args.seqlen / step,
                             peak_mb_max_rank=max(r["peak_mb"] for r in res), **meta))  # fmt: skip
            progress.advance(task)
    base = next(r for r in rows if r["world"] == 1)
    for r in rows:
        r["ratio_vs_1proc"] = r["tokens_per_s"] / base["tokens_per_s"]
    write_csv(rows, args.out)

    table = Table(title=f"Training step, LlamaMoE d={args.dim} L={args.layers} E={args.experts}, global batch "
                  f"{args.rows} x {args.seqlen} bytes, CPU ranks on {meta['machine']}")  # fmt: skip
    for col in ("world", "sp", "ep", "dp", "attention", "step s", "tokens/s", "vs 1 process", "peak MB/rank"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("world", "sp", "ep", "dp", "algorithm")), f"{r['step_s']:.2f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['ratio_vs_1proc']:.2f}x", f"{r['peak_mb_max_rank']:.0f}")  # fmt: skip
    console.print(table)
    console.print("All ranks share this machine's cores, so a ratio below 1 is the cost of the split, not a "
                  "failure to scale; peak MB is each rank's peak resident set (the largest rank's), Python and torch included.")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"w{r['world']} sp{r['sp']} ep{r['ep']}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows])
    ax.set(ylabel="tokens/s (whole job)", title="End-to-end training step by factorisation (2-core CPU)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    console.print(f"CSV: {args.out}  plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
