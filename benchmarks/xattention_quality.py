"""XAttention downstream quality on a real model: held-out bits/byte and a needle test, vs dense.

    python benchmarks/xattention_quality.py                       # 8K bits/byte, 50 needles at 4K
    python benchmarks/xattention_quality.py --seqlen 4096 --windows 2 --needles 10   # quick look

Model: the byte-level LM of ``benchmarks/lm_qkv.py`` (trained for a fixed step count; the first use trains
it and caches it under ``.cache/lm_qkv/``). Every layer's attention is replaced by XAttention prefill
(estimate + block-sparse attention, causal, stride 8, block 128, the paper's selection rule) through
``lm_qkv.Attention.attn_fn``; everything runs under CPU bf16 autocast, dense included, so the only
difference between rows is the attention mask.

Methods: dense (our flash attention), XAttention at fixed thresholds (``--thresholds``), and XAttention
with per-(layer, head) thresholds calibrated by ``calibrate_thresholds(target_mass=m)`` (``--targets``)
on windows of the *training* stream, never on the held-out bytes the quality is measured on.

Measures, per method:

* held-out bits/byte: ``--windows`` random windows of ``--seqlen`` bytes of the held-out files (every 20th
  file, never trained on), next-byte cross-entropy over every position and over the second half alone
  (where a causal row has the most tiles to skip); the mean density of the kept tiles (of the causally
  visible ones) over layers, heads and windows;
* needles: ``--needles`` contexts of ``--needle-seqlen`` bytes of held-out text with a line
  ``<name> = "<needle>"`` planted 5-15% into it (name: 6 random lowercase letters; needle: 16-32 random
  letters and digits) and the cue ``<name> = "`` at the end, followed by the needle. Exact copy: every
  needle byte is the model's argmax given the true prefix (teacher-forced, which is exactly "greedy
  decoding reproduces the needle"); also the fraction of needle bytes copied.

CSV under benchmarks/results/xattention_quality.csv, a table and a PNG (density vs bits/byte change).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import time
from pathlib import Path

import lm_qkv  # benchmarks/lm_qkv.py, beside this script
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from longmoe.attention import calibrate_thresholds, xattention
from longmoe.data import stdlib_split, windows

RESULTS = Path(__file__).resolve().parent / "results"


class Prefill:
    """Context manager: every layer's attention becomes XAttention with ``thresholds[layer]`` (a float or a
    (heads,) tensor), or stays dense when ``thresholds`` is None; records each call's density."""

    def __init__(self, model, thresholds, *, stride: int, block_size: int, selection: str = "paper"):
        self.model, self.thresholds = model, thresholds
        self.kw = dict(stride=stride, block_size=block_size, selection=selection, causal=True)
        self.densities: list[float] = []

    def _fn(self, layer, q, k, v):
        out, density = xattention(q, k, v, threshold=self.thresholds[layer], return_density=True, **self.kw)
        self.densities.append(density)
        return out

    def __enter__(self):
        if self.thresholds is not None:
            for i, blk in enumerate(self.model.blocks):
                blk.attn.attn_fn = lambda q, k, v, i=i: self._fn(i, q, k, v)
        return self

    def __exit__(self, *exc):
        for blk in self.model.blocks:
            blk.attn.attn_fn = None

    @property
    def density(self) -> float:
        return sum(self.densities) / len(self.densities) if self.densities else 1.0


