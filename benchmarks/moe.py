"""MoE layer on CPU: longmoe's MoELayer vs a naive per-expert loop vs equal-FLOP dense GEMMs, and on 2 EP ranks.

    python benchmarks/moe.py                                   # 8 experts, top-2, H=1024, F=2816, 2K and 8K tokens, bf16
    python benchmarks/moe.py --tokens 2048 --repeats 1         # a quick look
    python benchmarks/moe.py --dtype float32

Providers (same weights, same routing):
  longmoe        MoELayer: fp32 router, C++ permute, torch._grouped_mm experts, C++ unpermute+combine
  naive-loop     per-expert Python loop: index_select the expert's tokens, MLP, index_add the weighted output back
  dense-gemm     the GEMMs of the same FLOPs with no routing at all (the roofline): (N,H)x(H,2F) and (N,F)x(F,H)
                 forward, plus the four gradient GEMMs for fwd+bwd, N = tokens * top_k
  longmoe-ep2    MoELayer with experts sharded over 2 gloo ranks (spawn), each with half the tokens and one thread
                 (the same two cores as the single-process providers); time of the slower rank

FLOPs: forward 6 * N * H * F (SwiGLU: 2*N*H*2F + 2*N*F*H); fwd+bwd 3x forward. Ratios are to dense-gemm and
naive-loop measured in the same run. The forward time split (router / permute / all-to-all / experts /
unpermute) runs the layer's stages one by one with timers. The single-process providers are timed round-robin
(median of --repeats rounds), so load from other processes hits them alike; the 2-rank run is timed separately.

Writes benchmarks/results/moe.csv (one row per provider x tokens x mode, with machine, versions and timestamp),
prints a table, saves benchmarks/results/moe.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import RESULTS, interleaved, run_metadata, timeit, write_csv
from rich.console import Console
from rich.table import Table

import longmoe
from longmoe.moe import MoEConfig, MoELayer, moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.runtime import spawn

STAGES = ("router", "permute", "all-to-all", "experts", "unpermute")


def flops(tokens: int, cfg: MoEConfig, mode: str) -> float:
    f = 6.0 * tokens * cfg.top_k * cfg.hidden_size * cfg.ffn_hidden_size
    return f if mode == "fwd" else 3 * f


def make_layer(cfg: MoEConfig, dtype: torch.dtype, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(cfg, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.mul_(5.0)  # a router that is not uniform: realistic, unequal expert loads
    return layer


# ------------------------------------------------------------------------------------------------- providers
def naive_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per-expert loop with index_select / index_add (what most reference implementations do)."""
    cfg = layer.config
    logits = x.float() @ layer.router.weight.float().t()
    top, ids = torch.topk(torch.softmax(logits, -1), cfg.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    fc1, fc2, f = layer.experts.linear_fc1, layer.experts.linear_fc2, cfg.ffn_hidden_size
    for e in range(cfg.num_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x.index_select(0, tok) @ fc1[e].t()
        y = (F.silu(h[:, :f]) * h[:, f:]) @ fc2[e].t()
        out = out.index_add(0, tok, (y * top[tok, slot, None]).to(x.dtype))
    return out


def providers(layer: MoELayer, x: torch.Tensor) -> dict:
    """name -> {mode: thunk}."""
    cfg = layer.config
    n, h, f = x.shape[0] * cfg.top_k, cfg.hidden_size, cfg.ffn_hidden_size
    dout = torch.randn_like(x)
    xg = x.detach().requires_grad_(True)

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            out = fn(xg)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dout)

        return run

    a, w1 = torch.randn(n, h, dtype=x.dtype), torch.randn(h, 2 * f, dtype=x.dtype)
    b, w2 = torch.randn(n, f, dtype=x.dtype), torch.randn(f, h, dtype=x.dtype)
    dh, dy = torch.randn(n, 2 * f, dtype=x.dtype), torch.randn(n, h, dtype=x.dtype)

    def dense_fwd():
        a @ w1
        b @ w2

    def dense_fwd_bwd():
        dense_fwd()
        dh @ w1.t()
        a.t() @ dh
        dy @ w2.t()
        b.t() @ dy

    with torch.no_grad():
        moe_fwd = lambda: layer(x)
        naive_fwd = lambda: naive_forward(layer, x)
    return {
        "longmoe": {"fwd": lambda: _no_grad(moe_fwd), "fwd+bwd": fwd_bwd(layer)},
        "naive-loop": {
            "fwd": lambda: _no_grad(naive_fwd),
            "fwd+bwd": fwd_bwd(lambda t: naive_forward(layer, t)),
        },
        "dense-gemm": {"fwd": dense_fwd, "fwd+bwd": dense_fwd_bwd},
    }


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def stage_split(layer: MoELayer, x: torch.Tensor, repeats: int, sync=None) -> dict[str, float]:
    """Forward time per stage (seconds, median), running MoELayer.forward's steps one at a time."""
    cfg, times = layer.config, {s: [] for s in STAGES}
    marks: list[tuple[str | None, float]] = []

    def mark(stage):
        if sync:
            sync()
        marks.append((stage, time.perf_counter()))

    with torch.no_grad():
        for i in range(repeats + 1):
            marks.clear()
            mark(None)
            route = layer.router(x)
            mark("router")
            dmap = moe_dispatch_map(route.expert_ids, cfg.num_experts)
            rows = moe_permute(x, dmap)
            mark("permute")
            if layer.dispatcher is None:
                y = layer.experts(rows, dmap.tokens_per_expert)
                mark("experts")
            else:
                local, counts, state = layer.dispatcher.dispatch(rows, dmap.tokens_per_expert)
                mark("all-to-all")
                y_local = layer.experts(local, counts)
                mark("experts")
                y = layer.dispatcher.combine(y_local, state)
                mark("all-to-all")
            moe_unpermute(y, dmap, route.probs)
            mark("unpermute")
            if i == 0:
                continue  # warm-up
            per = dict.fromkeys(STAGES, 0.0)
            for (_, t0), (stage, t1) in zip(marks, marks[1:], strict=False):
                per[stage] += t1 - t0
            for s in STAGES:
                times[s].append(per[s])
    return {s: statistics.median(v) for s, v in times.items()}


def _ep_rank(rank: int, world: int, cfg_kw: dict, dtype_name: str, tokens: int, repeats: int) -> dict:
    dtype = getattr(torch, dtype_name)
    cfg = MoEConfig(**cfg_kw, expert_parallel_group=dist.group.WORLD)
    full = make_layer(MoEConfig(**cfg_kw), dtype)
    layer = MoELayer(cfg, dtype=dtype)
    layer.load_state_dict(full.state_dict())
    del full
    torch.manual_seed(1 + rank)
    x = torch.randn(tokens // world, cfg.hidden_size, dtype=dtype)
    dout = torch.randn_like(x)
    barrier = dist.barrier

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_(True)
        layer(xg)[0].backward(dout)

    out = {"fwd": timeit(fwd, repeats, barrier), "fwd+bwd": timeit(fwd_bwd, repeats, barrier)}
    out["split"] = stage_split(layer, x, repeats, barrier)
    return out


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-ep", action="store_true", help="skip the 2-rank expert-parallel provider")
    ap.add_argument("--out", type=Path, default=RESULTS / "moe.csv")
    args = ap.parse_args()

    console = Console()
    if not longmoe.runtime.native_available():
        raise SystemExit("longmoe._C is not built: run `make venv` first")
    dtype = getattr(torch, args.dtype)
    cfg_kw = dict(
        hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k
    )
    cfg = MoEConfig(**cfg_kw)
    threads = torch.get_num_threads()
    meta = run_metadata()
    layer = make_layer(cfg, dtype)
    rows, splits = [], {}
    for tokens in args.tokens:
        torch.manual_seed(tokens)
        x = torch.randn(tokens, args.hidden, dtype=dtype)
        with torch.no_grad():
            counts = layer(x)[1].tokens_per_expert.tolist()
        console.print(f"T={tokens}: tokens per expert {counts}")
        times = interleaved(
            {(n, m): fn for n, modes in providers(layer, x).items() for m, fn in modes.items()}, args.repeats
        )
        for (name, mode), t in times.items():
            console.print(f"  {name} {mode}: {t * 1e3:.0f} ms")
        splits[("longmoe", tokens)] = stage_split(layer, x, args.repeats)
        if not args.no_ep:
            console.print("  longmoe-ep2 (spawn 2 gloo ranks) ...", end="")
            res = spawn(_ep_rank, 2, cfg_kw, args.dtype, tokens, args.repeats, timeout_s=900.0)
            for mode in ("fwd", "fwd+bwd"):
                times[("longmoe-ep2", mode)] = max(r[mode] for r in res)
            splits[("longmoe-ep2", tokens)] = {s: max(r["split"][s] for r in res) for s in STAGES}
            console.print(
                f" {times[('longmoe-ep2', 'fwd')] * 1e3:.0f} / {times[('longmoe-ep2', 'fwd+bwd')] * 1e3:.0f} ms"
            )
        for (name, mode), t in times.items():
            split = splits.get((name, tokens), {}) if mode == "fwd" else {}
            rows.append(
                dict(
                    provider=name,
                    dtype=args.dtype,
                    tokens=tokens,
                    mode=mode,
                    experts=args.experts,
                    top_k=args.top_k,
                    hidden=args.hidden,
                    ffn=args.ffn,
                    ms=t * 1e3,
                    tokens_per_s=tokens / t,
                    gflops=flops(tokens, cfg, mode) / t / 1e9,
                    ratio_vs_dense=times[("dense-gemm", mode)] / t,
                    ratio_vs_naive=times[("naive-loop", mode)] / t,
                    **{f"fwd_ms_{s}": split.get(s, float("nan")) * 1e3 for s in STAGES},
                    **meta,
                )  # fmt: skip
            )

    write_csv(rows, args.out)

    table = Table(
        title=f"MoE layer, CPU ({meta['machine']}, {threads} threads, {args.dtype}, E={args.experts} top-{args.top_k} "
        f"H={args.hidden} F={args.ffn})"
    )
    for col in ("tokens", "mode", "provider", "ms", "tokens/s", "GFLOP/s", "vs dense", "vs naive"):
        table.add_column(col, justify="right")
    for r in rows:
        good = r["provider"] != "longmoe" or (r["ratio_vs_dense"] >= 0.8 and r["ratio_vs_naive"] >= 3)
        style = "" if r["provider"] not in ("longmoe", "longmoe-ep2") else ("green" if good else "yellow")
        table.add_row(
            str(r["tokens"]), r["mode"], f"[{style}]{r['provider']}[/]" if style else r["provider"], f"{r['ms']:.0f}",
            f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.1f}", f"{r['ratio_vs_dense']:.2f}x", f"{r['ratio_vs_naive']:.2f}x",
        )  # fmt: skip
    console.print(table)
    split_table = Table(title="Forward time split (ms)")
    for col in ("provider", "tokens", *STAGES):
        split_table.add_column(col, justify="right")
    for (name, tokens), split in splits.items():
        split_table.add_row(name, str(tokens), *(f"{split[s] * 1e3:.1f}" for s in STAGES))
    console.print(split_table)
    console.print(f"CSV: {args.out}")
    plot(rows, splits, args.out.with_suffix(".png"))
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, splits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted({r["tokens"] for r in rows})
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd"), strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [
                next(
                    (
                        r["tokens_per_s"]
                        for r in rows
                        if r["provider"] == name and r["mode"] == mode and r["tokens"] == t
                    ),
                    0,
                )
                for t in tokens
            ]
            ax.bar([k + i * width for k in range(len(tokens))], vals, width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tokens))], [str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel("tokens / s")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    ax = axes[2]
    labels = [f"{n}\nT={t}" for n, t in splits]
    bottom = [0.0] * len(labels)
    for s in STAGES:
        vals = [split[s] * 1e3 for split in splits.values()]
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("forward ms")
    ax.set_title("forward time split")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
