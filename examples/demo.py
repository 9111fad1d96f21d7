"""longmoe demo: the system in miniature, a long-context MoE model trained on local CPU ranks.

    python examples/demo.py                  # what `make demo` runs: 4 ranks, SP 2 x EP 2, `auto` attention
    python examples/demo.py --full           # also the attention-core and sequence-parallel tables below

Default: ``examples/train_long_moe.py`` on 4 spawned gloo ranks: a byte-level LlamaMoE trained for a few
steps on this machine's Python standard library source, sequences sharded over 2 ranks (the cost model's
``auto`` pick of TokenRing / KV ring / Ulysses) and experts over 2 ranks; one summary table (algorithm
chosen, bytes per step, expert load, parity with one process) and a PNG of the loss and expert load.

With ``--full``, before that:

1. Attention core: long-context causal GQA attention (bf16) forward + backward with the native C++ kernel,
   next to torch SDPA in the same run, and its error against an fp64 oracle.
2. Sequence parallelism: ``world_size`` real processes on gloo each hold a zigzag shard of a causal batch
   and run TokenRing, the KV ring and Ulysses forward + backward; the cost model's ``auto`` pick, the bytes
   each algorithm moved per direction, and every rank's error against the single-process fp64 oracle
   (bounded by 2x the single-process bf16 error) are printed.

The --full tables run on random tensors; nothing is downloaded anywhere.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import longmoe
from longmoe.attention import flash_attention, flash_attention_backward_ref, flash_attention_ref
from longmoe.parallel import (
    CommStats,
    kv_ring_attention,
    select_algorithm,
    shard_sequence,
    token_ring_attention,
    ulysses_attention,
)
from longmoe.runtime import native_build_info, spawn

ALGORITHMS = {"token_ring": token_ring_attention, "kv_ring": kv_ring_attention, "ulysses": ulysses_attention}


def timed(fn, repeats=2):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def attention_core(console: Console, seqlen: int) -> None:
    b, hq, hkv, d = 1, 8, 2, 128
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, seqlen, h, d, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv))

    def ours():
        out = flash_attention(q, k, v, causal=True)
        out.backward(dout)

    # SDPA in its own layout; GQA through enable_gqa (it repeats K/V internally).
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def sdpa():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        out.backward(dout.transpose(1, 2))

    dout = torch.randn(b, seqlen, hq, d, dtype=dtype)
    t_ours, t_sdpa = timed(ours), timed(sdpa)
    flop = 4 * b * hq * seqlen * seqlen * d / 2 * 3.5  # causal forward + backward (2.5x)

    # Accuracy at a size the fp64 oracle handles quickly.
    qs, ks, vs = (x.detach()[:, :1031] for x in (q, k, v))
    out, lse = flash_attention(qs, ks, vs, causal=True, return_lse=True)
    ref, ref_lse = flash_attention_ref(qs.double(), ks.double(), vs.double(), causal=True)
    same, _ = flash_attention_ref(qs, ks, vs, causal=True, upcast=False)

    table = Table(
        title=f"Attention core on CPU: causal GQA {hq}:{hkv}, bf16, S={seqlen}, D={d}, forward+backward"
    )
    for col in ("implementation", "ms / step", "GFLOP/s", "vs SDPA"):
        table.add_column(col, justify="right")
    table.add_row(
        "longmoe native (C++)", f"{t_ours * 1e3:.0f}", f"{flop / t_ours / 1e9:.1f}", f"{t_sdpa / t_ours:.2f}x"
    )
    table.add_row("torch SDPA", f"{t_sdpa * 1e3:.0f}", f"{flop / t_sdpa / 1e9:.1f}", "1.00x")
    console.print(table)
    console.print(
        f"max |out - fp64 oracle| at S=1031: longmoe {(out.double() - ref).abs().max():.2e}, "
        f"plain bf16 PyTorch {(same.double() - ref).abs().max():.2e}; "
        f"max |lse - oracle| {(lse.double() - ref_lse).abs().max():.2e}"
    )


def sequence_parallel_rank(rank: int, world: int, seqlen: int, configs: list):
    """One rank: shard a causal batch (zigzag), run each algorithm forward + backward, check against the
    single-process fp64 oracle, and report the bytes it sent (forward + backward; Ulysses: forward)."""
    rows = []
    for name, hq, hkv in configs:
        gen = torch.Generator().manual_seed(1234)
        b, d, dtype = 1, 64, torch.bfloat16
        q, k, v, dout = (
            torch.randn(b, seqlen, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq)
        )
        o64, l64 = flash_attention_ref(q, k, v, causal=True)
        dq64, _, _ = flash_attention_backward_ref(dout, q, k, v, o64, l64, causal=True)
        # What one process gets in bf16: the error budget (2x) the sharded run must stay within.
        q1 = q.to(dtype).requires_grad_()
        o1 = flash_attention(q1, k.to(dtype), v.to(dtype), causal=True)
        o1.backward(dout.to(dtype))
        err1 = ((o1.double() - o64).abs().max().item(), (q1.grad.double() - dq64).abs().max().item())
        ql, kl, vl = (shard_sequence(t).to(dtype) for t in (q, k, v))
        auto, estimates = select_algorithm(ql.requires_grad_(), kl, causal=True)
        ql = ql.detach()
        for alg in ("token_ring", "kv_ring", "ulysses"):
            stats = CommStats()
            qg = ql.clone().requires_grad_()
            t0 = time.perf_counter()
            out = ALGORITHMS[alg](qg, kl, vl, causal=True, stats=stats)
            out.backward(shard_sequence(dout).to(dtype))
            ms = (time.perf_counter() - t0) * 1e3
            err = ((out.double() - shard_sequence(o64)).abs().max().item(),
                   (qg.grad.double() - shard_sequence(dq64)).abs().max().item())  # fmt: skip
            ok = err[0] <= 2 * err1[0] + 3e-2 and err[1] <= 2 * err1[1] + 3e-2
            assert ok, f"rank {rank}: {alg} {name}: error {err} exceeds 2x single-process {err1}"
            sent = dict(stats.bytes_sent)
            rows.append(dict(rank=rank, config=name, algorithm=alg, auto=auto, err=err, err1=err1, ms=ms,
                             sent=sent, estimate=estimates.get(alg)))  # fmt: skip
    return rows


def system_in_miniature(console, args) -> bool:
    """The training run of examples/train_long_moe.py, summarised in one table; True if it matches one process."""
    import train_long_moe  # examples/ is on sys.path when this script runs

    targs = train_long_moe.parse(["--world-size", str(args.world_size), "--sp", str(args.sp), "--ep", str(args.ep),
                                  "--steps", str(args.steps), "--seqlen", str(args.train_seqlen),
                                  "--check-steps", str(min(3, args.steps)), "--png", str(args.png)])  # fmt: skip
    world = targs.world_size
    console.rule(
        f"LlamaMoE (byte-level, {targs.layers} layers, {targs.experts} experts top-{targs.top_k}) on {world} "
        f"local CPU ranks: SP {targs.sp} x EP {targs.ep} x DP {world // targs.sp}, trained on this machine's "
        "Python standard library source"
    )
    t0 = time.perf_counter()
    results, single = train_long_moe.run(targs)
    r = results[0]
    diff = train_long_moe.check(results, single, targs.check_steps)
    load = torch.tensor(r["loads"][-1])
    table = Table(title=f"{targs.steps} training steps, global batch {r['rows']} x {targs.seqlen} tokens "
                  f"({time.perf_counter() - t0:.0f} s with the one-process check)")  # fmt: skip
    for col in ("attention (auto)", "loss first -> last", "tokens/s", "MB sent per step (rank 0)",
                "expert load max/mean (last step)", "loss vs 1 process (first steps)"):  # fmt: skip
        table.add_column(col, justify="right")
    steady = r["step_s"][1:] or r["step_s"]
    table.add_row(
        ", ".join(r["algorithms"]), f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
        f"{r['rows'] * targs.seqlen * len(steady) / sum(steady):,.0f}",
        f"{sum(r['bytes_per_step'][1:]) / max(len(r['bytes_per_step']) - 1, 1) / 1e6:.2f}",
        " / ".join(f"{x:.2f}" for x in (load.max(1).values / load.mean(1)).tolist()),
        f"max rel diff {diff:.1e} ({'OK' if diff <= 1e-4 else 'FAIL'})",
    )  # fmt: skip
    console.print(table)
    train_long_moe.plot(results, args.png)
    console.print(f"plot of the loss and expert load: {args.png}")
    return diff <= 1e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--sp", type=int, default=2, help="sequence-parallel size of the training run")
    ap.add_argument("--ep", type=int, default=2, help="expert-parallel size of the training run")
    ap.add_argument("--steps", type=int, default=6, help="training steps")
    ap.add_argument("--train-seqlen", type=int, default=1024, help="sequence length of the training run")
    ap.add_argument("--png", type=Path, default=Path("benchmarks/results/demo_train.png"))
    ap.add_argument(
        "--full", action="store_true", help="also the attention-core and sequence-parallel tables"
    )
    ap.add_argument(
        "--seqlen", type=int, default=4096, help="--full: sequence length of the attention-core run"
    )
    ap.add_argument(
        "--sp-seqlen", type=int, default=4096, help="--full: global sequence length of the sharded run"
    )
    args = ap.parse_args()

    console = Console(width=max(Console().width, 130))
    info = native_build_info()
    console.rule(
        f"longmoe {longmoe.__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads"
    )
    console.print(
        f"native kernels: {'built' if info else 'NOT built (reference backend)'} {info.get('isa', '')}"
        f"{', BLAS sgemm' if info.get('blas_sgemm') else ''}"
    )
    if args.full:
        attention_core(console, args.seqlen)
        sequence_parallel_tables(console, args)
    if not system_in_miniature(console, args):
        raise SystemExit("demo: the distributed run does not match one process")
    console.print("[green]demo finished: the sharded run matches one process[/]")


def sequence_parallel_tables(console, args) -> None:
    """TokenRing, the KV ring and Ulysses on random bf16 shards, against the fp64 oracle."""
    configs = [("MHA 8:8", 8, 8), ("GQA 8:1", 8, 1)]
    console.rule(
        f"Sequence-parallel causal attention on {args.world_size} local CPU ranks (gloo), bf16, zigzag"
    )
    results = spawn(sequence_parallel_rank, args.world_size, args.sp_seqlen, configs, timeout_s=600)
    rows = [r for per_rank in results for r in per_rank]
    table = Table(
        title=f"S={args.sp_seqlen} tokens over {args.world_size} ranks, head_dim 64, forward + backward"
    )
    for col in ("heads", "algorithm", "auto picks", "MB sent (rank 0) next / prev", "ms (rank 0)",
                "max |out - fp64| (1 proc)", "max |dq - fp64| (1 proc)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        if r["rank"] != 0:
            continue
        worst_out = max(
            x["err"][0] for x in rows if x["config"] == r["config"] and x["algorithm"] == r["algorithm"]
        )
        worst_dq = max(
            x["err"][1] for x in rows if x["config"] == r["config"] and x["algorithm"] == r["algorithm"]
        )
        sent = r["sent"]
        mb = f"{sent.get('next', 0) / 1e6:.2f} / {sent.get('prev', 0) / 1e6:.2f}"
        if r["algorithm"] == "ulysses":
            mb = f"all-to-all {sent.get('other', 0) / 1e6:.2f} (fwd)"
        table.add_row(
            r["config"], r["algorithm"], "[bold]<- auto[/]" if r["auto"] == r["algorithm"] else "", mb,
            f"{r['ms']:.0f}", f"{worst_out:.1e} ({r['err1'][0]:.1e})", f"{worst_dq:.1e} ({r['err1'][1]:.1e})",
        )  # fmt: skip
    console.print(table)
    console.print(
        "Every rank's shard of out and dq is within 2x the single-process bf16 error of the fp64 oracle. "
        "TokenRing sends Q to the previous rank and partial outputs to their owners (both directions); the KV "
        "ring sends K/V one way; Ulysses uses all-to-all."
    )
    console.print("[green]sequence parallelism: every rank matches single-process attention[/]")


if __name__ == "__main__":
    main()
