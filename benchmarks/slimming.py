"""Expert slimming on a real MoE LM trained here: neuron-pruning methods and expert-level baselines at equal
distillation tokens, held-out bits/byte vs active parameters, and the slimmed MoE layer's speed.

    python benchmarks/slimming.py                      # 50% and 25% width, 98K distillation tokens per method
    python benchmarks/slimming.py --tokens 32768       # a quicker, noisier look
    OMP_NUM_THREADS=1 python benchmarks/slimming.py    # on a contended 2-core machine: 1 thread is faster

Teacher: :mod:`longmoe.models.byte_moe_lm` (byte-level, 4 layers, d 128, 8 experts top-2, SwiGLU 256, GQA 4/2;
trained a fixed 300 steps on the standard library's sources, cached under .cache/byte_moe_lm; trained first if
missing). Every method starts from the teacher and gets the same distillation budget (``--tokens``; top-8 KD
at T=1 against the teacher, plus 0.5 x LM loss, AdamW lr 1e-3), the same calibration windows and the same
held-out windows:

  random / magnitude / activation / sensitivity   score neurons, prune every expert to the width, distil
  sensitivity-staged                               2 stages (50%) or 3 stages (25%), geometric widths, the same
                                                   tokens split equally over the stages
  drop-experts                                     keep the experts with most routed mass (4 of 8 = 50%, 2 = 25%)
  merge-experts                                    merge pairs by mass-weighted averaging (8 -> 4; twice -> 2)

Held-out loss: next-byte cross-entropy in bits on 32 fixed 256-byte windows of the held-out files. MoE-layer
tokens/s: layer 0 of the teacher and of each slimmed model, forward on 16K tokens of the layer's real inputs,
timed round-robin (median), so machine load hits all alike.

Writes benchmarks/results/slimming.csv (machine, versions, timestamp on every row), prints a table with the
goals, saves benchmarks/results/slimming.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import longmoe
from longmoe.data import stdlib_split, windows
from longmoe.models.byte_moe_lm import CACHE, held_out_bits_per_byte, load_or_train, parameter_counts
from longmoe.moe.slimming import (
    SlimmingPlan,
    SlimmingStage,
    drop_experts,
    merge_experts_pairwise,
    routed_mass,
    run_slimming,
)

RESULTS = Path(__file__).resolve().parent / "results"
NEURON_METHODS = ("random", "magnitude", "activation", "sensitivity")


def plan_for(method: str, keep: float, tokens: int, stages: int, args) -> SlimmingPlan:
    common = dict(method=method, calibration_batches=args.calibration, batch=args.batch, seqlen=args.seqlen,
                  lr=args.lr, lm_weight=args.lm_weight, seed=0)  # fmt: skip
    if stages == 1:
        return SlimmingPlan(stages=[SlimmingStage(keep=keep, tokens=tokens)], **common)
    return SlimmingPlan.uniform(keep=keep, stages=stages, tokens=tokens, **common)


def layer_speed(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """tokens/s of layer 0's MoE forward of each model on x (tokens, H), timed round-robin (median)."""
    layers = {k: m.layers[0].mlp.eval() for k, m in models.items()}
    times = {k: [] for k in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer(x)
        for _ in range(repeats):
            for k, layer in layers.items():
                t0 = time.perf_counter()
                layer(x)
                times[k].append(time.perf_counter() - t0)
    return {k: x.shape[0] / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=98304, help="distillation tokens per method and ratio")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calibration", type=int, default=4, help="calibration batches for scoring")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--methods", nargs="+", default=[*NEURON_METHODS, "sensitivity-staged", "drop-experts",
                                                      "merge-experts"])  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "slimming.csv")
    args = ap.parse_args()
    if not longmoe.runtime.native_available():
        raise SystemExit("longmoe._C is not built: run `make venv` first")
    console = Console(width=170)
    teacher, record = load_or_train(CACHE)
    train_data, _, _ = stdlib_split()

    def evaluate(m):
        return held_out_bits_per_byte(m, windows_count=args.eval_windows)

    meta = dict(machine=f"{platform.processor() or platform.machine()} x{os.cpu_count()}", torch=torch.__version__,
                longmoe=longmoe.__version__, threads=torch.get_num_threads(),
                timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                teacher_steps=record.get("steps"), distil_tokens=args.tokens)  # fmt: skip
    t_total, t_active = parameter_counts(teacher)
    t_bpb = evaluate(teacher)
    rows = [dict(method="teacher", keep=1.0, stages=0, params_total=t_total, params_active=t_active,
                 held_out_bpb=t_bpb, bpb_after_prune=t_bpb, seconds=0.0)]  # fmt: skip
    models = {"teacher": teacher}
    calib_mass = routed_mass(teacher, [windows(train_data, args.seqlen, args.batch, torch.Generator().manual_seed(7))
                                       for _ in range(args.calibration)])  # fmt: skip
    for keep in args.keeps:
        for method in args.methods:
            t0 = time.perf_counter()
            student = copy.deepcopy(teacher)
            stages = 1
            if method in NEURON_METHODS or method == "sensitivity-staged":
                stages = (2 if keep >= 0.5 else 3) if method == "sensitivity-staged" else 1
                plan = plan_for(method.removesuffix("-staged"), keep, args.tokens, stages, args)
            else:
                n_keep = max(1, round(teacher.cfg.num_experts * keep))
                if method == "drop-experts":
                    drop_experts(student, calib_mass, keep_experts=n_keep)
                else:
                    while student.cfg.num_experts > n_keep:
                        merge_experts_pairwise(student, routed_mass(student, [windows(
                            train_data, args.seqlen, args.batch, torch.Generator().manual_seed(7))]))  # fmt: skip
                plan = plan_for("magnitude", 1.0, args.tokens, 1, args)
            recs = run_slimming(student, teacher, plan, train_data, evaluate=evaluate, progress=True)
            after_prune = recs[0]["held_out_loss_pruned"]  # after the first pruning, before distillation
            total, active = parameter_counts(student)
            rows.append(dict(method=method, keep=keep, stages=stages, params_total=total, params_active=active,
                             held_out_bpb=recs[-1]["held_out_loss"], bpb_after_prune=after_prune,
                             seconds=time.perf_counter() - t0))  # fmt: skip
            console.print(f"keep {keep} {method}: held-out {recs[-1]['held_out_loss']:.4f} bits/byte "
                          f"(after pruning {after_prune:.4f}), {rows[-1]['seconds']:.0f} s")  # fmt: skip
            if method in ("sensitivity-staged", "sensitivity"):
                models[f"{method}@{keep}"] = student
    # MoE-layer speed: layer 0 of the teacher vs the slimmed models, on the layer's real inputs
    seen = []
    hook = teacher.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    n_seq = max(1, args.speed_tokens // args.seqlen)
    with torch.no_grad():
        teacher(windows(train_data, args.seqlen - 1, n_seq, torch.Generator().manual_seed(9))[:, :-1])
    hook.remove()
    x = seen[0].reshape(-1, teacher.cfg.d_model)
    speed = layer_speed(models, x, args.repeats)
    for r in rows:
        key = "teacher" if r["method"] == "teacher" else f"{r['method']}@{r['keep']}"
        r["moe_layer_tokens_per_s"] = speed.get(key, float("nan"))
        r["speedup_vs_teacher"] = r["moe_layer_tokens_per_s"] / speed["teacher"]
        r.update(meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    table = Table(title=f"Expert slimming, byte-level MoE LM ({meta['machine']}, {meta['threads']} threads; "
                        f"{args.tokens} distillation tokens per method)")  # fmt: skip
    for col in ("keep", "method", "stages", "params total", "params active", "bits/byte after prune",
                "held-out bits/byte", "vs teacher", "MoE tok/s", "speed-up"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        sp = r["moe_layer_tokens_per_s"]
        table.add_row(f"{r['keep']:.2f}", r["method"], str(r["stages"]), f"{r['params_total'] / 1e6:.2f}M",
                      f"{r['params_active'] / 1e6:.2f}M", f"{r['bpb_after_prune']:.3f}", f"{r['held_out_bpb']:.3f}",
                      f"{r['held_out_bpb'] / t_bpb - 1:+.1%}", "" if math.isnan(sp) else f"{sp:,.0f}",
                      "" if math.isnan(sp) else f"{r['speedup_vs_teacher']:.2f}x")  # fmt: skip
    console.print(table)
    goals(rows, t_bpb, console)
    plot(rows, args.out.with_suffix(".png"))


def goals(rows: list[dict], t_bpb: float, console: Console) -> None:
    by = {(r["method"], r["keep"]): r for r in rows}
    if ("sensitivity-staged", 0.5) in by:
        r = by[("sensitivity-staged", 0.5)]
        gap = r["held_out_bpb"] / t_bpb - 1
        console.print(f"goal 1 (staged sensitivity at 50% within 5% of the teacher): {gap:+.1%} -> "
                      f"{'met' if gap <= 0.05 else 'MISSED'}")  # fmt: skip
    if ("sensitivity-staged", 0.25) in by:
        s = by[("sensitivity-staged", 0.25)]["held_out_bpb"]
        others = {m: r["held_out_bpb"] for (m, k), r in by.items() if k == 0.25 and m != "sensitivity-staged"}
        beaten = [m for m, v in others.items() if v <= s]
        console.print(f"goal 2 (at 25%, staged better than every one-shot and expert-level baseline): staged {s:.3f}; "
                      + ("met" if not beaten else f"MISSED (not better than {beaten})"))  # fmt: skip
    if ("sensitivity-staged", 0.5) in by:
        sp = by[("sensitivity-staged", 0.5)]["speedup_vs_teacher"]
        console.print(f"goal 3 (50%-width MoE layer >= 1.6x the teacher layer's tokens/s): {sp:.2f}x -> "
                      f"{'met' if sp >= 1.6 else 'MISSED'}")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "teacher", m))
    for m in methods:
        pts = sorted((r["params_active"] / 1e6, r["held_out_bpb"]) for r in rows if r["method"] == m)
        style = "*" if m == "teacher" else ("o-" if m.startswith("sensitivity") else "s--")
        ax.plot(*zip(*pts, strict=True), style, label=m, markersize=12 if m == "teacher" else 6)
    ax.set_xlabel("active parameters (M)")
    ax.set_ylabel("held-out bits/byte")
    ax.set_title("Expert slimming at equal distillation tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
