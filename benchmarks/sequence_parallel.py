"""Sequence-parallel attention: TokenRing vs KV ring vs Ulysses on P ranks, forward and forward+backward.

    python benchmarks/sequence_parallel.py --world-size 4              # spawns 4 local CPU ranks (gloo)
    torchrun --nproc-per-node 4 benchmarks/sequence_parallel.py        # or under torchrun (gloo/NCCL)
    python benchmarks/sequence_parallel.py --world-size 4 --emulate ring --rate auto   # emulated links (root)

``--emulate`` runs the ranks on an emulated cluster (``longmoe.runtime.netem``: one network namespace per
rank, every link direction rate-limited by the kernel), where links rather than cores set the pace. There
it also counts the bytes on every link direction with ``tc -s`` (frames on the wire, so framing included),
and compares the measured pass times with the cost model twice: with the topology ``measure_topology``
detected (what ``algorithm="auto"`` uses) and with the configured one (``emulated_topology``).
``--rate auto`` picks the link rate that makes a KV-ring forward step ``--comm-bound`` times longer to
send than to compute at the smallest S_local, from a quick timing of the attention kernel here.

For MHA and GQA 8:1 over a sweep of S_local it measures the time per ring step (pass time / P), the
compute-only time of the same schedule without communication, the exposed communication (the
difference), the bytes each rank sends per direction (from the exchangers), and which algorithm the
cost model (with a topology measured on this group) picks, against the measured fastest. It also
measures the error of TokenRing with bf16 vs fp32 partial outputs. CSV under benchmarks/results/, a
table, and a PNG.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import RESULTS, run_metadata, write_csv

from longmoe.runtime.netem import TOPOLOGIES

ALGS = ("token_ring", "kv_ring", "ulysses")


def _barrier_time(fn, repeats: int) -> float:
    """Median over repeats of the slowest rank's wall time of fn()."""
    times = []
    fn()  # warm-up (also creates the second process group)
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return statistics.median(times)


def _compute_only(alg, q, k, v, dout, causal, layout, world, rank, backward):
    """The same per-step kernel calls as the algorithm, without any communication."""
    from longmoe.attention import attention_delta, flash_attention_backward, flash_attention_forward
    from longmoe.attention.merge import merge_attention_partials_
    from longmoe.parallel import ShardLayout, ring_schedule

    sl = q.shape[1]
    if alg == "ulysses":
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        qh = torch.randn(b, sl * world, hq // world, d, dtype=q.dtype)
        kvh = torch.randn(b, sl * world, max(hkv // world, 1), d, dtype=q.dtype)
        if not backward:
            flash_attention_forward(qh, kvh, kvh, causal=causal)
        else:  # the backward kernel alone (the forward is timed by the forward call): stand-in out and lse
            lse = torch.zeros(b, hq // world, sl * world)
            flash_attention_backward(torch.randn_like(qh), qh, kvh, kvh, qh, lse, causal=causal)
        return
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[0], q.shape[2], sl), float("-inf"))
    delta = attention_delta(dout, q) if backward else None
    shard = ShardLayout.make(world, layout, seqlen_local=sl)
    for step in ring_schedule(alg, shard, causal, rank, backward=backward):
        if not step.compute:
            continue
        plan = step.compute[0]
        (qa, qe), (ka, ke) = plan.q_rows, plan.kv_rows
        if not backward:
            bo, bl = flash_attention_forward(
                q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], causal=plan.causal, out_dtype=torch.float32
            )
            merge_attention_partials_(out[:, qa:qe], lse[:, :, qa:qe], bo, bl)
        else:
            flash_attention_backward(
                dout[:, qa:qe], q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], None, lse[:, :, qa:qe].nan_to_num(0.0),
                delta=delta[:, :, qa:qe], causal=plan.causal, grad_dtype=torch.float32,
            )  # fmt: skip


