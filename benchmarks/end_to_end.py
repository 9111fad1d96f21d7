"""End-to-end training step of a long-context MoE model: plain-PyTorch path vs Megatron-core spec, dense vs
XAttention, under SP x EP factorisations of the world.

    python benchmarks/end_to_end.py                      # world 1, 2, 4 on local CPU ranks (gloo)
    python benchmarks/end_to_end.py --worlds 4 --seqlen 4096 --paths plain --sparse off

For each world size and (sequence-parallel, expert-parallel) pair, and for each path:

* ``plain``: :mod:`longmoe.parallelize` on a byte-level :class:`~longmoe.models.LlamaMoE`;
* ``megatron``: a megatron-core 0.16.1 ``GPTModel`` of the same shape (hidden, layers, heads, GQA groups,
  experts, top-2, expert width, vocabulary 256, RoPE, RMSNorm, SwiGLU) built with
  :func:`longmoe.megatron.gpt_layer_spec` (context parallel = our SP, Megatron's zigzag CP batch split),
  gradients reduced by hand over Megatron's DP x CP and expert-DP groups (Megatron's DDP wrapper and
  distributed optimizer want CUDA), run with the CPU shims of tests/megatron/cpu_shims.py;

with dense attention and with XAttention (``--threshold``, stride 8, block 128; Ulysses across SP ranks),
it trains on this machine's Python standard library source and measures tokens/s of the full step
(forward, backward, gradient sync, AdamW) and each rank's peak resident memory. Every configuration runs
in spawned ranks, one thread each. The global batch is fixed (``--rows`` sequences of ``--seqlen`` bytes):
rows are split over data-parallel replicas and sequences over SP ranks. The ratio column compares each
row with the one-process plain dense run of the same invocation.

On this 2-core machine every extra rank shares the same two cores: more ranks cannot be faster in
aggregate, so the figures measure the overhead of each factorisation (communication, smaller kernels,
Python per rank), not scaling. A freshly initialised model attends almost uniformly, so XAttention's
masks keep most tiles at τ = 0.9: the sparse rows show the estimate's overhead more than its savings
(the density column says how much was kept).
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import RESULTS, run_metadata, write_csv
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from longmoe.attention import XAttentionConfig, xattention_estimate
from longmoe.attention.xattention import block_density
from longmoe.data import stdlib_split, windows
from longmoe.models import LlamaMoE, LlamaMoEConfig
from longmoe.moe import MoELayer
from longmoe.parallelize import ParallelConfig, parallelize, shard_batch, sync_gradients
from longmoe.runtime import spawn

ROOT = Path(__file__).resolve().parents[1]


def _sparse(args, on: bool) -> XAttentionConfig | None:
    return XAttentionConfig(threshold=args.threshold, stride=8, block_size=128) if on else None


def _batches(args):
    """Every step's global batch (rows, seqlen + 1), warm-up included, from one seeded generator."""
    data = stdlib_split()[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps + 1):
        yield windows(data, args.seqlen, args.rows, g)


