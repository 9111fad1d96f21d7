"""MoE layer on CPU, coarse and fine-grained experts: longmoe's MoELayer vs the baselines, one process and EP.

    python benchmarks/moe.py                                          # the committed sweep (about 30 min here)
    python benchmarks/moe.py --shapes 128:8:128 --tokens 2048 --repeats 1 --ep   # a quick look
    python benchmarks/moe.py --dtype bfloat16 --tokens 512 2048

Shapes ``E:k:F`` (hidden ``--hidden``, default 1024): the fine-grained regime of current MoE models, scaled to
this machine (64 experts top-8 width 256 as OLMoE, 128 top-8 width 128 as Qwen3-MoE, 256 top-8 width 64 as
DeepSeek-V3's routed experts; ``k * F = 2048`` in all three, so they have the same FLOPs per token), and the
coarse 8 experts top-2 width 2816 of the earlier MoE benchmark.

Providers (same weights, same routing; the router is fp32 in all but longmoe-router-input and hf-eager):
  longmoe         MoELayer, dropless: fp32 router, C++ dispatch map and permute, one native grouped op over
                  all experts per GEMM (torch.ops.longmoe.moe_grouped_mm), C++ unpermute+combine
  longmoe-router-input  (bf16 runs) the same layer with router_dtype="input": router logits and their
                  gradients in bf16, as Hugging Face's blocks (hf-eager's gate is a bf16 nn.Linear) and
                  Megatron-core's default (moe_router_dtype=None) compute them; scores still fp32
  longmoe-cf1.25  the same layer with capacity factor 1.25 (slots over capacity dropped by probability); its
                  GFLOP/s counts the dropless FLOPs, so it is a time comparison
  naive-loop      per-expert Python loop: nonzero, index_select the expert's tokens, MLP, index_add back
  hf-eager        Hugging Face transformers' OLMoE block (OlmoeSparseMoeBlock, experts_implementation="eager":
                  the per-expert loop most users run), weights copied in by longmoe.moe.hf.load_moe_layer_into_hf
  padded-bmm      every expert padded to the largest expert's row count, two torch.bmm over (E, C, .) buffers
                  (the simple alternative to a grouped GEMM; dropless, so C = max rows per expert)
  dense-gemm      the GEMMs of the same FLOPs with no routing (the roofline): (N,H)x(H,2F) and (N,F)x(F,H)
                  forward, plus the four gradient GEMMs for fwd+bwd, N = tokens * top_k, each operand in the
                  layout the grouped path uses (experts._dx_operand)
  longmoe-ep{P}   MoELayer with experts sharded over P gloo ranks (spawn), T/P tokens per rank, one thread per
                  rank (P = 4 oversubscribes this 2-core machine); time of the slowest rank

FLOPs: forward 6 * T * k * H * F (SwiGLU: 2*N*H*2F + 2*N*F*H); fwd+bwd 3x forward. Ratios are to dense-gemm,
naive-loop and hf-eager measured in the same run, interleaved round-robin (median of --repeats rounds after a
warm-up) so that load from other processes hits every provider alike; EP runs are timed separately.
The forward time split (router / permute / all-to-all / experts / unpermute) runs MoELayer.forward's stages
one by one with timers. Where the layer gathers its rows inside the expert GEMMs (one process on the CPU:
GroupedExperts.forward_tokens), "permute" is the dispatch map alone and "experts" includes the gather.

Threads: --threads (default 1) for the single-process providers. On this shared 2-core VM a 2-thread OpenMP
GEMM pays a fork-join per call; when another process holds a core, a (256 x 1024 x 256) fp32 GEMM ran at
8.5 GFLOP/s with 2 threads and 83 GFLOP/s with 1 (one big GEMM: 53 vs 77), so 2 threads measure the
neighbours, not the code.

Writes benchmarks/results/moe.csv (one row per shape x provider x tokens x mode, with machine, versions,
load and timestamp), prints a table, saves benchmarks/results/moe.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import RESULTS, interleaved, run_metadata, timeit, write_csv
from rich.console import Console
from rich.progress import track
from rich.table import Table

import longmoe
from longmoe.moe import MoEConfig, MoELayer, moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.moe.experts import _activation, _dx_operand
from longmoe.runtime import spawn

STAGES = ("router", "permute", "all-to-all", "experts", "unpermute")
DEFAULT_SHAPES = ("64:8:256", "128:8:128", "256:8:64", "8:2:2816")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        e, k, f = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected E:k:F, e.g. 128:8:128") from None
    return e, k, f


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
    """Per-expert loop with index_select / index_add (what most reference implementations do).
    x: (T, H) -> (T, H)."""
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


def padded_bmm_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert padded to the largest expert's row count C, two ``torch.bmm`` over (E, C, .) buffers.
    Routing, permute and combine are longmoe's; only the expert GEMMs differ. x: (T, H) -> (T, H)."""
    cfg = layer.config
    route = layer.router(x)
    dmap = moe_dispatch_map(route.expert_ids, cfg.num_experts)
    rows = moe_permute(x, dmap)  # (N, H) expert-contiguous
    counts = dmap.tokens_per_expert
    cap = max(int(counts.max()), 1)
    expert = torch.repeat_interleave(torch.arange(cfg.num_experts), counts, output_size=rows.shape[0])
    pos = torch.arange(rows.shape[0]) - (torch.cumsum(counts, 0) - counts)[expert]
    pidx = expert * cap + pos  # padded slot of every row
    buf = rows.new_zeros(cfg.num_experts * cap, cfg.hidden_size).index_copy(0, pidx, rows)
    fc1, fc2, f = layer.experts.linear_fc1, layer.experts.linear_fc2, cfg.ffn_hidden_size
    h = torch.bmm(buf.view(cfg.num_experts, cap, -1), fc1.transpose(1, 2))
    y = torch.bmm(F.silu(h[..., :f]) * h[..., f:], fc2.transpose(1, 2))
    y = y.reshape(cfg.num_experts * cap, -1).index_select(0, pidx)
    return moe_unpermute(y, dmap, route.probs)


