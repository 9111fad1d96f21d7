"""What the cost model predicts for clusters we do not have, checked first against published anchors and
against the emulated-link measurements of ``sequence_parallel.py --emulate``.

    python benchmarks/planning.py

1. Anchors: TokenRing's 4x A10 PCIe run (ACA-Lab-SJTU/token-ring README: LLaMA2-7B attention, 32 heads,
   D 128, 24,000 tokens, causal, fp16 forward; Nsight: ~7.6 ms per step for Ring Attention, 3.5 ms for
   TokenRing's first two steps and 4.6 ms for the third) and ring-flash-attention's 8x H800 table (its
   README: Llama-3.1-8B attention, 8K tokens per GPU, causal bf16; zigzag ring at 85.2% of one GPU's
   FlashAttention rate forward, 90.2% forward + backward).
2. Predictions for 8x H100 NVLink and 4 nodes x 8 H100 (one 400 Gb/s NIC per GPU), Llama-3-8B (GQA 32:8)
   and MHA 32:32 attention, bf16, causal, 128K-1M tokens, forward + backward.
3. Emulated links: per topology and P, how close the model came to every measured pass and how often
   ``auto`` picked the fastest (from benchmarks/results/sequence_parallel_<topology>_p<P>*.csv).

CSV under benchmarks/results/planning.csv, the tables printed, a PNG beside the CSV. Pure arithmetic
except step 3, which reads what the emulated runs wrote.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch
from common import RESULTS, run_metadata, write_csv

from longmoe.parallel import AttentionShape, Topology, hardware_topology, plan_cluster


def anchors() -> list[dict]:
    rows = []
    # TokenRing, 4x A10 over PCIe. Their Ring step moves K and V of 6,000 rows (98 MB fp16) in ~7.6 ms: the
    # links deliver ~13 GB/s each direction there (nominal PCIe 4.0 x16: ~25). 80 TFLOP/s: FlashAttention-2
    # on an A10 (125 TFLOP/s fp16 tensor peak) at ~65% of peak.
    shape = AttentionShape(world_size=4, batch=1, seqlen_local=6000, heads_q=32, heads_kv=32, head_dim=128,
                           dtype=torch.float16, causal=True)  # fmt: skip
    measured = {"kv_ring": "7.6", "token_ring": "3.5-4.6"}
    for label, topo in (
        ("A10 PCIe as a mesh, 13 GB/s", Topology(kind="mesh", link_bandwidth=13e9, compute_rate=80e12)),
        ("A10 PCIe as a switch, 13 GB/s", Topology(kind="switch", link_bandwidth=13e9, compute_rate=80e12)),
        ("A10 PCIe nominal (switch, 25 GB/s)", hardware_topology("a10_pcie", compute_rate=80e12)),
    ):
        plan = plan_cluster(shape, topo, backward=False, candidates=("token_ring", "kv_ring"))
        for alg, a in plan.algorithms.items():
            rows.append(dict(section="anchor: TokenRing 4xA10", cluster=label, shape="MHA 32:32, 24K, fp16, causal",
                             mode="fwd", algorithm=alg, predicted_ms_per_step=a.forward_s / 4 * 1e3,
                             published=f"{measured[alg]} ms/step", auto=plan.chosen))  # fmt: skip
    # ring-flash-attention, 8x H800 (NVLink 400 GB/s per GPU: 200 each direction; H800 compute = H100's).
    shape = AttentionShape(world_size=8, batch=1, seqlen_local=8192, heads_q=32, heads_kv=8, head_dim=128,
                           dtype=torch.bfloat16, causal=True)  # fmt: skip
    topo = hardware_topology("h100_sxm", link_bandwidth=200e9, compute_rate=450e12)
    plan = plan_cluster(shape, topo, candidates=("kv_ring",))
    ideal = plan.algorithms["kv_ring"].compute_s
    one = plan.algorithms["kv_ring"]
    fwd_ideal = _ideal_forward(shape, topo)
    for mode, t, ideal_t, pub in (("fwd", one.forward_s, fwd_ideal, "85.2%"),
                                  ("fwd+bwd", one.total_s, ideal, "90.2%")):  # fmt: skip
        rows.append(dict(section="anchor: ring-flash-attn 8xH800", cluster="H800 NVLink, 200 GB/s per direction",
                         shape="GQA 32:8, 8K/GPU, bf16, causal", mode=mode, algorithm="kv_ring (zigzag)",
                         predicted_ms_per_step=t / 8 * 1e3, published=f"{pub} of one GPU's rate",
                         predicted_fraction=ideal_t / t, auto=plan.chosen))  # fmt: skip
    return rows


def _ideal_forward(shape: AttentionShape, topo: Topology) -> float:
    """Seconds of one rank's share of the causal attention with no communication at all."""
    s = shape.seqlen_local * shape.world_size
    flops = 4.0 * shape.batch * shape.heads_q * s * s * shape.head_dim * 0.5
    return flops / shape.world_size / topo.compute_rate