def _plain_rank(rank: int, world: int, args, sp: int, ep: int, sparse: bool) -> dict:
    torch.manual_seed(0)
    model = LlamaMoE(LlamaMoEConfig(
        vocab_size=256, hidden_size=args.dim, layers=args.layers, heads_q=args.heads, heads_kv=args.kv_heads,
        moe=dict(num_experts=args.experts, top_k=2, ffn_hidden_size=args.ffn),
    ))  # fmt: skip
    config = ParallelConfig(sequence_parallel_size=sp, expert_parallel_size=ep,
                            algorithm="ulysses" if sparse and sp > 1 else args.algorithm,
                            sparse=_sparse(args, sparse))  # fmt: skip
    meshes = parallelize(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_replica = args.rows // meshes.dp * args.seqlen
    times, first = [], None
    for step, batch in enumerate(_batches(args)):  # step 0: warm-up (auto's measurements, allocator)
        first = batch if first is None else first
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
    algs = sorted({m.last_algorithm for m in model.modules() if getattr(m, "last_algorithm", None)})
    moe = sum(isinstance(m, MoELayer) for m in model.modules())
    return dict(step_s=statistics.median(times), peak_mb=_peak_mb(), algorithm="/".join(algs) or "-",
                moe_layers=moe, density=_density(model, first, args) if sparse else 1.0)  # fmt: skip


def _peak_mb() -> float:
    """This rank's peak resident set in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def _density(model, batch, args) -> float:
    """Kept fraction of the causally visible tiles of the first block's XAttention mask on the first step's
    first sequence (whole sequence, one process, the weights at the end of the run)."""
    layer = model.blocks[0]
    q, k, _ = layer.attention.project(layer.norm1(model.embed(batch[:1, :-1])), torch.arange(args.seqlen))
    sp = _sparse(args, True)
    _, mask = xattention_estimate(q, k, stride=sp.stride, block_size=sp.block_size, threshold=sp.threshold,
                                  causal=True)  # fmt: skip
    return block_density(mask, args.seqlen, args.seqlen, sp.block_size, True)


def _megatron_rank(rank: int, world: int, args, sp: int, ep: int, sparse: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    # megatron-core warns "Unknown MLP type" for any mlp that is not its own MLP/MoELayer; ours is expected.
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    from megatron.core import parallel_state as ps  # noqa: PLC0415
    from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: PLC0415
    from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: PLC0415
    from megatron.core.utils import get_batch_on_this_cp_rank  # noqa: PLC0415

    from longmoe.megatron import gpt_layer_spec  # noqa: PLC0415
    from tests.megatron import cpu_shims  # noqa: PLC0415  (benchmark harness, as the tests)

    cpu_shims.install()
    ps.initialize_model_parallel(context_parallel_size=sp, expert_model_parallel_size=ep)
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.dim, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, num_moe_experts=args.experts,
        moe_router_topk=2, moe_ffn_hidden_size=args.ffn, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, params_dtype=torch.float32, use_cpu_initialization=True,
        attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=sp, expert_model_parallel_size=ep,
        moe_aux_loss_coeff=1e-2,
    )  # fmt: skip
    torch.manual_seed(0)
    algorithm = (
        "ulysses" if sparse and sp > 1 else ("auto" if args.algorithm == "autotune" else args.algorithm)
    )
    model = GPTModel(config=cfg, transformer_layer_spec=gpt_layer_spec(attention=algorithm, sparse=_sparse(args, sparse)),
                     vocab_size=256, max_sequence_length=args.seqlen, position_embedding_type="rope")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp = world // sp
    dp_rank = ps.get_data_parallel_rank()
    dense_group = ps.get_data_parallel_group(with_context_parallel=True)
    expert_dp = ps.get_expert_data_parallel_group()
    per_replica = args.rows // dp * args.seqlen
    times = []
    per = args.rows // dp
    for step, global_rows in enumerate(_batches(args)):
        rows = global_rows[dp_rank * per : (dp_rank + 1) * per]
        batch = get_batch_on_this_cp_rank({
            "tokens": rows[:, :-1], "labels": rows[:, 1:],
            "position_ids": torch.arange(args.seqlen).expand(rows.shape[0], args.seqlen),
        })  # fmt: skip
        t0 = time.perf_counter()
        per_token = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        loss = per_token.sum() / per_replica
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # DDP's job, by hand: dense over DP x CP, experts over expert-DP
            if p.grad is None:
                continue
            group = dense_group if getattr(p, "allreduce", True) else expert_dp
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), peak_mb=_peak_mb(),
                algorithm=algorithm if sp > 1 else "-", moe_layers=args.layers, density=float("nan"))  # fmt: skip


def _spawned(rank, world, path, args, sp, ep, sparse):
    fn = _plain_rank if path == "plain" else _megatron_rank
    return fn(rank, world, args, sp, ep, sparse)


CURATED = {1: [(1, 1)], 2: [(2, 1), (1, 2), (2, 2)], 4: [(2, 2), (4, 1), (1, 4), (4, 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--all-factorisations",
        action="store_true",
        help="every (sp, ep) dividing the world (default: 1; 2x1, 1x2, 2x2; 2x2, 4x1, 1x4, 4x4)",
    )
    ap.add_argument("--paths", nargs="+", default=["plain", "megatron"], choices=["plain", "megatron"])
    ap.add_argument("--sparse", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--threshold", type=float, default=0.9, help="XAttention tau (stride 8, block 128)")
    ap.add_argument("--seqlen", type=int, default=4096)
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
    console = Console(width=160)

    def fits(w, sp, ep):
        return w % sp == 0 and w % ep == 0 and args.rows % (w // sp) == 0 and args.experts % ep == 0

    points = []
    for w in args.worlds:
        pairs = (
            [(sp, ep) for sp in (1, 2, 4) for ep in (1, 2, 4)]
            if args.all_factorisations
            else CURATED.get(w, [])
        )
        points += [(w, sp, ep, path, sparse) for sp, ep in pairs if fits(w, sp, ep)
                   for path in args.paths for sparse in args.sparse]  # fmt: skip
    rows = []
    meta = run_metadata(seqlen=args.seqlen, global_rows=args.rows, dim=args.dim, layers=args.layers,
                        experts=args.experts, threshold=args.threshold,
                        data="python stdlib source on this machine")  # fmt: skip
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("end to end", total=len(points))
        for world, sp, ep, path, sparse in points:
            progress.update(
                task, description=f"{path} {'xattn' if sparse == 'on' else 'dense'} w{world} sp{sp} ep{ep}"
            )
            # every configuration, one process included, runs in spawned ranks with the same thread count
            res = spawn(_spawned, world, path, args, sp, ep, sparse == "on", timeout_s=1800)
            step = max(r["step_s"] for r in res)
            rows.append(dict(path=path, attention="xattention" if sparse == "on" else "dense", world=world, sp=sp,
                             ep=ep, dp=world // sp, algorithm=res[0]["algorithm"], density=res[0]["density"],
                             step_s=step, tokens_per_s=args.rows * args.seqlen / step,
                             peak_mb_max_rank=max(r["peak_mb"] for r in res), **meta))  # fmt: skip
            progress.advance(task)
            _report(rows, args, meta, console, final=False)
    _report(rows, args, meta, console, final=True)


def _report(rows, args, meta, console, final: bool) -> None:
    """CSV and PNG (rewritten after every point, so an interrupted run keeps what it measured); the table at
    the end. Ratios against the one-process plain dense run when it was measured."""
    base = next(
        (r for r in rows if r["world"] == 1 and r["path"] == "plain" and r["attention"] == "dense"), None
    )
    for r in rows:
        r["ratio_vs_1proc_plain_dense"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    write_csv(rows, args.out)
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    configs = sorted({(r["world"], r["sp"], r["ep"]) for r in rows})
    series = sorted({(r["path"], r["attention"]) for r in rows})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (path, attn) in enumerate(series):
        xs, ys = [], []
        for j, c in enumerate(configs):
            hit = [
                r
                for r in rows
                if (r["world"], r["sp"], r["ep"], r["path"], r["attention"]) == (*c, path, attn)
            ]
            if hit:
                xs.append(j + i * width)
                ys.append(hit[0]["tokens_per_s"])
        ax.bar(xs, ys, width=width, label=f"{path} {attn}")
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(configs))])
    ax.set_xticklabels([f"w{w} sp{s} ep{e}" for w, s, e in configs], rotation=30)
    ax.set(ylabel="tokens/s (whole job)",
           title=f"Training step, {args.rows} x {args.seqlen} bytes, d={args.dim} L={args.layers} E={args.experts} "
           f"(2-core CPU, ranks share the cores)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    if not final:
        return
    table = Table(title=f"Training step, d={args.dim} L={args.layers} E={args.experts} top-2, global batch "
                  f"{args.rows} x {args.seqlen} bytes, CPU ranks on {meta['machine']}")  # fmt: skip
    for col in ("path", "attention", "world", "sp", "ep", "dp", "SP algorithm", "density", "step s", "tokens/s",
                "vs 1 proc plain dense", "peak MB/rank"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        dens = (
            "-"
            if r["attention"] == "dense"
            else (f"{r['density']:.2f}" if r["density"] == r["density"] else "n/a")
        )
        table.add_row(r["path"], r["attention"], *(str(r[k]) for k in ("world", "sp", "ep", "dp", "algorithm")), dens,
                      f"{r['step_s']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['ratio_vs_1proc_plain_dense']:.2f}x",
                      f"{r['peak_mb_max_rank']:.0f}")  # fmt: skip
    console.print(table)
    console.print("All ranks share this machine's two cores, so a ratio below 1 is the cost of the split, not a "
                  "failure to scale; peak MB is the largest rank's peak resident set, Python and torch included. "
                  "Megatron rows: GPTModel with longmoe's gpt_layer_spec, gradients reduced by hand, CPU shims from "
                  "tests/megatron; density n/a there (measured on the plain model).")  # fmt: skip
    console.print(f"CSV: {args.out}  plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