def hf_block(layer: MoELayer):
    """Hugging Face's OLMoE block (eager per-expert loop) holding ``layer``'s weights, or None without
    transformers. forward: (batch, seq, H) -> (batch, seq, H)."""
    try:
        import transformers
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        return None
    from longmoe.moe.hf import load_moe_layer_into_hf

    cfg = layer.config
    hf_cfg = transformers.OlmoeConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.normalize_topk, num_hidden_layers=1,
    )  # fmt: skip
    hf_cfg._experts_implementation = "eager"
    dtype = layer.experts.linear_fc1.dtype
    block = OlmoeSparseMoeBlock(hf_cfg).to(dtype).eval()
    return load_moe_layer_into_hf(layer, block, hf_cfg)


def providers(layer: MoELayer, x: torch.Tensor, capacity_factor: float | None) -> dict:
    """name -> {mode: thunk}."""
    cfg = layer.config
    n, h, f = x.shape[0] * cfg.top_k, cfg.hidden_size, cfg.ffn_hidden_size
    dout = torch.randn_like(x)
    xg = x.detach().requires_grad_(True)
    modules = [layer]

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            for m in modules:
                m.zero_grad(set_to_none=True)
            out = fn(xg)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dout)

        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x)

        return run

    # Dense GEMMs of the same FLOPs, weights stored as nn.Linear's (out, in), operands laid out as the
    # grouped path lays them out.
    a, w1 = torch.randn(n, h, dtype=x.dtype), torch.randn(2 * f, h, dtype=x.dtype)
    b, w2 = torch.randn(n, f, dtype=x.dtype), torch.randn(h, f, dtype=x.dtype)
    dh, dy = torch.randn(n, 2 * f, dtype=x.dtype), torch.randn(n, h, dtype=x.dtype)

    def dense_fwd():
        a @ w1.t()
        b @ w2.t()

    def dense_fwd_bwd():
        dense_fwd()
        dh @ _dx_operand(w1[None])[0]
        dh.t() @ a
        dy @ _dx_operand(w2[None])[0]
        dy.t() @ b

    out = {
        "longmoe": {"fwd": no_grad(layer), "fwd+bwd": fwd_bwd(layer)},
        "naive-loop": {
            "fwd": no_grad(lambda t: naive_forward(layer, t)),
            "fwd+bwd": fwd_bwd(lambda t: naive_forward(layer, t)),
        },
        "padded-bmm": {
            "fwd": no_grad(lambda t: padded_bmm_forward(layer, t)),
            "fwd+bwd": fwd_bwd(lambda t: padded_bmm_forward(layer, t)),
        },
        "dense-gemm": {"fwd": dense_fwd, "fwd+bwd": dense_fwd_bwd},
    }
    if x.dtype == torch.bfloat16:
        low = MoELayer(dataclasses.replace(cfg, router_dtype="input"), dtype=x.dtype)
        low.load_state_dict(layer.state_dict())
        modules.append(low)
        out["longmoe-router-input"] = {"fwd": no_grad(low), "fwd+bwd": fwd_bwd(low)}
    if capacity_factor is not None:
        capped = MoELayer(dataclasses.replace(cfg, capacity_factor=capacity_factor), dtype=x.dtype)
        capped.load_state_dict(layer.state_dict())
        modules.append(capped)
        out[f"longmoe-cf{capacity_factor:g}"] = {"fwd": no_grad(capped), "fwd+bwd": fwd_bwd(capped)}
    block = hf_block(layer)
    if block is not None:
        modules.append(block)
        out["hf-eager"] = {
            "fwd": no_grad(lambda t: block(t[None])),
            "fwd+bwd": fwd_bwd(lambda t: block(t[None])[0]),
        }
    return out


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
            if layer.dispatcher is None and layer.experts.gathers(x):
                # as GroupedExperts.forward_tokens: "permute" is the dispatch map only, the rows are gathered
                # inside the expert GEMMs
                mark("permute")
                ex, counts = layer.experts, dmap.tokens_per_expert.tolist()
                h = torch.ops.longmoe.moe_grouped_mm(x, ex.linear_fc1, counts, 0, dmap.src_slot, cfg.top_k)
                y = torch.ops.longmoe.moe_grouped_mm(
                    _activation(h, cfg.activation, ex.ffn), ex.linear_fc2, counts, 0
                )
                mark("experts")
            elif layer.dispatcher is None:
                rows = moe_permute(x, dmap)
                mark("permute")
                y = layer.experts(rows, dmap.tokens_per_expert)
                mark("experts")
            else:
                rows = moe_permute(x, dmap)
                mark("permute")
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