def predictions() -> list[dict]:
    rows = []
    clusters = (("8x H100 NVLink", 1), ("4 nodes x 8 H100, 400G IB per GPU", 4))
    for label, nodes in clusters:
        topo = hardware_topology("h100_sxm", nodes=nodes)
        p = 8 * nodes
        for heads, (hq, hkv) in (("GQA 32:8", (32, 8)), ("MHA 32:32", (32, 32))):
            for total in (131072, 524288, 1048576):
                shape = AttentionShape(world_size=p, batch=1, seqlen_local=total // p, heads_q=hq, heads_kv=hkv,
                                       head_dim=128, dtype=torch.bfloat16, causal=True)  # fmt: skip
                plan = plan_cluster(shape, topo)
                for alg, a in plan.algorithms.items():
                    name, nbytes = a.busiest_link
                    rows.append(dict(
                        section="prediction", cluster=label, shape=f"{heads}, {total // 1024}K, bf16, causal",
                        mode="fwd+bwd", algorithm=alg, predicted_ms_per_step=a.total_s / p * 1e3,
                        predicted_pass_ms=a.total_s * 1e3, exposed_comm_ms=a.exposed_comm_s * 1e3,
                        busiest_link=name, busiest_link_GB=nbytes / 1e9, auto=plan.chosen,
                    ))  # fmt: skip
    return rows


