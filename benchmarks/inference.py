"""Long-context inference across ranks: sequence-parallel prefill into a sharded KV cache, then decoding.

    python benchmarks/inference.py                                   # P = 1, 2, 4; prompts 4K, 8K
    python benchmarks/inference.py --worlds 1 2 --seqlens 4096 16384 --new-tokens 16

For each world size P (spawned local CPU ranks on gloo) and prompt length: prefill tokens/s, decode ms/token
(median over the generated tokens), cache MiB per rank, decode bytes sent per token per rank (measured with
CommStats), for two decoders over the same cache shards:

* ``token_ring``: longmoe's decode (per-shard partial ``(out, lse)``, then an exact merge of the
  ``(B, Hq, D + 1)`` fp32 partials: ``merge="auto"``, the cost model's pick per token step; the
  decode-attention sweep times each merge - all-gather, owner gather + broadcast, two all-reduces - and
  reports the cost model's pick beside them);
* ``naive_kv_gather``: the alternative of gathering the K/V cache: every rank all-gathers every shard
  (padded to the longest) and attends over the whole context. Its bytes grow with the context.

The model is a random-weight Llama (fp32) from a config: decode timing does not depend on the weights.
Ratios are against P = 1 measured in the same run. CSV -> benchmarks/results/inference.csv, a rich table,
a PNG. Every rank runs one thread (``--threads-per-rank``): P = 2 uses both cores of this machine, P = 4
oversubscribes them twice, so P = 4 shows communication volume and memory, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_metadata, write_csv  # noqa: E402


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.heads_q * args.head_dim, intermediate_size=2 * args.heads_q * args.head_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads_q, num_key_value_heads=args.heads_kv,
        max_position_embeddings=max(args.seqlens) + args.new_tokens + 8, rope_theta=500000.0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def naive_decode_attention(q, k, v, lengths, *, group=None, softmax_scale=None, timeout_s=60.0, step=-1, layer=-1,
                           stats=None, merge=None, owners=None):  # fmt: skip
    """The baseline: all-gather every rank's K/V shard (padded to the longest), attend over the whole cache.
    q: (B, 1, Hq, D); k, v: (B, max_len, Hkv, D) shards with ``lengths`` valid rows per sequence."""
    from longmoe.attention.flash_attention import flash_attention_forward
    from longmoe.runtime.distributed import world_and_rank

    world, _ = world_and_rank(group)
    if world == 1:
        parts_k, parts_v, parts_n = [k], [v], [torch.tensor(lengths)]
    else:
        n = torch.tensor(lengths, dtype=torch.int64)
        longest = torch.tensor([k.shape[1]])
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
        pad = int(longest) - k.shape[1]
        kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).contiguous()
        vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).contiguous()
        parts_k = [torch.empty_like(kp) for _ in range(world)]
        parts_v = [torch.empty_like(vp) for _ in range(world)]
        parts_n = [torch.empty_like(n) for _ in range(world)]
        for out, x in ((parts_k, kp), (parts_v, vp), (parts_n, n)):
            work = dist.all_gather(out, x, group=group, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        if stats is not None:
            sent = (world - 1) * (kp.nbytes + vp.nbytes)
            stats.add("decode_allgather", sent, sent)
    outs = []
    for b in range(q.shape[0]):
        kb = torch.cat([pk[b, : int(pn[b])] for pk, pn in zip(parts_k, parts_n, strict=True)])[None]
        vb = torch.cat([pv[b, : int(pn[b])] for pv, pn in zip(parts_v, parts_n, strict=True)])[None]
        outs.append(flash_attention_forward(q[b : b + 1], kb, vb, softmax_scale=softmax_scale)[0])
    return torch.cat(outs)


def measure(rank, world, args):
    import longmoe.inference.generation as gen_mod
    from longmoe.data import held_out_tokens
    from longmoe.inference import ShardedKVCache, decode_bytes, generate
    from longmoe.inference.decode import sharded_decode_attention
    from longmoe.runtime import CommStats

    torch.set_num_threads(args.threads_per_rank)
    model = build_model(args)
    warm = torch.arange(8 * world, dtype=torch.int64)[None] % 256
    generate(model, warm, max_new_tokens=2, algorithm=args.algorithm)  # first-call costs (threads, groups)
    rows = []
    for seqlen in args.seqlens:
        ids = held_out_tokens(seqlen)[:, :-1]  # (1, seqlen) held-out source bytes
        for decoder in ("token_ring", "naive_kv_gather"):
            gen_mod.sharded_decode_attention = (
                sharded_decode_attention if decoder == "token_ring" else naive_decode_attention
            )
            cache, stats, timings = ShardedKVCache(1), CommStats(), {}
            if world > 1:
                dist.barrier()
            generate(model, ids, max_new_tokens=args.new_tokens, cache=cache, stats=stats, timings=timings,
                     algorithm=args.algorithm, timeout_s=600)  # fmt: skip
            decode = statistics.median(timings["decode_s"][1:])  # step 0 also warms the decode path
            t = torch.tensor([timings["prefill_s"], decode, cache.memory_bytes()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            dec_bytes = (
                sum(n for key, n in stats.bytes_sent.items() if key.startswith("decode_")) / args.new_tokens
            )
            merges = sorted({m for m, _ in timings["steps"]}) if decoder == "token_ring" else ["kv_allgather"]
            model_bytes = decode_bytes(world=world, batch=1, heads_q=args.heads_q, heads_kv=args.heads_kv,
                                       head_dim=args.head_dim, context=seqlen, layers=args.layers,
                                       merge=merges[0] if decoder == "token_ring" else "allgather")[decoder]  # fmt: skip
            rows.append(dict(world=world, seqlen=seqlen, decoder=decoder, merge="+".join(merges), prefill_s=t[0].item(),
                             prefill_tok_s=seqlen / t[0].item(), decode_ms=1e3 * t[1].item(),
                             cache_mib_per_rank=t[2].item() / 2**20, decode_bytes_per_token=dec_bytes,
                             decode_bytes_model=model_bytes))  # fmt: skip
    gen_mod.sharded_decode_attention = sharded_decode_attention
    return rows


def measure_decode_attention(rank, world, args):
    """Decode attention alone over a filled cache (random K/V; no prefill): where single-process attention
    over the cache dominates. Per token: one query, ``--attn-layers`` layers. Returns rows for rank 0."""
    from common import timeit

    from longmoe.attention.flash_attention import flash_attention_forward
    from longmoe.inference import choose_decode_merge, decode_bytes
    from longmoe.inference.decode import sharded_decode_attention
    from longmoe.parallel import measure_topology
    from longmoe.runtime import CommStats

    torch.set_num_threads(args.threads_per_rank)
    topo = measure_topology() if world > 1 else None
    g = torch.Generator().manual_seed(rank)
    hq, hkv, d, layers = args.attn_heads_q, args.attn_heads_kv, args.attn_head_dim, args.attn_layers
    rows = []
    for context in args.decode_contexts:
        n = context // world
        kv = [
            (torch.randn(1, n, hkv, d, generator=g), torch.randn(1, n, hkv, d, generator=g))
            for _ in range(layers)
        ]
        q = torch.randn(1, 1, hq, d, generator=torch.Generator().manual_seed(0))
        stats = CommStats()

        def step(decoder, merge, kv=kv):
            for k, v in kv:
                if decoder == "token_ring":
                    sharded_decode_attention(
                        q, k, v, [n], stats=stats, timeout_s=600, merge=merge, owners=[0]
                    )
                elif world == 1:
                    flash_attention_forward(q, k, v)
                else:
                    naive_decode_attention(q, k, v, [n], stats=stats, timeout_s=600)

        runs = [("token_ring", m) for m in (args.merges if world > 1 else ["allgather"])]
        pick, modelled = ("allgather", {}) if world == 1 else choose_decode_merge(
            topo, world=world, batch=1, heads_q=hq, head_dim=d, owners=[0])  # fmt: skip
        for decoder, merge in [*runs, ("naive_kv_gather", "kv_allgather")]:
            if world > 1:
                dist.barrier()
            stats.reset()
            sec = timeit(lambda decoder=decoder, merge=merge: step(decoder, merge), args.repeats)  # noqa: B023
            t = torch.tensor([sec], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sent = sum(stats.bytes_sent.values()) / (args.repeats + 1)
            rows.append(dict(world=world, context=context, decoder=decoder, merge=merge, attn_ms=1e3 * t.item(),
                             bytes_per_token=sent, cache_mib_per_rank=layers * n * 2 * hkv * d * 4 / 2**20,
                             auto_pick=pick, modelled_merge_ms=1e3 * layers * modelled.get(merge, 0.0),
                             bytes_model=decode_bytes(world=world, batch=1, heads_q=hq, heads_kv=hkv, head_dim=d,
                                                      context=context, layers=layers, owners=[0],
                                                      merge="allgather" if decoder != "token_ring" else merge
                                                      )[decoder]))  # fmt: skip
        del kv
    return rows


def decode_attention_sweep(args):
    from longmoe.runtime import spawn

    rows = []
    for world in args.worlds:
        rows += (
            measure_decode_attention(0, 1, args)
            if world == 1
            else spawn(measure_decode_attention, world, args, timeout_s=3000)[0]
        )
    base = {(r["context"], r["decoder"]): r for r in rows if r["world"] == 1}
    meta = run_metadata(layers=args.attn_layers, heads_q=args.attn_heads_q, heads_kv=args.attn_heads_kv,
                        head_dim=args.attn_head_dim, repeats=args.repeats)  # fmt: skip
    for r in rows:
        r["latency_vs_p1"] = r["attn_ms"] / base[(r["context"], "token_ring")]["attn_ms"]
        r.update(meta)
    path = write_csv(rows, args.out.with_name(args.out.stem + "_decode_attention.csv"))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Decode attention only, {args.attn_layers} layer(s) Hq={args.attn_heads_q} "
                        f"Hkv={args.attn_heads_kv} D={args.attn_head_dim} fp32, ratio vs P=1 in this run")  # fmt: skip
    for col in (
        "P",
        "context",
        "decoder",
        "merge",
        "auto",
        "ms/token",
        "x P=1",
        "bytes/token/rank",
        "cache MiB/rank",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["world"]), str(r["context"]), r["decoder"], r["merge"], r["auto_pick"],
                      f"{r['attn_ms']:.2f}", f"{r['latency_vs_p1']:.2f}", f"{r['bytes_per_token']:.0f}",
                      f"{r['cache_mib_per_rank']:.0f}")  # fmt: skip
    Console().print(table)
    print(f"wrote {path}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = [("token_ring", m, "-o") for m in args.merges] + [("naive_kv_gather", "kv_allgather", "--s")]
    p1 = [r for r in rows if r["world"] == 1 and r["decoder"] == "token_ring"]
    axes[0].plot([r["context"] for r in p1], [r["attn_ms"] for r in p1], "-k^", label="P=1")
    for decoder, merge, style in series:
        for world in (w for w in args.worlds if w > 1):
            pts = [r for r in rows if r["world"] == world and r["decoder"] == decoder and r["merge"] == merge]
            xs = [r["context"] for r in pts]
            label = f"{decoder}:{merge} P={world}"
            axes[0].plot(xs, [r["attn_ms"] for r in pts], style, label=label)
            axes[1].plot(xs, [r["bytes_per_token"] for r in pts], style, label=label)
    for ax, title in zip(axes, ("decode attention ms/token", "bytes/token/rank"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path.with_suffix('.png')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads-q", type=int, default=8)
    ap.add_argument("--heads-kv", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--algorithm", default="token_ring", help="prefill algorithm")
    # One thread per rank, P = 1 included: on this shared 2-core CPU one process with 2 threads prefilled
    # 256 tokens in 0.95 s against 0.07 s with 1 thread (OpenMP threads spinning against other jobs).
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "inference.csv")
    ap.add_argument(
        "--decode-contexts",
        type=int,
        nargs="*",
        default=[],
        help="also time decode attention alone over a filled cache of these lengths (e.g. 16384 65536)",
    )
    ap.add_argument("--decode-only", action="store_true", help="only the decode-attention sweep")
    ap.add_argument("--attn-layers", type=int, default=1)
    ap.add_argument("--attn-heads-q", type=int, default=32)
    ap.add_argument("--attn-heads-kv", type=int, default=4)
    ap.add_argument("--attn-head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--merges", nargs="+", default=["allgather", "owner", "allreduce"],
                    help="decode merges timed in the decode-attention sweep")  # fmt: skip
    args = ap.parse_args()
    if args.decode_contexts:
        decode_attention_sweep(args)
    if args.decode_only:
        return

    from longmoe.runtime import spawn

    rows = []
    for world in args.worlds:
        t0 = time.perf_counter()
        if world == 1:
            rows += measure(0, 1, args)
        else:
            rows += spawn(measure, world, args, timeout_s=3000)[0]
        print(f"P = {world}: {time.perf_counter() - t0:.0f} s", flush=True)
    base = {(r["seqlen"], r["decoder"]): r for r in rows if r["world"] == 1}
    torch.set_num_threads(args.threads_per_rank)
    meta = run_metadata(layers=args.layers, heads_q=args.heads_q, heads_kv=args.heads_kv, head_dim=args.head_dim,
                        new_tokens=args.new_tokens, prefill_algorithm=args.algorithm)  # fmt: skip
    for r in rows:
        b = base.get((r["seqlen"], r["decoder"]))
        r["prefill_speedup_vs_p1"] = b["prefill_s"] / r["prefill_s"] if b else float("nan")
        r["decode_latency_vs_p1"] = r["decode_ms"] / b["decode_ms"] if b else float("nan")
        r.update(meta)
    path = write_csv(rows, args.out)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Inference: Llama {args.layers}L Hq={args.heads_q} Hkv={args.heads_kv} D={args.head_dim} "
                        f"fp32, {meta['machine']}, ratios vs P=1 in this run")  # fmt: skip
    for col in ("P", "prompt", "decoder", "prefill tok/s", "x P=1", "decode ms/tok", "x P=1", "cache MiB/rank",
                "decode B/tok/rank"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["world"]), str(r["seqlen"]), r["decoder"], f"{r['prefill_tok_s']:.0f}",
                      f"{r['prefill_speedup_vs_p1']:.2f}", f"{r['decode_ms']:.1f}", f"{r['decode_latency_vs_p1']:.2f}",
                      f"{r['cache_mib_per_rank']:.2f}", f"{r['decode_bytes_per_token']:.0f}")  # fmt: skip
    Console().print(table)
    print(f"wrote {path}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for decoder, style in (("token_ring", "-o"), ("naive_kv_gather", "--s")):
        for world in args.worlds:
            pts = [r for r in rows if r["world"] == world and r["decoder"] == decoder]
            xs = [r["seqlen"] for r in pts]
            axes[0].plot(xs, [r["decode_ms"] for r in pts], style, label=f"{decoder} P={world}")
            if world > 1:
                axes[1].plot(
                    xs, [r["decode_bytes_per_token"] for r in pts], style, label=f"{decoder} P={world}"
                )
            if decoder == "token_ring":
                axes[2].plot(xs, [r["prefill_tok_s"] for r in pts], "-o", label=f"P={world}")
    for ax, title in zip(
        axes, ("decode ms/token", "decode bytes/token/rank", "prefill tokens/s"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
