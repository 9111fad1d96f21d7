"""Attention core on CPU: longmoe's native C++ kernel vs torch SDPA (its CPU flash kernel), fwd and bwd.

    python benchmarks/attention_core.py                       # S in 2K..16K, D=128, fp32+bf16, causal+full
    python benchmarks/attention_core.py --seqlens 1024 2048 --repeats 1   # quick look

Writes one CSV row per (provider, dtype, causal, seqlen, mode) to benchmarks/results/attention_core.csv,
prints a table with GFLOP/s and the ratio to SDPA measured in the same run, saves a PNG plot beside the CSV,
and prints this machine's single-core and all-core fp32 GEMM GFLOP/s as the roofline reference.

FLOPs (flash-attention's convention): forward 4*B*H*Sq*Sk*D (two GEMMs), halved for causal; backward
2.5x forward (five GEMMs instead of two).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, run_metadata, timeit, write_csv
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import longmoe
from longmoe.attention import flash_attention_backward, flash_attention_forward


def flops(b: int, h: int, s: int, d: int, causal: bool, mode: str) -> float:
    f = 4.0 * b * h * s * s * d / (2 if causal else 1)
    return f if mode == "fwd" else 2.5 * f


def gemm_gflops(threads: int, n: int = 2048) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = timeit(lambda: a @ b, 5)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / t / 1e9


def providers(q, k, v, causal):
    """name -> (forward thunk, backward thunk). Each provider gets its preferred memory layout."""
    dout = torch.randn_like(q)
    out, lse = flash_attention_forward(q, k, v, causal=causal, backend="native")
    ours = (
        lambda: flash_attention_forward(q, k, v, causal=causal, backend="native"),
        lambda: flash_attention_backward(dout, q, k, v, out, lse, causal=causal, backend="native"),
    )
    # SDPA wants (B, H, S, D); give it contiguous tensors so the baseline is not charged for a copy.
    qt, kt, vt, dt_ = (x.transpose(1, 2).contiguous() for x in (q, k, v, dout))
    so, sl = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal)
    sdpa = (
        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
        # What autograd runs for SDPA's backward on CPU, called directly (no graph overhead charged).
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dt_, qt, kt, vt, so, sl, 0.0, causal
        ),
    )
    return {"longmoe-native": ours, "torch-sdpa": sdpa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--causal", nargs="+", default=["false", "true"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_core.csv")
    args = ap.parse_args()

    console = Console()
    if not longmoe.runtime.native_available():
        raise SystemExit("longmoe._C is not built: run `make venv` first")
    threads = torch.get_num_threads()
    roof1, roofn = gemm_gflops(1), gemm_gflops(threads)
    console.print(
        f"[bold]Roofline[/] fp32 GEMM 2048^3: {roof1:.1f} GFLOP/s on 1 core, {roofn:.1f} GFLOP/s on {threads} threads"
    )
    meta = run_metadata()

    points = [(dtn, c == "true", s) for dtn in args.dtypes for c in args.causal for s in args.seqlens]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("attention core", total=len(points) * 4)
        for dtype_name, causal, s in points:
            dtype = getattr(torch, dtype_name)
            b, h, d = args.batch, args.heads, args.head_dim
            q, k, v = (torch.randn(b, s, h, d, dtype=dtype) for _ in range(3))
            for name, (fwd, bwd) in providers(q, k, v, causal).items():
                for mode, fn in (("fwd", fwd), ("bwd", bwd)):
                    progress.update(task, description=f"{name} {dtype_name} causal={causal} S={s} {mode}")
                    t = timeit(fn, args.repeats)
                    rows.append(
                        dict(
                            provider=name,
                            dtype=dtype_name,
                            causal=causal,
                            batch=b,
                            heads=h,
                            seqlen=s,
                            head_dim=d,
                            mode=mode,
                            ms=t * 1e3,
                            gflops=flops(b, h, s, d, causal, mode) / t / 1e9,
                            gemm_roof_1core=roof1,
                            gemm_roof_all=roofn,
                            **meta,
                        )  # fmt: skip
                    )
                    progress.advance(task)
    for r in rows:
        base = next(
            x for x in rows
            if x["provider"] == "torch-sdpa" and all(x[f] == r[f] for f in ("dtype", "causal", "seqlen", "mode"))
        )  # fmt: skip
        r["ratio_vs_sdpa"] = r["gflops"] / base["gflops"]

    write_csv(rows, args.out)

    table = Table(
        title=f"Attention core, CPU ({meta['machine']}, {threads} threads, B={args.batch} H={args.heads} D={args.head_dim})"
    )
    for col in ("dtype", "causal", "S", "mode", "native GFLOP/s", "SDPA GFLOP/s", "native / SDPA"):
        table.add_column(col, justify="right")
    for r in rows:
        if r["provider"] != "longmoe-native":
            continue
        base = r["gflops"] / r["ratio_vs_sdpa"]
        ratio = r["ratio_vs_sdpa"]
        style = "green" if ratio >= 0.9 else "red"
        table.add_row(
            r["dtype"], str(r["causal"]), str(r["seqlen"]), r["mode"], f"{r['gflops']:.1f}", f"{base:.1f}",
            f"[{style}]{ratio:.2f}x[/]",
        )  # fmt: skip
    console.print(table)
    console.print(f"CSV: {args.out}")
    plot(rows, args.out.with_suffix(".png"), roofn)
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, path: Path, roof: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["dtype"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(2, len(combos), figsize=(4.2 * len(combos), 7), squeeze=False)
    for col, (dtn, causal) in enumerate(combos):
        for row, mode in enumerate(("fwd", "bwd")):
            ax = axes[row][col]
            for prov, marker in (("longmoe-native", "o-"), ("torch-sdpa", "s--")):
                pts = sorted(
                    (r["seqlen"], r["gflops"]) for r in rows
                    if r["provider"] == prov and r["dtype"] == dtn and r["causal"] == causal and r["mode"] == mode
                )  # fmt: skip
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=prov)
            ax.axhline(roof, color="grey", lw=0.8, ls=":", label="fp32 GEMM (all cores)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} {dtn} {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("GFLOP/s")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
