"""Command line: staged expert slimming of a model on the standard library's sources.

    python -m longmoe.moe.slim --model .cache/byte_moe_lm/hf --keep 0.5 --stages 2 --tokens 65536 --out slim/
    python -m longmoe.moe.slim --model .cache/byte_moe_lm --keep 0.25 --stages 3 --tokens 98304 --out slim25/

``--model``: a Hugging Face Mixtral / Qwen2-MoE / PhiMoE directory (``config.json`` with a ``model_type``; loaded
with ``transformers``) or a :mod:`longmoe.models.byte_moe_lm` directory. Tokens are bytes
(:func:`longmoe.data.stdlib_split`), so the vocabulary must cover 256 ids. The student starts as a copy of the
model (the teacher) and runs :func:`~longmoe.moe.slimming.run_slimming`: per stage, score (``--method``),
prune every expert to ``keep ** ((i + 1) / stages)`` of its width, distil for ``tokens / stages`` tokens (top-k
KD + ``--lm-weight`` LM loss). ``OUT/stages/stage{i}.safetensors`` is written after each stage; rerunning the
same command resumes after the last one, bit-identically. The slimmed model goes to ``OUT/final`` (same format
as the input: ``from_pretrained`` loads a Hugging Face one). A rich progress bar runs per stage; the run ends
with a table of parameters (total / active) and held-out loss per stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from longmoe.moe.slimming import METHODS, SlimmingPlan, SlimmingStage, parameter_counts, run_slimming


def load_model(path: Path):
    """(model, kind) for a Hugging Face directory (kind ``"hf"``) or a byte_moe_lm directory (``"byte_moe_lm"``)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise SystemExit(
            f"--model {path}: no config.json there; expected a Hugging Face or byte_moe_lm directory"
        )
    if "model_type" in json.loads(cfg_path.read_text()):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), experts_implementation="eager")
        return model.eval(), "hf"
    from longmoe.models.byte_moe_lm import load

    return load(Path(path))[0], "byte_moe_lm"


def save_model(model, kind: str, out: Path) -> None:
    if kind == "hf":
        model.save_pretrained(str(out))
    else:
        from longmoe.models.byte_moe_lm import save

        save(model, out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m longmoe.moe.slim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face MoE or byte_moe_lm directory")
    ap.add_argument(
        "--keep", type=float, required=True, help="final width of every expert, fraction in (0, 1]"
    )
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument(
        "--tokens", type=int, required=True, help="distillation tokens in total (split over stages)"
    )
    ap.add_argument("--method", default="sensitivity", choices=METHODS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calibration", type=int, default=4, help="calibration batches per stage")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--top-k-logits", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out 256-byte windows per evaluation")
    ap.add_argument("--kv-groups", type=int, default=None,
                    help="also prune attention to this many GQA groups per layer in the last stage (byte_moe_lm only)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from longmoe.data import stdlib_split
    from longmoe.models.byte_moe_lm import held_out_bits_per_byte

    teacher, kind = load_model(args.model)
    vocab = teacher.get_output_embeddings().weight.shape[0] if kind == "hf" else teacher.cfg.vocab
    if vocab < 256:
        raise SystemExit(f"--model {args.model}: vocabulary {vocab} < 256; expected a byte-level model")
    plan = SlimmingPlan.uniform(keep=args.keep, stages=args.stages, tokens=args.tokens, method=args.method,
                                calibration_batches=args.calibration, batch=args.batch, seqlen=args.seqlen,
                                lr=args.lr, top_k_logits=args.top_k_logits, temperature=args.temperature,
                                lm_weight=args.lm_weight, seed=args.seed)  # fmt: skip
    if args.kv_groups is not None:
        if kind != "byte_moe_lm":
            raise SystemExit(f"--kv-groups needs a byte_moe_lm model; {args.model} is a Hugging Face one")
        plan.stages[-1] = SlimmingStage(keep=plan.stages[-1].keep, tokens=plan.stages[-1].tokens,
                                        kv_groups=args.kv_groups)  # fmt: skip
    train, _, _ = stdlib_split()

    def evaluate(m):
        return held_out_bits_per_byte(m, windows_count=args.eval_windows) * math.log(2)  # nats/byte

    student = copy.deepcopy(teacher)
    records = run_slimming(student, teacher, plan, train, out_dir=args.out / "stages", evaluate=evaluate,
                           progress=not args.no_progress)  # fmt: skip
    save_model(student, kind, args.out / "final")

    console = Console()
    table = Table(
        title=f"Expert slimming of {args.model} ({args.method}, {args.stages} stages, keep {args.keep})"
    )
    for col in ("stage", "keep", "expert widths", "tokens", "params total", "params active",
                "held-out loss after pruning", "held-out loss"):  # fmt: skip
        table.add_column(col, justify="right")
    total, active = parameter_counts(teacher)
    t_loss = evaluate(teacher)
    table.add_row(
        "teacher", "1.000", "", "", f"{total / 1e6:.3f}M", f"{active / 1e6:.3f}M", "", f"{t_loss:.4f}"
    )
    probe = copy.deepcopy(teacher)
    for r in records:
        from longmoe.moe.slimming import moe_sites, prune_experts

        zeros = {s.name: torch.zeros(s.num_experts, s.ffn) for s in moe_sites(probe)}
        prune_experts(probe, zeros, keep={k: list(v) for k, v in r["widths"].items()})  # for the counts only
        total, active = parameter_counts(student if r is records[-1] else probe)  # the last: heads pruned too
        ws = sorted({w for v in r["widths"].values() for w in v})
        table.add_row(str(r["stage"]), f"{r['keep']:.3f}", ",".join(map(str, ws)), str(r["tokens"]),
                      f"{total / 1e6:.3f}M", f"{active / 1e6:.3f}M", f"{r['held_out_loss_pruned']:.4f}",
                      f"{r['held_out_loss']:.4f}")  # fmt: skip
    console.print(table)
    console.print(
        f"held-out loss in nats/byte on {args.eval_windows} x 256 bytes; slimmed model: {args.out / 'final'}"
    )
    return records


if __name__ == "__main__":
    main()