def _ep_rank(
    rank: int, world: int, cfg_kw: dict, dtype_name: str, tokens: int, repeats: int, chunks: int = 1
) -> dict:
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    cfg = MoEConfig(**cfg_kw, expert_parallel_group=dist.group.WORLD, dispatch_chunks=chunks)
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
    # The split runs the unchunked stages one by one; a chunked pass interleaves them (no split).
    out["split"] = (
        stage_split(layer, x, repeats, barrier) if chunks == 1 else dict.fromkeys(STAGES, float("nan"))
    )
    return out


# ------------------------------------------------------------------------------------------------------ main
def add_run_args(ap, *, tokens, dtypes, repeats, threads_help, keep_help) -> None:
    """The arguments benchmarks/moe.py and benchmarks/moe_gemms.py share (with each one's defaults)."""
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES])
    ap.add_argument("--tokens", type=int, nargs="+", default=tokens)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", nargs="+", default=dtypes, choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1, help=threads_help)
    ap.add_argument(
        "--keep-cpu-memory",
        action="store_true",
        help=f"longmoe.runtime.keep_cpu_memory() first: freed memory stays in the heap {keep_help}".strip(),
    )


def point_fields(dtype_name: str, experts: int, top_k: int, hidden: int, ffn: int, tokens: int) -> dict:
    """The CSV columns that name a measured point, shared by benchmarks/moe.py and benchmarks/moe_gemms.py."""
    return dict(
        dtype=dtype_name, shape=f"{experts}:{top_k}:{ffn}", experts=experts, top_k=top_k, hidden=hidden, ffn=ffn,
        tokens=tokens,
    )  # fmt: skip


