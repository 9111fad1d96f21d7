"""longmoe demo: the attention core on CPU, then attention over a KV cache sharded across local ranks.

    python examples/demo.py --world-size 2

1. Attention core: long-context causal GQA attention (bf16, 8K tokens) forward + backward with the native
   C++ kernel, next to torch SDPA in the same run, and its error against an fp64 oracle.
2. Sharded keys: ``world_size`` real processes on gloo each hold one chunk of K/V; every rank computes its
   partial (out, lse) for all queries, the partials travel around the ring through ``P2PExchanger``
   (timeouts, byte accounting) and are merged with the stable LSE update. Each rank's result is checked
   against single-process attention. (TokenRing, which moves Q instead and uses both link directions,
   replaces this ring in the next issue.)

Everything runs on random tensors; no model or data is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import longmoe
from longmoe.attention import flash_attention, flash_attention_ref, merge_attention_partials
from longmoe.runtime import P2PExchanger, native_build_info, spawn


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


def sharded_rank(rank: int, world: int, seqlen: int, seed: int):
    """One rank: its K/V chunk, its partial for all queries, then a ring of partials merged locally."""
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = 1, 8, 2, 64
    q = torch.randn(b, seqlen, hq, d, generator=gen)
    k = torch.randn(b, seqlen, hkv, d, generator=gen)
    v = torch.randn(b, seqlen, hkv, d, generator=gen)
    bounds = [seqlen * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    t0 = time.perf_counter()
    part_out, part_lse = flash_attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
    out, lse = part_out.float(), part_lse
    ex = P2PExchanger(timeout_s=60, name="demo-ring")
    send_out, send_lse = part_out.float(), part_lse
    for step in range(world - 1):
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        recv_out = ex.send_recv(send_out, dst=nxt, src=prv, step=step)
        recv_lse = ex.send_recv(send_lse, dst=nxt, src=prv, step=step)
        ex.commit()
        ex.wait()
        out, lse = merge_attention_partials(out, lse, recv_out, recv_lse)
        send_out, send_lse = recv_out, recv_lse
    elapsed = time.perf_counter() - t0
    full, full_lse = flash_attention_ref(q.double(), k.double(), v.double())
    err = float((out.double() - full).abs().max())
    err_lse = float((lse.double() - full_lse).abs().max())
    assert err < 1e-4 and err_lse < 1e-4, f"rank {rank}: merged result differs from single-process: {err:.2e}"
    return dict(
        rank=rank,
        keys=f"[{lo}, {hi})",
        err=err,
        err_lse=err_lse,
        ms=elapsed * 1e3,
        sent=dict(ex.bytes_sent),
        received=dict(ex.bytes_received),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=8192, help="sequence length of the attention-core run")
    ap.add_argument("--sharded-seqlen", type=int, default=3001, help="sequence length of the sharded run")
    args = ap.parse_args()

    console = Console()
    info = native_build_info()
    console.rule(
        f"longmoe {longmoe.__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads"
    )
    console.print(
        f"native kernels: {'built' if info else 'NOT built (reference backend)'} {info.get('isa', '')}"
        f"{', BLAS sgemm' if info.get('blas_sgemm') else ''}"
    )
    attention_core(console, args.seqlen)

    console.rule(f"Keys sharded over {args.world_size} local CPU ranks (gloo), partials merged around a ring")
    results = spawn(sharded_rank, args.world_size, args.sharded_seqlen, 1234, timeout_s=300)
    table = Table()
    for col in (
        "rank",
        "local keys",
        "bytes sent (next)",
        "bytes received",
        "max |out - 1-proc|",
        "max |lse - 1-proc|",
        "ms",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["rank"]), r["keys"], f"{r['sent'].get('next', 0):,}", f"{sum(r['received'].values()):,}",
            f"{r['err']:.1e}", f"{r['err_lse']:.1e}", f"{r['ms']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print("[green]demo finished: every rank matches single-process attention[/]")


if __name__ == "__main__":
    main()