def _bench_rank(rank, world, args):
    from longmoe.attention import flash_attention
    from longmoe.parallel import (
        AttentionShape,
        CommStats,
        choose_algorithm,
        communication_bytes,
        kv_ring_attention,
        measure_topology,
        profile_compute,
        shard_sequence,
        token_ring_attention,
        ulysses_attention,
    )
    from longmoe.parallel.planning import emulated_topology
    from longmoe.runtime.netem import read_tx_bytes

    fns = {"token_ring": token_ring_attention, "kv_ring": kv_ring_attention, "ulysses": ulysses_attention}
    dtype = getattr(torch, args.dtype)
    topo = measure_topology(None, kind="detect" if args.emulate else "mesh")
    configured = None
    if args.emulate:
        configured = emulated_topology(
            args.emulate, world, args.rate, inter_rate=args.inter_rate, compute_rate=topo.compute_rate,
            latency=topo.latency, overlap=topo.overlap, comm_overlap=topo.comm_overlap,
            alltoall_bandwidth=topo.alltoall_bandwidth,
        )  # fmt: skip
    rows = []
    progress = None
    points = [(name, hq, hkv, sl) for name, hq, hkv in args.heads for sl in args.seqlens]
    modes = args.modes
    if rank == 0:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task("sequence parallel", total=len(points) * len(ALGS) * len(modes))
    for name, hq, hkv, sl in points:
        g = torch.Generator().manual_seed(sl)
        b, d = args.batch, args.head_dim
        q = torch.randn(b, sl, hq, d, generator=g).to(dtype)
        k = torch.randn(b, sl, hkv, d, generator=g).to(dtype)
        v = torch.randn(b, sl, hkv, d, generator=g).to(dtype)
        dout = torch.randn(b, sl, hq, d, generator=g).to(dtype)
        shape = AttentionShape(
            world_size=world, batch=b, seqlen_local=sl, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=dtype,
            causal=True, layout="zigzag",
        )  # fmt: skip
        measured = {}
        for mode in modes:
            backward = mode == "fwd+bwd"
            # what algorithm="auto" does: links measured once per group, kernel calls timed once per shape
            profile = profile_compute(shape, None, backward=backward)
            chosen, estimates = choose_algorithm(shape, topo, backward=backward, profile=profile)
            chosen_flops, _ = choose_algorithm(shape, topo, backward=backward)
            est_cfg = {}
            if configured is not None:
                _, est_cfg = choose_algorithm(shape, configured, backward=backward, profile=profile)
            for alg in ALGS:
                if alg not in estimates:
                    continue
                fn = fns[alg]
                kw = {"stats": CommStats()}

                def run(fn=fn, kw=kw, mode=mode):
                    kw["stats"].reset()
                    if mode == "fwd":
                        with torch.no_grad():
                            fn(q, k, v, causal=True, check_ranks=False, **kw)
                    else:
                        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                        fn(qq, kk, vv, causal=True, check_ranks=False, **kw).backward(dout)

                tc_before = read_tx_bytes()
                t = _barrier_time(run, args.repeats)
                tc_after = read_tx_bytes()
                tc_mine = {k: (tc_after[k] - tc_before[k]) // (args.repeats + 1) for k in tc_after}
                tc_all: list = [None] * world
                dist.all_gather_object(tc_all, tc_mine)
                tc = {k: v for d in tc_all for k, v in d.items()}

                def compute(alg=alg, mode=mode):
                    _compute_only(alg, q, k, v, dout, True, "zigzag", world, rank, False)
                    if mode == "fwd+bwd":
                        _compute_only(alg, q, k, v, dout, True, "zigzag", world, rank, True)

                t_compute = _barrier_time(compute, args.repeats)
                sent = dict(kw["stats"].bytes_sent)
                if alg == "ulysses":  # its stats count the forward all-to-alls only: bytes from the model
                    sent = {}
                    for bw in (False, True) if mode == "fwd+bwd" else (False,):
                        for label, n in communication_bytes("ulysses", shape, rank, backward=bw).items():
                            sent[label] = sent.get(label, 0) + n
                measured[(mode, alg)] = t
                rows.append(dict(
                    heads=name, heads_q=hq, heads_kv=hkv, seqlen_local=sl, mode=mode, algorithm=alg,
                    step_ms=t / world * 1e3, pass_ms=t * 1e3, compute_ms=t_compute * 1e3,
                    exposed_comm_ms=max(t - t_compute, 0.0) * 1e3, bytes_next=sent.get("next", 0),
                    bytes_prev=sent.get("prev", 0), bytes_other=sent.get("other", 0), chosen=chosen,
                    chosen_flop_rate_model=chosen_flops, estimate_ms=estimates[alg] * 1e3,
                    estimate_configured_ms=est_cfg.get(alg, float("nan")) * 1e3,
                    tc_busiest_link=max(tc, key=tc.get) if tc else "", tc_busiest_MB=max(tc.values(), default=0) / 1e6,
                    tc_total_MB=sum(tc.values()) / 1e6, tc_links=" ".join(f"{k}={v}" for k, v in sorted(tc.items())),
                ))  # fmt: skip
                if progress is not None:
                    progress.advance(task)
        for r in rows:
            if r["seqlen_local"] == sl and r["heads"] == name:
                fastest = min(
                    (a for (m, a) in measured if m == r["mode"]), key=lambda a: measured[(r["mode"], a)]
                )
                r["fastest"] = fastest
    if progress is not None:
        progress.stop()

    # Accuracy of the partial-output transport dtype (TokenRing, causal, the first head config).
    name, hq, hkv = args.heads[0]
    sl = args.seqlens[0]
    g = torch.Generator().manual_seed(1)
    qf, kf, vf = (
        torch.randn(1, sl * world, h, args.head_dim, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)
    )
    ref = shard_sequence(flash_attention(qf, kf, vf, causal=True))
    single = shard_sequence(flash_attention(qf.to(dtype), kf.to(dtype), vf.to(dtype), causal=True))
    acc = {"single_process": (single.double() - ref).abs().max()}
    for pd in (dtype, torch.float32):
        out = token_ring_attention(
            *(shard_sequence(t).to(dtype) for t in (qf, kf, vf)), causal=True, partial_dtype=pd
        )
        acc[f"token_ring_partials_{str(pd).split('.')[-1]}"] = (out.double() - ref).abs().max()
    errs = torch.stack([acc[k] for k in acc]).double()
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    accuracy = dict(zip(acc, errs.tolist(), strict=True))
    return (
        rows,
        accuracy,
        dict(
            kind=topo.kind,
            link_GBps=topo.link_bandwidth / 1e9,
            compute_GFLOPs=topo.compute_rate / 1e9,
            overlap=topo.overlap,
            comm_overlap=topo.comm_overlap if topo.comm_overlap is not None else topo.overlap,
            latency_ms=topo.latency * 1e3,
            alltoall_GBps=(topo.alltoall_bandwidth or 0) / 1e9,
        ),
    )


def _spawned(rank, world, args):
    return _bench_rank(rank, world, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4, help="local ranks to spawn (ignored under torchrun)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=None, help="CSV (default: results/sequence_parallel[_<emulate>_p<P>].csv)"
    )
    ap.add_argument(
        "--heads", nargs="+", choices=("mha", "gqa"), default=["mha", "gqa"], help="MHA 16:16, GQA 16:2"
    )
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    ap.add_argument(
        "--emulate", choices=TOPOLOGIES, default=None, help="run on an emulated cluster of this topology"
    )
    ap.add_argument("--rate", default="auto", help="--emulate: per-direction link rate (tc syntax) or auto")
    ap.add_argument("--inter-rate", default=None, help="--emulate two_nodes: the rate between the nodes")
    ap.add_argument("--comm-bound", type=float, default=3.0, help="--rate auto: how communication-bound")
    args = ap.parse_args()
    heads = {"mha": ("MHA 16:16", 16, 16), "gqa": ("GQA 16:2", 16, 2)}
    args.heads = [heads[h] for h in args.heads]
    if args.out is None:
        suffix = f"_{args.emulate}_p{args.world_size}" if args.emulate else ""
        args.out = RESULTS / f"sequence_parallel{suffix}.csv"
    if args.emulate and args.rate == "auto":
        args.rate = auto_rate(args, world=args.world_size)

    if "RANK" in os.environ:  # torchrun
        from longmoe.runtime import init_from_env

        rank, world = init_from_env()
        rows, accuracy, topo = _bench_rank(rank, world, args)
        if rank != 0:
            return
    elif args.emulate:
        from longmoe.runtime.netem import EmulatedCluster, netns_unavailable_reason

        reason = netns_unavailable_reason()
        if reason is not None:
            raise SystemExit(f"--emulate: {reason}")
        world = args.world_size
        with EmulatedCluster(
            world_size=world, topology=args.emulate, rate=args.rate, inter_rate=args.inter_rate
        ) as cluster:
            print(f"[netem] {cluster.describe()}")
            rows, accuracy, topo = cluster.spawn(_spawned, args, timeout_s=5400)[0]
    else:
        from longmoe.runtime import spawn

        world = args.world_size
        rows, accuracy, topo = spawn(_spawned, world, args, timeout_s=3000)[0]
    report(rows, accuracy, topo, world, args)


def auto_rate(args, world: int) -> str:
    """A link rate (tc syntax) at which a KV-ring forward step at the smallest S_local takes
    ``args.comm_bound`` times longer to send than to compute, with this machine's cores shared by
    ``world`` ranks."""
    from longmoe.attention import flash_attention_forward
    from longmoe.runtime.netem import wire_rate

    sl, d, dtype = min(args.seqlens), args.head_dim, getattr(torch, args.dtype)
    _, hq, hkv = args.heads[0]
    q, k = torch.randn(args.batch, sl, hq, d).to(dtype), torch.randn(args.batch, sl, hkv, d).to(dtype)
    flash_attention_forward(q, k, k)
    t0 = time.perf_counter()
    flash_attention_forward(q, k, k)
    t = (time.perf_counter() - t0) * max(1.0, world / (os.cpu_count() or 1))
    kv_bytes = 2 * args.batch * sl * hkv * d * torch.finfo(dtype).bits // 8
    return f"{max(int(wire_rate(kv_bytes / (t * args.comm_bound)) / 1e6), 1)}mbit"


def report(rows, accuracy, topo, world, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    meta = run_metadata(world_size=world, dtype=args.dtype, head_dim=args.head_dim, batch=args.batch,
                        emulate=args.emulate or "loopback", rate=args.rate if args.emulate else "", **topo)  # fmt: skip
    for r in rows:
        base = next(x for x in rows if x["heads"] == r["heads"] and x["seqlen_local"] == r["seqlen_local"]
                    and x["mode"] == r["mode"] and x["algorithm"] == "kv_ring")  # fmt: skip
        r["ratio_vs_ring"] = r["pass_ms"] / base["pass_ms"]
        r.update(meta)
    write_csv(rows, args.out)
    where = (
        f"emulated {args.emulate} at {args.rate} per direction (detected: {topo['kind']})"
        if args.emulate
        else "loopback"
    )
    table = Table(title=f"Sequence-parallel attention, {world} CPU ranks (gloo), {where}, {args.dtype}, causal zigzag, "
                  f"D={args.head_dim}; measured link {topo['link_GBps']:.3f} GB/s, compute {topo['compute_GFLOPs']:.0f} GFLOP/s per rank, "
                  f"overlap {topo['overlap']:.2f} (comm {topo['comm_overlap']:.2f}), latency {topo['latency_ms']:.2f} ms, all-to-all {topo['alltoall_GBps']:.2f} GB/s")  # fmt: skip
    cols = ["heads", "S_local", "mode", "algorithm", "ms/step", "pass ms", "model ms", "compute-only ms",
            "exposed comm ms", "MB sent next/prev/other", "vs ring", "model's pick", "fastest"]  # fmt: skip
    if args.emulate:
        cols[7:7] = ["model ms (configured)"]
        cols += ["busiest link (tc)", "MB on it"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        mb = "/".join(f"{r[k] / 1e6:.1f}" for k in ("bytes_next", "bytes_prev", "bytes_other"))
        style = "green" if r["ratio_vs_ring"] <= 0.7 else ("red" if r["ratio_vs_ring"] > 1.0 else "")
        ok = "" if r["chosen"] == r["fastest"] else "[red]"
        cells = [
            r["heads"], str(r["seqlen_local"]), r["mode"], r["algorithm"], f"{r['step_ms']:.1f}",
            f"{r['pass_ms']:.1f}", f"{r['estimate_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['exposed_comm_ms']:.1f}", mb,
            f"[{style}]{r['ratio_vs_ring']:.2f}x[/]" if style else f"{r['ratio_vs_ring']:.2f}x",
            f"{ok}{r['chosen']}", r["fastest"],
        ]  # fmt: skip
        if args.emulate:
            cells[7:7] = [f"{r['estimate_configured_ms']:.1f}"]
            cells += [r["tc_busiest_link"], f"{r['tc_busiest_MB']:.1f}"]
        table.add_row(*cells)
    console.print(table)
    # How the selector did: per (heads, S_local, mode), the pick's measured time vs the fastest's.
    cases = {}
    for r in rows:
        cases.setdefault((r["heads"], r["seqlen_local"], r["mode"]), {})[r["algorithm"]] = r
    picks = {"profiled model": "chosen", "FLOP-rate model": "chosen_flop_rate_model"}
    for label, col in picks.items():
        slow = [c[next(iter(c))][col] and c[c[next(iter(c))][col]]["pass_ms"] / min(x["pass_ms"] for x in c.values())
                for c in cases.values()]  # fmt: skip
        console.print(
            f"{label}: picked the measured fastest in {sum(x == 1.0 for x in slow)}/{len(slow)} cases, within 5% in "
            f"{sum(x <= 1.05 for x in slow)}/{len(slow)}; worst pick {max(slow):.2f}x the fastest"
        )
    for label, col in (
        ("measured topology", "estimate_ms"),
        ("configured topology", "estimate_configured_ms"),
    ):
        errs = [r[col] / r["pass_ms"] - 1 for r in rows if r[col] == r[col]]
        if errs:
            console.print(
                f"model ({label}) vs measured pass time: within 15% in {sum(abs(e) <= 0.15 for e in errs)}/"
                f"{len(errs)}, median error {statistics.median(abs(e) for e in errs):.0%}, worst {max(errs, key=abs):+.0%}"
            )
    console.print(
        f"max |out - fp64| ({args.dtype} inputs, causal):", {k: f"{v:.2e}" for k, v in accuracy.items()}
    )
    console.print(f"CSV: {args.out}")
    plot(rows, args.out.with_suffix(".png"), world)
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, path: Path, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({r["heads"] for r in rows})
    modes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(len(heads), len(modes), figsize=(10, 3.6 * len(heads)), squeeze=False)
    for i, h in enumerate(heads):
        for j, m in enumerate(modes):
            ax = axes[i][j]
            for alg, style in zip(ALGS, ("o-", "s--", "^:"), strict=True):
                pts = sorted((r["seqlen_local"], r["step_ms"], r["compute_ms"] / world) for r in rows
                             if r["heads"] == h and r["mode"] == m and r["algorithm"] == alg)  # fmt: skip
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{alg} step")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{h}, {m}, P={world}", fontsize=9)
            ax.set_xlabel("S_local")
            ax.set_ylabel("ms per ring step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
