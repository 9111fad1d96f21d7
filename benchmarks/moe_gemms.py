"""The six expert GEMMs of a SwiGLU MoE layer, one by one: longmoe's grouped op vs the equal-shape dense GEMM.

    python benchmarks/moe_gemms.py                                   # bf16 and fp32, 2K tokens (about 3 min)
    python benchmarks/moe_gemms.py --dtype bfloat16 --tokens 2048 8192 --shapes 64:8:256

What limits a fine-grained MoE layer once routing is vectorised is its expert GEMMs; this splits them. For each
shape ``E:k:F`` (hidden ``--hidden``), with the routing of MoELayer's own router on random tokens (N = T * k
rows), it times the calls the CPU layer makes (``torch.ops.longmoe.moe_grouped_mm``, operands and layouts as
``GroupedExperts.forward_tokens`` and its backward pass them):

  fc1 fwd   h = x_e w1_e^T           (N, H) -> (N, 2F), x's rows gathered inside the op (src_slot)
  fc2 fwd   y = a_e w2_e^T           (N, F) -> (N, H)   (the layer also folds the combine into this GEMM)
  fc2 dx    U = g_e w2_e             (N, H) -> (N, F)
  fc2 dw    dw2_e = g_e^T (p a)_e    (E, H, F)
  fc1 dx    dx = dh_e w1_e           (N, 2F) -> (N, H)
  fc1 dw    dw1_e = dh_e^T x_e       (E, 2F, H), x's rows gathered inside the op

against two references measured in the same run, interleaved round-robin:

  dense     the same GEMM with one weight for all N rows (the equal-FLOP roofline the layer benchmark uses)
  stream    the expert weights' bytes through memory once: reading them (a sum over ``w``) for fwd and dx,
            writing them (``fill_`` of an (E, out, in) buffer) for dw. A dense GEMM of the same FLOPs touches
            k / E of these bytes; the grouped GEMM must move all of them, so ``dense + stream`` is its time if
            the traffic does not overlap the arithmetic, and ``max(dense, stream)`` if it overlaps perfectly.

Writes benchmarks/results/moe_gemms.csv (one row per dtype x shape x tokens x GEMM), prints a table, and saves
benchmarks/results/moe_gemms.png. One thread (--threads), as benchmarks/moe.py, for the reasons given there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from common import RESULTS, interleaved, run_metadata, write_csv
from moe import add_run_args, make_layer, point_fields, start_run
from rich.console import Console
from rich.progress import track
from rich.table import Table

from longmoe.moe import MoEConfig, moe_dispatch_map
from longmoe.moe.experts import _dx_operand

SHORT = {"bfloat16": "bf16", "float32": "fp32"}
GEMMS = ("fc1 fwd", "fc2 fwd", "fc2 dx", "fc2 dw", "fc1 dx", "fc1 dw")


def gemm_thunks(layer, x: torch.Tensor) -> tuple[dict, dict, dict, int]:
    """(grouped, dense, stream) thunks per GEMM name and the routed row count N, for layer's routing of x."""
    cfg = layer.config
    e, k, f = cfg.num_experts, cfg.top_k, cfg.ffn_hidden_size
    with torch.no_grad():
        route = layer.router(x)
    dmap = moe_dispatch_map(route.expert_ids, e)
    counts = dmap.tokens_per_expert.tolist()
    src = dmap.src_slot
    n = sum(counts)
    w1, w2 = layer.experts.linear_fc1.detach(), layer.experts.linear_fc2.detach()
    if w1.dim() != 3 or w1.shape[1] != 2 * f:
        raise SystemExit(
            f"expected stacked SwiGLU expert weights (E, 2F, H); got linear_fc1 {tuple(w1.shape)}"
        )
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(x.dtype)  # noqa: E731
    xr = x[src // k]  # the gathered rows, for the dense references
    a, g, dh = rnd(n, f), rnd(n, cfg.hidden_size), rnd(n, 2 * f)
    w1x, w2x = _dx_operand(w1), _dx_operand(w2)
    mg = torch.ops.longmoe.moe_grouped_mm
    grouped = {
        "fc1 fwd": lambda: mg(x, w1, counts, 0, src, k),
        "fc2 fwd": lambda: mg(a, w2, counts, 0),
        "fc2 dx": lambda: mg(g, w2x, counts, 1),
        "fc2 dw": lambda: mg(g, a, counts, 2),
        "fc1 dx": lambda: mg(dh, w1x, counts, 1),
        "fc1 dw": lambda: mg(dh, x, counts, 2, src, k, True),
    }
    d1, d2, d1x, d2x = w1[0], w2[0], w1x[0], w2x[0]
    dense = {
        "fc1 fwd": lambda: F.linear(xr, d1),
        "fc2 fwd": lambda: F.linear(a, d2),
        "fc2 dx": lambda: g @ d2x,
        "fc2 dw": lambda: g.t() @ a,
        "fc1 dx": lambda: dh @ d1x,
        "fc1 dw": lambda: dh.t() @ xr,
    }
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    # Reading: an int32 sum over the weights' bytes (vectorised, memory-bound; a float sum of bf16 converts
    # first and ran at 1-9 GB/s here). Writing: fill_ of a buffer of the weights' size.
    b1, b2 = (w.reshape(-1).view(torch.int32) for w in (w1, w2))
    read1, read2 = (lambda: b1.sum(dtype=torch.int32)), (lambda: b2.sum(dtype=torch.int32))
    stream = {
        "fc1 fwd": read1,
        "fc2 fwd": read2,
        "fc2 dx": read2,
        "fc2 dw": lambda: dw2.fill_(0.5),
        "fc1 dx": read1,
        "fc1 dw": lambda: dw1.fill_(0.5),
    }
    return grouped, dense, stream, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(
        ap, tokens=[2048], dtypes=["bfloat16", "float32"], repeats=5, threads_help=None, keep_help=""
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "moe_gemms.csv")
    args = ap.parse_args()

    console = Console()
    start_run(args)
    rows = []
    points = [(d, s, t) for d in args.dtype for t in args.tokens for s in args.shapes]
    for dtype_name, (experts, top_k, ffn), tokens in track(
        points, description="expert GEMMs", console=console
    ):
        dtype = getattr(torch, dtype_name)
        cfg = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=ffn, num_experts=experts, top_k=top_k)
        layer = make_layer(cfg, dtype)
        torch.manual_seed(tokens)
        x = torch.randn(tokens, args.hidden, dtype=dtype)
        grouped, dense, stream, n = gemm_thunks(layer, x)
        thunks = {(p, name): fn for p, d in (("grouped", grouped), ("dense", dense), ("stream", stream))
                  for name, fn in d.items()}  # fmt: skip
        interleaved(thunks, 2)  # warm-up rounds: first touches of fresh memory fault in pages on this VM
        times = interleaved(thunks, args.repeats)
        meta = run_metadata(load_avg_1min=round(os.getloadavg()[0], 2), keep_cpu_memory=args.keep_cpu_memory)
        weight_elems = {"fc1": 2 * ffn * args.hidden * experts, "fc2": ffn * args.hidden * experts}
        for name in GEMMS:
            t_g, t_d, t_s = (times[(p, name)] for p in ("grouped", "dense", "stream"))
            gflop = 2.0 * n * 2 * ffn * args.hidden / (2 if name.startswith("fc2") else 1) / 1e9
            rows.append(
                dict(
                    **point_fields(dtype_name, experts, top_k, args.hidden, ffn, tokens),
                    rows=n,
                    gemm=name,
                    grouped_ms=t_g * 1e3,
                    dense_ms=t_d * 1e3,
                    stream_ms=t_s * 1e3,
                    weight_mb=weight_elems[name[:3]] * torch.finfo(dtype).bits / 8 / 1e6,
                    grouped_gflops=gflop / t_g,
                    dense_gflops=gflop / t_d,
                    ratio_vs_dense=t_d / t_g,
                    ratio_vs_no_overlap=(t_d + t_s) / t_g,
                    ratio_vs_overlap=max(t_d, t_s) / t_g,
                    **meta,
                )  # fmt: skip
            )
        write_csv(rows, args.out)
        plot(rows, args.out.with_suffix(".png"))

    table = Table(
        title=f"Expert GEMMs, CPU ({rows[0]['machine']}, {args.threads} thread(s), H={args.hidden})"
    )
    for col in ("dtype", "E:k:F", "T", "GEMM", "weights MB", "grouped ms", "dense ms", "stream ms", "vs dense",
                "vs dense+stream"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            SHORT[r["dtype"]], r["shape"], str(r["tokens"]), r["gemm"], f"{r['weight_mb']:.0f}", f"{r['grouped_ms']:.2f}",
            f"{r['dense_ms']:.2f}", f"{r['stream_ms']:.2f}", f"{r['ratio_vs_dense']:.2f}x",
            f"{r['ratio_vs_no_overlap']:.2f}x",
        )  # fmt: skip
    console.print(table)
    sums = {}
    for r in rows:
        s = sums.setdefault((r["dtype"], r["shape"], r["tokens"]), [0.0, 0.0, 0.0])
        s[0] += r["grouped_ms"]
        s[1] += r["dense_ms"]
        s[2] += r["stream_ms"]
    total = Table(title="All six GEMMs (ms): grouped vs dense, and dense + the weights' traffic")
    for col in (
        "dtype",
        "E:k:F",
        "tokens",
        "grouped",
        "dense",
        "dense + stream",
        "vs dense",
        "vs dense+stream",
    ):
        total.add_column(col, justify="right")
    for (d, s, t), (g, de, st) in sums.items():
        total.add_row(
            SHORT[d],
            s,
            str(t),
            f"{g:.1f}",
            f"{de:.1f}",
            f"{de + st:.1f}",
            f"{de / g:.2f}x",
            f"{(de + st) / g:.2f}x",
        )
    console.print(total)
    console.print(f"CSV: {args.out}")
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, path: Path) -> None:
    """One panel per dtype x tokens: per shape and GEMM, grouped / dense / dense+stream times."""
    panels = sorted({(r["dtype"], r["tokens"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for ax, (d, t) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in rows if r["dtype"] == d and r["tokens"] == t]
        labels = [f"{r['shape']}\n{r['gemm']}" for r in sel]
        xs = range(len(sel))
        ax.bar([i - 0.27 for i in xs], [r["grouped_ms"] for r in sel], 0.27, label="grouped (longmoe)")
        ax.bar(list(xs), [r["dense_ms"] for r in sel], 0.27, label="dense, same FLOPs")
        ax.bar([i + 0.27 for i in xs], [r["dense_ms"] + r["stream_ms"] for r in sel], 0.27,
               label="dense + expert weights through memory")  # fmt: skip
        ax.set_xticks(list(xs), labels, fontsize=6)
        ax.set_ylabel("ms")
        ax.set_title(f"{d}, {t} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