def emulated(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("sequence_parallel_*_p*.csv")):
        runs = list(csv.DictReader(path.open()))
        if not runs or "estimate_configured_ms" not in runs[0]:
            continue
        errs = [float(r["estimate_ms"]) / float(r["pass_ms"]) - 1 for r in runs]
        errs_cfg = [float(r["estimate_configured_ms"]) / float(r["pass_ms"]) - 1 for r in runs]
        cases: dict = {}
        for r in runs:
            cases.setdefault((r["heads"], r["seqlen_local"], r["mode"]), {})[r["algorithm"]] = r
        picks = [c[next(iter(c.values()))["chosen"]]["pass_ms"] for c in cases.values()]
        best = [min(float(x["pass_ms"]) for x in c.values()) for c in cases.values()]
        slow = [float(p) / b for p, b in zip(picks, best, strict=True)]
        tok = {(r["heads"], r["seqlen_local"], r["mode"]): float(r["ratio_vs_ring"]) for r in runs
               if r["algorithm"] == "token_ring"}  # fmt: skip
        mha_fb = [v for (h, _, m), v in tok.items() if h.startswith("MHA") and m == "fwd+bwd"]
        rows.append(dict(
            section="emulated", cluster=f"{runs[0]['emulate']} P={runs[0]['world_size']} {runs[0]['rate']} "
            f"{runs[0]['dtype']}", shape=path.name, mode="all", algorithm="all",
            cases=len(cases), points=len(runs), within_15pct=sum(abs(e) <= 0.15 for e in errs),
            within_15pct_configured=sum(abs(e) <= 0.15 for e in errs_cfg),
            median_abs_err=statistics.median(abs(e) for e in errs), worst_err=max(errs, key=abs),
            auto_fastest=sum(s == 1.0 for s in slow), auto_within_5pct=sum(s <= 1.05 for s in slow),
            token_ring_vs_kv_mha_fwdbwd="/".join(f"{v:.2f}" for v in mha_fb), detected=runs[0].get("kind", ""),
        ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the emulated runs' CSVs are")
    ap.add_argument("--out", type=Path, default=RESULTS / "planning.csv")
    args = ap.parse_args()
    rows = anchors() + predictions() + emulated(args.results)
    meta = run_metadata()
    keys: list[str] = []
    for r in rows:
        r.update(meta)
        keys += [k for k in r if k not in keys]
    write_csv([{k: r.get(k, "") for k in keys} for r in rows], args.out)
    report(rows)
    plot([r for r in rows if r["section"] == "prediction"], args.out.with_suffix(".png"))
    print(f"CSV: {args.out}\nPlot: {args.out.with_suffix('.png')}")


def report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    t = Table(title="Anchors: the model against published measurements")
    for c in (
        "anchor",
        "cluster",
        "shape",
        "mode",
        "algorithm",
        "predicted ms/step",
        "predicted fraction",
        "published",
    ):
        t.add_column(c, justify="right")
    for r in rows:
        if r["section"].startswith("anchor"):
            frac = f"{r['predicted_fraction']:.1%}" if "predicted_fraction" in r else ""
            t.add_row(r["section"][8:], r["cluster"], r["shape"], r["mode"], r["algorithm"],
                      f"{r['predicted_ms_per_step']:.2f}", frac, r["published"])  # fmt: skip
    console.print(t)
    t = Table(title="Predictions, forward + backward, ms per ring step (pass / P); auto's pick marked")
    for c in ("cluster", "shape", "token_ring", "kv_ring", "ulysses", "auto", "exposed comm ms (auto)",
              "busiest link (auto)", "GB on it"):  # fmt: skip
        t.add_column(c, justify="right")
    groups: dict = {}
    for r in rows:
        if r["section"] == "prediction":
            groups.setdefault((r["cluster"], r["shape"]), {})[r["algorithm"]] = r
    for (cluster, shape), g in groups.items():
        auto = next(iter(g.values()))["auto"]
        cells = [
            f"{g[a]['predicted_ms_per_step']:.2f}" if a in g else "-"
            for a in ("token_ring", "kv_ring", "ulysses")
        ]
        a = g[auto]
        t.add_row(cluster, shape, *cells, auto, f"{a['exposed_comm_ms']:.1f}", a["busiest_link"],
                  f"{a['busiest_link_GB']:.2f}")  # fmt: skip
    console.print(t)
    t = Table(
        title="Emulated links: the model (measured topology + profiled kernels) against every measured pass"
    )
    for c in ("run", "cases", "passes within 15%", "(configured topology)", "median |error|", "worst", "auto fastest",
              "auto within 5%",
              "TokenRing / KV ring, MHA fwd+bwd"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in rows:
        if r["section"] == "emulated":
            t.add_row(r["cluster"], str(r["cases"]), f"{r['within_15pct']}/{r['points']}",
                      f"{r['within_15pct_configured']}/{r['points']}", f"{r['median_abs_err']:.0%}",
                      f"{r['worst_err']:+.0%}", f"{r['auto_fastest']}/{r['cases']}", f"{r['auto_within_5pct']}/{r['cases']}",
                      r["token_ring_vs_kv_mha_fwdbwd"])  # fmt: skip
    console.print(t)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = sorted({r["cluster"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(clusters), figsize=(7 * len(clusters), 4.2), squeeze=False)
    for ax, cluster in zip(axes[0], clusters, strict=True):
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["cluster"] == cluster))
        for i, alg in enumerate(("token_ring", "kv_ring", "ulysses")):
            ys = [next((r["predicted_ms_per_step"] for r in rows if r["cluster"] == cluster and r["shape"] == s
                        and r["algorithm"] == alg), 0.0) for s in shapes]  # fmt: skip
            ax.bar([j + 0.27 * (i - 1) for j in range(len(shapes))], ys, width=0.27, label=alg)
        ax.set_xticks(
            range(len(shapes)), [s.replace(", bf16, causal", "") for s in shapes], rotation=30, fontsize=7
        )
        ax.set_yscale("log")
        ax.set_ylabel("predicted ms per ring step (fwd+bwd)")
        ax.set_title(cluster, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