def make_needles(held: torch.Tensor, count: int, seqlen: int, seed: int):
    """``count`` (tokens (1, seqlen + 1) int64, first needle-byte target index, needle length) triples."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        plant, cue, needle = lm_qkv.needle_lines(g)
        n = len(needle)
        start = int(torch.randint(0, held.numel() - seqlen - 1, (1,), generator=g))
        filler = bytes(held[start : start + seqlen].tolist())
        at = int(seqlen * (0.05 + 0.10 * float(torch.rand((), generator=g))))
        body = filler[:at] + plant + filler[at:]
        keep = seqlen + 1 - len(cue) - len(needle)  # the cue and the needle end the context
        text = body[:keep] + cue + needle
        assert len(text) == seqlen + 1
        out.append((torch.tensor(list(text), dtype=torch.long)[None], seqlen + 1 - n, n))
    return out


@torch.no_grad()
def evaluate(model, prefill: Prefill, held_windows, needles, dtype):
    """(bits/byte all, bits/byte second half, bpb density, exact-copy count, byte accuracy, needle density)."""
    amp = dict(device_type="cpu", dtype=dtype, enabled=dtype != torch.float32)
    bits_all, bits_half = [], []
    with prefill, torch.autocast(**amp):
        for row in held_windows:
            logits = model(row[None, :-1])[0].float()
            ce = F.cross_entropy(logits, row[1:], reduction="none") / math.log(2)
            bits_all.append(ce.mean().item())
            bits_half.append(ce[ce.numel() // 2 :].mean().item())
    bpb_density = prefill.density
    prefill.densities.clear()
    exact, byte_ok, byte_n = 0, 0, 0
    with prefill, torch.autocast(**amp):
        for tokens, first, n in needles:
            # logits at position t predict token t + 1: the needle's targets are tokens[first : first + n]
            logits = model(tokens[:, :-1])[0, first - 1 : first - 1 + n]
            hit = logits.argmax(-1) == tokens[0, first : first + n]
            exact += bool(hit.all())
            byte_ok, byte_n = byte_ok + int(hit.sum()), byte_n + n
    needle_density = prefill.density
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(bits_all), mean(bits_half), bpb_density, exact, byte_ok / max(byte_n, 1), needle_density


def calibrate(model, train, targets, seqlen, count, stride, block_size, dtype, seed):
    """{target: [per-layer (heads,) thresholds]} from ``count`` training-stream windows of ``seqlen``."""
    g = torch.Generator().manual_seed(seed)
    samples = [lm_qkv.capture_qkv(model, w[None], dtype=dtype)[0] for w in windows(train, seqlen, count, g)]
    out = {}
    for m in targets:
        out[m] = [
            calibrate_thresholds(
                [(s[layer][0], s[layer][1]) for s in samples],
                target_mass=m,
                stride=stride,
                block_size=block_size,
                causal=True,
            )  # fmt: skip
            for layer in range(model.cfg.layers)
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=lm_qkv.CACHE / "model.pt")
    ap.add_argument("--seqlen", type=int, default=8192, help="held-out bits/byte window length")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--needle-seqlen", type=int, default=4096)
    ap.add_argument("--needles", type=int, default=50)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.8, 0.9, 0.95])
    ap.add_argument("--targets", type=float, nargs="*", default=[0.9, 0.95],
                    help="per-head calibrated thresholds for these target true masses")  # fmt: skip
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "xattention_quality.csv")
    args = ap.parse_args()
    console = Console(width=160)
    dtype = getattr(torch, args.dtype)
    model, record = lm_qkv.load(args.checkpoint)
    console.print(f"[bold]Model[/]: {lm_qkv.describe(record)}")
    train, held, _ = stdlib_split()
    g = torch.Generator().manual_seed(args.seed + 1)
    held_windows = list(windows(held, args.seqlen, args.windows, g))
    needles = make_needles(held, args.needles, args.needle_seqlen, args.seed + 2)
    t0 = time.perf_counter()
    calib = calibrate(model, train, args.targets, args.seqlen, args.calib_windows, args.stride, args.block_size,
                      dtype, args.seed + 3)  # fmt: skip
    console.print(f"calibrated per-head thresholds on {args.calib_windows} training windows of {args.seqlen} bytes in "
                  f"{time.perf_counter() - t0:.0f} s: " + "; ".join(
                      f"mass {m}: " + " ".join(f"L{i}[{', '.join(f'{x:.3f}' for x in t.tolist())}]"
                                               for i, t in enumerate(ts)) for m, ts in calib.items()))  # fmt: skip
    layers = model.cfg.layers
    methods = [("dense", None, None)]
    methods += [(f"tau={t}", t, [t] * layers) for t in args.thresholds]
    methods += [(f"calibrated mass={m}", m, calib[m]) for m in args.targets]
    meta = dict(machine=f"{platform.processor() or platform.machine()} x{os.cpu_count()}", torch=torch.__version__,
                threads=torch.get_num_threads(), dtype=args.dtype, seqlen=args.seqlen, windows=args.windows,
                needle_seqlen=args.needle_seqlen, needles=args.needles, stride=args.stride,
                block_size=args.block_size, selection="paper", train_steps=record["steps"],
                timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
    rows = []
    for name, setting, thr in methods:
        t0 = time.perf_counter()
        pf = Prefill(model, thr, stride=args.stride, block_size=args.block_size)
        bpb, bpb_half, dens, exact, byte_acc, ndens = evaluate(model, pf, held_windows, needles, dtype)
        rows.append(dict(method=name, setting=setting, bits_per_byte=bpb, bits_per_byte_second_half=bpb_half,
                         density=dens, needle_exact=exact, needle_byte_acc=byte_acc, needle_density=ndens,
                         seconds=time.perf_counter() - t0, **meta))  # fmt: skip
        console.print(f"{name}: bits/byte {bpb:.4f} (second half {bpb_half:.4f}), density {dens:.3f}; needles "
                      f"{exact}/{len(needles)} exact, {byte_acc:.3f} of bytes, density {ndens:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    base = rows[0]
    for r in rows:
        r["bpb_change_pct"] = 100 * (r["bits_per_byte"] / base["bits_per_byte"] - 1)
        r["bpb_half_change_pct"] = 100 * (
            r["bits_per_byte_second_half"] / base["bits_per_byte_second_half"] - 1
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = Table(title=f"XAttention prefill in every layer of the byte LM ({record['steps']} steps), {args.dtype}, "
                  f"stride {args.stride}, block {args.block_size}, paper selection; bits/byte on {args.windows} x "
                  f"{args.seqlen} held-out bytes, {args.needles} needles at {args.needle_seqlen}")  # fmt: skip
    for col in ("method", "density", "bits/byte", "vs dense", "2nd half", "vs dense (2nd half)",
                "needles exact", "needle bytes", "needle density"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        ok = abs(r["bpb_change_pct"]) <= 1.0 and r["density"] <= 0.35
        table.add_row(
            r["method"], f"{r['density']:.3f}", f"{r['bits_per_byte']:.4f}",
            f"[{'green' if ok else 'red'}]{r['bpb_change_pct']:+.2f}%[/]", f"{r['bits_per_byte_second_half']:.4f}",
            f"{r['bpb_half_change_pct']:+.2f}%", f"{r['needle_exact']}/{args.needles}", f"{r['needle_byte_acc']:.3f}",
            f"{r['needle_density']:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print("green: within 1% of dense bits/byte at density <= 0.35 (the issue's goal)")
    console.print(f"CSV: {args.out}")
    plot(rows, args.out.with_suffix(".png"))
    console.print(f"Plot: {args.out.with_suffix('.png')}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        a1.plot(r["density"], r["bpb_change_pct"], "o")
        a1.annotate(r["method"], (r["density"], r["bpb_change_pct"]), fontsize=7)
        a2.plot(r["needle_density"], r["needle_byte_acc"], "o")
        a2.annotate(f"{r['method']} ({r['needle_exact']} exact)", (r["needle_density"], r["needle_byte_acc"]),
                    fontsize=7)  # fmt: skip
    a1.axhline(1.0, color="grey", ls=":")
    a1.axvline(0.35, color="grey", ls=":")
    a1.set_xlabel("density (kept fraction of visible tiles)")
    a1.set_ylabel("held-out bits/byte vs dense (%)")
    a2.set_xlabel("density")
    a2.set_ylabel("needle bytes copied")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