def start_run(args) -> None:
    """Refuse to run without the native build; set the thread count and, if asked, keep freed memory."""
    if not longmoe.runtime.native_available():
        raise SystemExit("longmoe._C is not built: run `make venv` first")
    torch.set_num_threads(args.threads)
    if args.keep_cpu_memory:
        longmoe.runtime.keep_cpu_memory()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(
        ap,
        tokens=[2048, 8192, 512],
        dtypes=["float32"],
        repeats=3,
        threads_help="torch threads of the single-process providers",
        keep_help="(all providers, EP ranks)",
    )
    ap.add_argument("--capacity-factor", type=float, default=1.25, help="extra provider; 0 to skip")
    ap.add_argument("--ep", type=int, nargs="*", default=[2, 4], help="expert-parallel sizes (none: skip)")
    ap.add_argument("--ep-tokens", type=int, nargs="*", default=[2048, 8192], help="token counts for EP runs")
    ap.add_argument(
        "--ep-chunks",
        type=int,
        nargs="+",
        default=[1],
        help="MoEConfig.dispatch_chunks values for the EP runs (chunked dispatch overlap)",
    )
    ap.add_argument("--ep-only", action="store_true", help="skip the single-process providers")
    ap.add_argument("--out", type=Path, default=RESULTS / "moe.csv")
    args = ap.parse_args()

    console = Console()
    start_run(args)
    if args.keep_cpu_memory:
        os.environ["LONGMOE_KEEP_CPU_MEMORY"] = "1"  # spawned EP ranks set it at import
    cf = args.capacity_factor or None
    rows, splits = [], {}
    # Token counts outermost, in the order given: a sweep stopped early has every shape at the first counts.
    points = [(d, s, t) for d in args.dtype for t in args.tokens for s in args.shapes]
    for dtype_name, (experts, top_k, ffn), tokens in track(points, description="MoE sweep", console=console):
        dtype = getattr(torch, dtype_name)
        cfg_kw = dict(hidden_size=args.hidden, ffn_hidden_size=ffn, num_experts=experts, top_k=top_k)
        cfg = MoEConfig(**cfg_kw)
        shape = f"{experts}:{top_k}:{ffn}"
        layer = make_layer(cfg, dtype)
        torch.manual_seed(tokens)
        x = torch.randn(tokens, args.hidden, dtype=dtype)
        with torch.no_grad():
            counts = layer(x)[1].tokens_per_expert
        meta = run_metadata(load_avg_1min=round(os.getloadavg()[0], 2), keep_cpu_memory=args.keep_cpu_memory)
        console.print(
            f"{dtype_name} E:k:F={shape} T={tokens}: rows per expert min {int(counts.min())} "
            f"median {int(counts.median())} max {int(counts.max())}, {int((counts == 0).sum())} empty; "
            f"load {meta['load_avg_1min']}"
        )
        times = {}
        if not args.ep_only:
            thunks = providers(layer, x, cf)
            times = interleaved(
                {(n, m): fn for n, modes in thunks.items() for m, fn in modes.items()}, args.repeats
            )
            del thunks
            splits[(dtype_name, shape, "longmoe", tokens)] = stage_split(layer, x, args.repeats)
        for world in args.ep if tokens in args.ep_tokens else []:
            for chunks in args.ep_chunks:
                if experts % world or chunks > experts // world:
                    continue
                name = f"longmoe-ep{world}" + (f"-c{chunks}" if chunks > 1 else "")
                res = spawn(
                    _ep_rank, world, cfg_kw, dtype_name, tokens, args.repeats, chunks, timeout_s=1800.0
                )
                for mode in ("fwd", "fwd+bwd"):
                    times[(name, mode)] = max(r[mode] for r in res)
                splits[(dtype_name, shape, name, tokens)] = {
                    s: max(r["split"][s] for r in res) for s in STAGES
                }
        for (name, mode), t in times.items():
            split = splits.get((dtype_name, shape, name, tokens), {}) if mode == "fwd" else {}
            base = {b: times.get((b, mode), float("nan")) for b in ("dense-gemm", "naive-loop", "hf-eager")}
            rows.append(
                dict(
                    provider=name,
                    **point_fields(dtype_name, experts, top_k, args.hidden, ffn, tokens),
                    mode=mode,
                    ms=t * 1e3,
                    tokens_per_s=tokens / t,
                    gflops=flops(tokens, cfg, mode) / t / 1e9,
                    ratio_vs_dense=base["dense-gemm"] / t,
                    ratio_vs_naive=base["naive-loop"] / t,
                    ratio_vs_hf=base["hf-eager"] / t,
                    empty_experts=int((counts == 0).sum()),
                    max_rows_per_expert=int(counts.max()),
                    **{f"fwd_ms_{s}": split.get(s, float("nan")) * 1e3 for s in STAGES},
                    **meta,
                )  # fmt: skip
            )
            console.print(
                f"  {name:16s} {mode:8s} {t * 1e3:9.1f} ms  {rows[-1]['gflops']:6.1f} GFLOP/s  "
                f"{rows[-1]['ratio_vs_dense']:.2f}x dense  {rows[-1]['ratio_vs_naive']:.2f}x naive  "
                f"{rows[-1]['ratio_vs_hf']:.2f}x hf"
            )
        write_csv(rows, args.out)  # after every point: a long sweep keeps what it measured
        plot(rows, splits, args.out.with_suffix(".png"))

    table = Table(title=f"MoE layer, CPU ({rows[0]['machine']}, {args.threads} thread(s), H={args.hidden})")
    for col in (
        "dtype",
        "E:k:F",
        "tokens",
        "mode",
        "provider",
        "ms",
        "GFLOP/s",
        "vs dense",
        "vs naive",
        "vs HF",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        ours = r["provider"] in ("longmoe", "longmoe-router-input")
        good = r["ratio_vs_dense"] >= (0.8 if r["top_k"] <= 2 else 0.7) and (
            r["top_k"] <= 2 or (r["ratio_vs_naive"] >= 3 and r["ratio_vs_hf"] >= 3)
        )
        name = f"[{'green' if good else 'yellow'}]{r['provider']}[/]" if ours else r["provider"]
        table.add_row(
            r["dtype"], r["shape"], str(r["tokens"]), r["mode"], name, f"{r['ms']:.1f}", f"{r['gflops']:.1f}",
            f"{r['ratio_vs_dense']:.2f}x", f"{r['ratio_vs_naive']:.2f}x", f"{r['ratio_vs_hf']:.2f}x",
        )  # fmt: skip
    console.print(table)
    split_table = Table(title="Forward time split (ms)")
    for col in ("dtype", "E:k:F", "provider", "tokens", *STAGES):
        split_table.add_column(col, justify="right")
    for (dtype_name, shape, name, tokens), split in splits.items():
        split_table.add_row(dtype_name, shape, name, str(tokens), *(f"{split[s] * 1e3:.1f}" for s in STAGES))
    console.print(split_table)
    console.print(f"CSV: {args.out}")
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, splits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dtype"], r["shape"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4.2), squeeze=False)
    for ax, (dtype_name, shape) in zip(axes[0], panels, strict=False):
        sel = [r for r in rows if (r["dtype"], r["shape"]) == (dtype_name, shape) and r["mode"] == "fwd+bwd"]
        for name in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["tokens"], r["gflops"]) for r in sel if r["provider"] == name)
            style = "--" if name == "dense-gemm" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("fwd+bwd GFLOP/s")
        ax.set_title(f"E:k:F = {shape}, {dtype_name}")
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    keys = [k for k in splits if k[3] == max(kk[3] for kk in splits if kk[:3] == k[:3])]
    labels = [f"{shape} {name.replace('longmoe', 'lm')}\nT={t}" for _, shape, name, t in keys]
    bottom = [0.0] * len(keys)
    for s in STAGES:
        total = [sum(splits[k].values()) for k in keys]
        vals = [splits[k][s] / tot * 100 for k, tot in zip(keys, total, strict=True)]
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("% of forward time")
    ax.set_title("forward time split (largest T)")
    ax.tick_params(axis="x", labelsize=5, rotation=90)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
