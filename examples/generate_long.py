"""Greedy generation from a long prompt across local CPU ranks with ``longmoe.generate``; compare with 1 process.

    python examples/generate_long.py --world-size 2                       # 16K-byte prompt, 2 ranks
    python examples/generate_long.py --world-size 4 --memory-budget-mib 8 # too big for one process's budget
    torchrun --nproc-per-node 2 examples/generate_long.py                 # the same under torchrun

Model: a small byte-level Hugging Face Llama (vocab 256) trained here for ``--train-steps`` steps on the
Python standard library's source (longmoe.data; no download) - a few hundred steps give recognisable
Python. The prompt is ``--prompt-bytes`` of held-out source (files never trained on). Every rank prefills
its zigzag shard of the prompt with sequence-parallel attention into a sharded KV cache, then decodes
greedily (one exact merge of attention partials per layer and token, the cheapest by the cost model). The
script prints the prefill time, the per-token decode latency, the bytes each rank sent per decoded token, the
merge used and the KV-cache memory per rank, against one process, and exits 1 if the tokens differ from the
one-process tokens.

``--memory-budget-mib`` is the KV-cache budget of one process: when the whole cache would exceed it, the
one-process run is skipped (it would not fit) and only the sharded run goes ahead, each rank checking that
its shard fits the budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from longmoe.data import held_out_tokens, stdlib_split, windows


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads_q, num_key_value_heads=args.heads_kv, rope_theta=500000.0,
        max_position_embeddings=args.prompt_bytes + args.new_tokens + 8, tie_word_embeddings=True,
    )  # fmt: skip


def train(args) -> dict:
    """A few AdamW steps on random windows of the training split; returns the state dict."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)  # on the shared 2-core CPU one thread trains faster than two (no spinning)
    model = LlamaForCausalLM(model_config(args))
    data, _, _ = stdlib_split()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        batch = windows(data, args.train_seqlen + 1, 4, g).long()
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.train_steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} nats/byte", flush=True)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(rank: int, world: int, args, state: dict, group=None) -> dict:
    """Generate on this rank (world 1: one process) and return what the report needs."""
    from transformers import LlamaForCausalLM

    from longmoe.inference import ShardedKVCache, generate
    from longmoe.runtime import CommStats

    torch.set_num_threads(1)  # one core per rank (see benchmarks/inference.py on 2-thread contention)
    model = LlamaForCausalLM(model_config(args)).eval()
    model.load_state_dict(state)
    prompt = held_out_tokens(args.prompt_bytes)[:, :-1]  # (1, prompt_bytes)
    cache, stats, timings = ShardedKVCache(1, group=group), CommStats(), {}
    out = generate(model, prompt, group=group, max_new_tokens=args.new_tokens, layout=args.layout,
                   algorithm=args.algorithm, cache=cache, stats=stats, timings=timings, timeout_s=600)  # fmt: skip
    if world > 1:  # every rank must hold the same tokens
        everyone = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(everyone, out, group=group)
        assert all(torch.equal(out, o) for o in everyone), f"rank {rank}: ranks generated different tokens"
    budget = args.memory_budget_mib * 2**20 if args.memory_budget_mib else None
    if budget is not None and cache.memory_bytes() > budget:
        raise MemoryError(
            f"rank {rank}: cache shard {cache.memory_bytes() / 2**20:.1f} MiB exceeds the budget"
        )
    return dict(
        tokens=out[0, prompt.shape[1] :].tolist(),
        prefill_s=timings["prefill_s"],
        decode_ms=1e3 * statistics.median(timings["decode_s"][1:] or timings["decode_s"]),
        bytes_per_token=sum(n for k, n in stats.bytes_sent.items() if k.startswith("decode_"))
        / max(args.new_tokens, 1),
        merges=sorted({m for m, _ in timings["steps"]}),
        cache_mib=cache.memory_bytes() / 2**20,
    )


def _spawned(rank, world, args, state):
    return run(rank, world, args, state)


def report(name: str, r: dict) -> None:
    print(f"{name:>12}: prefill {r['prefill_s']:.2f} s ({args_prompt / r['prefill_s']:.0f} tokens/s), decode "
          f"{r['decode_ms']:.1f} ms/token, {r['bytes_per_token']:.0f} bytes sent per decoded token per rank, "
          f"KV cache {r['cache_mib']:.2f} MiB per rank, decode merge {'+'.join(r['merges'])}")  # fmt: skip


def main() -> int:
    global args_prompt
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2, help="local ranks to spawn (ignored under torchrun)")
    ap.add_argument("--prompt-bytes", type=int, default=16384)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--train-seqlen", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads-q", type=int, default=4)
    ap.add_argument("--heads-kv", type=int, default=2)
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--algorithm", default="token_ring")
    ap.add_argument("--memory-budget-mib", type=float, default=None, help="KV-cache budget of one process")
    args = ap.parse_args()
    args_prompt = args.prompt_bytes

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    state = train(args)  # under torchrun every rank trains the same model (same seed, same data)
    head_dim = args.hidden // args.heads_q
    whole = args.layers * (args.prompt_bytes + args.new_tokens - 1) * 2 * args.heads_kv * head_dim * 4
    fits_one = args.memory_budget_mib is None or whole <= args.memory_budget_mib * 2**20
    if under_torchrun:
        from longmoe.runtime import init_from_env

        rank, world = init_from_env()
        sharded = run(rank, world, args, state)
        if rank != 0:
            return 0
    else:
        from longmoe.runtime import spawn

        world = args.world_size
        sharded = spawn(_spawned, world, args, state, timeout_s=3000)[0]
    print(f"prompt: {args.prompt_bytes} bytes of held-out standard-library source; {args.new_tokens} new tokens; "
          f"{world} ranks, {args.layout} layout, prefill {args.algorithm}")  # fmt: skip
    report(f"{world} ranks", sharded)
    text = bytes(sharded["tokens"]).decode("utf-8", errors="replace")
    print(f"generated: {text!r}")
    if not fits_one:
        print(f"one process: skipped - its KV cache ({whole / 2**20:.1f} MiB) exceeds --memory-budget-mib "
              f"{args.memory_budget_mib}; each of the {world} ranks held {sharded['cache_mib']:.2f} MiB")  # fmt: skip
        return 0
    single = run(0, 1, args, state)
    report("one process", single)
    print(f"ratios: prefill {single['prefill_s'] / sharded['prefill_s']:.2f}x faster, decode latency "
          f"{sharded['decode_ms'] / single['decode_ms']:.2f}x of one process, cache per rank "
          f"{sharded['cache_mib'] / single['cache_mib']:.3f} of one process")  # fmt: skip
    if sharded["tokens"] != single["tokens"]:
        print(f"MISMATCH: {world} ranks {sharded['tokens']} vs one process {single['tokens']}")
        return 1
    print(f"OK: {world}-rank greedy tokens equal one process's, token for token")
    return 0


args_prompt = 0

if __name__ == "__main__":
    raise SystemExit(main())
