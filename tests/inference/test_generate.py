"""longmoe.generate on real gloo ranks against single-process Hugging Face greedy decoding (fp32).

One spawn per world size runs every case (each rank reports each case's failure separately, as
tests/parallel/test_sequence_parallel.py does). The model is a tiny Llama built from a config (no
downloads), its weights seeded identically on every rank. The reference is HF ``model.generate`` on one
process, one prompt at a time, eager attention. Each case also asserts, on every rank: the cache holds
1/P of the tokens of every sequence and layer within one token, the ranks' caches add up to the
single-process cache, and the decode bytes per token equal ``decode_bytes``'s formula.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

from longmoe.attention import XAttentionConfig
from longmoe.inference import (
    DecodeError,
    ShardedKVCache,
    decode_bytes,
    disable_sharded_generate,
    enable_sharded_generate,
    generate,
    merge_sends,
)
from longmoe.runtime import CommStats, SpawnError, spawn

pytestmark = pytest.mark.distributed

VOCAB, LAYERS, HQ, HKV, D = 101, 2, 4, 2, 16
NEW = 4


@functools.cache
def tiny_llama(seed: int = 0):
    """The same weights on every rank (seeded); built once per process (init is slow on a busy CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HQ * D,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        max_position_embeddings=256,
        initializer_range=0.1,
    )  # fmt: skip  (0.1: peaked logits, context-dependent greedy tokens)
    return LlamaForCausalLM(cfg).eval()


def hf_greedy(model, prompt: torch.Tensor, new: int) -> list[int]:
    """Single-process HF greedy decoding of one prompt (1-D), fp32, eager attention: the new tokens."""
    model.set_attn_implementation("eager")
    # An explicit all-ones mask: without one, HF infers it from input_ids != pad_token_id and would hide
    # prompt tokens equal to the pad id.
    out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, prompt.numel() :].tolist()


def greedy_ref(model, prompt: torch.Tensor, new: int) -> list[int]:
    """Single-process greedy decoding without a cache (full forward per token, eager attention): the new
    tokens. Equal to :func:`hf_greedy` (test_reference_is_hf_generate) and ~10x cheaper on a busy CPU."""
    model.set_attn_implementation("eager")
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel() :].tolist()


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), 7, dtype=torch.int64)  # pad id 7: never read
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, length - p.numel() :] = p
        mask[b, length - p.numel() :] = 1
    return ids, mask


def cases(world: int) -> list[dict]:
    """Each prefill algorithm and layout, each decode merge, B = 1 and B = 3 with different prompt lengths,
    prompts shorter than the world (ranks with empty shards). Prompt length L is prefilled as L - 1 tokens: a
    multiple of the layout's chunk count runs as a batch, anything else as packed documents."""
    zig = 2 * world
    out = [
        dict(alg="token_ring", layout="zigzag", lengths=(zig * 3 + 1,), merge="owner"),
        dict(alg="token_ring", layout="contiguous", lengths=(23, 5, 14), merge="allgather"),
        dict(alg="kv_ring", layout="zigzag", lengths=(23, 5, 14), merge="owner"),
        dict(alg="kv_ring", layout="contiguous", lengths=(world * 5 + 1,), merge="allreduce"),
        dict(alg="auto", layout="zigzag", lengths=(2, 1, 9), merge="auto"),
        dict(alg="ulysses", layout="zigzag", lengths=(zig * 2 + 1, zig * 2 + 1), merge="allreduce"),
    ]
    if HQ % world:  # Ulysses splits heads over ranks: a clear error instead
        out[-1]["error"] = f"heads_q % world_size == 0; got heads_q={HQ}, world_size={world}"
    return out


def _check_case(rank, world, cfg, seed):
    model = tiny_llama()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in cfg["lengths"]]
    ids, mask = left_pad(prompts)
    cache, stats = ShardedKVCache(len(prompts)), CommStats()
    if "error" in cfg:
        with pytest.raises(ValueError, match=cfg["error"].replace("(", r"\(")):
            generate(
                model,
                ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                layout=cfg["layout"],
                algorithm=cfg["alg"],
            )
        return
    timings = {}
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, layout=cfg["layout"], merge=cfg["merge"],
                   algorithm=cfg["alg"], cache=cache, stats=stats, timeout_s=30, timings=timings)  # fmt: skip
    assert torch.equal(out[:, : ids.shape[1]], ids), f"rank {rank}: the prompts were not returned unchanged"
    for b, p in enumerate(prompts):
        want = greedy_ref(model, p, NEW)
        got = out[b, ids.shape[1] :].tolist()
        assert got == want, f"rank {rank}/{world} {cfg} sequence {b}: generated {got}, single-process {want}"
    # Memory: every sequence and layer holds floor or ceil of tokens / P here; the ranks add up to the whole.
    totals = [n - 1 + NEW for n in cfg["lengths"]]  # the last generated token is never cached
    assert cache.global_lengths() == totals, f"rank {rank}: cache counts {cache.global_lengths()} != {totals}"
    for layer in range(LAYERS):
        for b, (n, total) in enumerate(zip(cache.layer_lengths(layer), totals, strict=True)):
            assert total // world <= n <= -(-total // world), (
                f"rank {rank}/{world}: layer {layer} sequence {b} holds {n} of {total} tokens; expected 1/P +- 1"
            )
    per_token = 2 * HKV * D * 4
    mem = torch.tensor([cache.memory_bytes()], dtype=torch.int64)
    dist.all_reduce(mem)
    assert int(mem) == LAYERS * per_token * sum(totals), f"rank {rank}: ranks hold {int(mem)} bytes in all"
    assert cache.memory_bytes() <= LAYERS * per_token * sum(-(-t // world) for t in totals)
    # Decode bytes: per token and layer, what the merge's rounds send from this rank (all-gather: P - 1
    # partials (B, Hq, D + 1) fp32), independent of the context; owner: 2 rounds per distinct owner.
    steps = timings["steps"]
    assert len(steps) == NEW and all(m == cfg["merge"] for m, _ in steps if cfg["merge"] != "auto"), steps
    want = 0
    for m, owners in steps:
        rounds = merge_sends(m, world=world, batch=len(prompts), heads_q=HQ, head_dim=D, owners=owners)
        want += LAYERS * sum(n for sends in rounds for src, _, n in sends if src == rank)
    got = sum(n for k, n in stats.bytes_sent.items() if k.startswith("decode_"))
    assert got == want, f"rank {rank}: decode sent {got} bytes for {NEW} tokens, expected {want}"
    if cfg["merge"] == "allgather":
        per_token = decode_bytes(world=world, batch=len(prompts), heads_q=HQ, heads_kv=HKV, head_dim=D,
                                 context=0, layers=LAYERS)["token_ring"]  # fmt: skip
        assert got == per_token * NEW, f"rank {rank}: {got} bytes != decode_bytes {per_token} x {NEW}"


def _sampled(rank, world):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 4 * world + 3), generator=torch.Generator().manual_seed(3))
    out = generate(model, ids, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.5, seed=11)
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    for r, theirs in enumerate(gathered):
        assert torch.equal(out, theirs), (
            f"rank {rank}: sampled {out.tolist()}, rank {r} sampled {theirs.tolist()}"
        )
    return out[:, ids.shape[1] :].tolist()


def _run_all(rank, world):
    failures = []
    for i, cfg in enumerate(cases(world)):
        try:
            _check_case(rank, world, cfg, seed=200 + i)
            failures.append(None)
        except Exception as exc:
            failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    for fn in extras(world):
        try:
            fn(rank, world)
            failures.append(None)
        except Exception as exc:
            failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return failures


@functools.cache
def _failures(world: int) -> list[list[str]]:
    per_rank = spawn(_run_all, world, timeout_s=300)
    n = len(cases(world)) + len(extras(world))
    assert all(len(r) == n for r in per_rank)
    return [[r[i] for r in per_rank if r[i] is not None] for i in range(n)]


def _case_id(cfg):
    return f"{cfg['alg']}-{cfg['layout']}-B{len(cfg['lengths'])}"


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", range(len(cases(1))), ids=[_case_id(c) for c in cases(1)])
def test_greedy_equals_single_process_hf(world, case):
    failures = _failures(world)[case]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_seeded_sampling_identical_on_every_rank(world):
    failures = _failures(world)[len(cases(world)) + extras(world).index(_sampled)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sparse_prefill_equals_single_process(world):
    failures = _failures(world)[len(cases(world)) + extras(world).index(_sparse_prefill)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_model_generate_hook_equals_hf_generate(world):
    failures = _failures(world)[len(cases(world)) + extras(world).index(_hf_generate_hook)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_crop_keeps_the_first_tokens_across_shards(world):
    failures = _failures(world)[len(cases(world)) + extras(world).index(_crop)]
    assert not failures, "\n".join(failures)


# -------------------------------------------------------------------------------------------- bad input
def _bad_inputs(rank, world):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    # A cache built for another group.
    sub = dist.new_group(list(range(world)))
    with pytest.raises(ValueError, match="different process group"):
        generate(model, ids, max_new_tokens=2, cache=ShardedKVCache(1, group=sub))
    # Ranks that disagree (a mismatched call): every rank raises, naming the field and the other rank.
    with pytest.raises(ValueError, match="max_new_tokens") as info:
        generate(model, ids, max_new_tokens=2 + rank, timeout_s=20)
    assert f"rank {1 - rank}" in str(info.value), str(info.value)
    # A model whose attention longmoe cannot shard (sliding window).
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=16))  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=16"):
        generate(mistral, ids, max_new_tokens=2)
    # crop needs to know which ranks hold the last tokens.
    blind = ShardedKVCache(1)
    blind.plan_prefill([(0, 0, 0)], [[0] * world])
    with pytest.raises(NotImplementedError, match=r"crop\(tokens_to_remove=1\).*owners"):
        blind.crop(1)
    with pytest.raises(ValueError, match="merge='tree'"):
        generate(model, ids, max_new_tokens=1, merge="tree")


def test_bad_inputs_raise_on_every_rank():
    failures = _failures(2)[len(cases(2)) + extras(2).index(_bad_inputs)]
    assert not failures, "\n".join(failures)


def _mixtral(rank, world):
    """Mixtral-style MoE: HF's sparse MoE blocks, then longmoe's MoE layers in their place."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from longmoe.moe.hf import replace_hf_moe_blocks

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        initializer_range=0.3, sliding_window=None)  # fmt: skip
    model = MixtralForCausalLM(cfg).eval()
    prompt = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(0))
    for what in ("HF MoE blocks", "longmoe MoE layers"):
        if what == "longmoe MoE layers":
            replace_hf_moe_blocks(model)
        got = generate(model, prompt[None], max_new_tokens=NEW, timeout_s=30)[0, prompt.numel() :].tolist()
        want = greedy_ref(model, prompt, NEW)
        assert got == want, f"rank {rank}: Mixtral with {what}: generated {got}, single-process {want}"


def _singleton_groups(world):
    """A one-rank group per rank (every rank creates all of them, as new_group requires)."""
    return [dist.new_group([r]) for r in range(world)]


def _sparse_prefill(rank, world):
    """XAttention-sparse prefill (Ulysses) across ranks equals the same sparse prefill on one process, and
    differs from dense (so the masks matter at this threshold). Per-query-head selection: with the GQA group
    mean and heads_kv < P a rank averages only its own heads of a group (documented in ulysses_attention)."""
    alone = _singleton_groups(world)[rank]
    model = tiny_llama()
    sp = XAttentionConfig(threshold=0.5, stride=4, block_size=8, head_selection="head")
    ids = torch.randint(
        0, VOCAB, (2, 49), generator=torch.Generator().manual_seed(4)
    )  # 48 prefilled: 6 blocks
    if HQ % world:
        with pytest.raises(ValueError, match="heads_q % world_size == 0"):
            generate(model, ids, max_new_tokens=NEW, sparse=sp, timeout_s=30)
        return
    got = generate(model, ids, max_new_tokens=NEW, sparse=sp, timeout_s=30)[:, 49:].tolist()
    want = generate(model, ids, max_new_tokens=NEW, sparse=sp, group=alone)[:, 49:].tolist()
    dense = generate(model, ids, max_new_tokens=NEW, group=alone)[:, 49:].tolist()
    assert got == want, f"rank {rank}/{world}: sparse prefill generated {got}, one process {want}"
    assert want != dense, f"sparse and dense prefill generated the same {dense}: the test shows nothing"
    with pytest.raises(ValueError, match="sparse prefill runs on Ulysses only"):
        generate(model, ids, max_new_tokens=1, sparse=sp, algorithm="token_ring")


def _crop(rank, world):
    """After generate, crop(c) leaves exactly the first tokens of every sequence across the ranks' shards:
    reassembled by the owner log, they equal one process's cache of those tokens."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (17, 4, 11)]
    ids, mask = left_pad(prompts)
    cache = ShardedKVCache(len(prompts))
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, cache=cache, algorithm="kv_ring",
                   timeout_s=30)  # fmt: skip
    assert cache.is_croppable
    before = cache.global_lengths()
    cache.crop(3)
    assert cache.global_lengths() == [n - 3 for n in before], (before, cache.global_lengths())
    shards = [None] * world
    mine = [[cache.layers[li].keys[b, : cache.layer_lengths(li)[b]].clone() for b in range(len(prompts))]
            for li in range(LAYERS)]  # fmt: skip
    dist.all_gather_object(shards, mine)
    model.set_attn_implementation("eager")
    for b, p in enumerate(prompts):
        full = torch.cat([p, out[b, ids.shape[1] :]])[: before[b] - 3]
        with torch.no_grad():
            ref = model(full[None], use_cache=True).past_key_values
        log = cache.owner_log[b]
        assert len(log) == full.numel()
        for li in range(LAYERS):
            rows = [0] * world
            got = []
            for r in log:  # token t is rank r's next row
                got.append(shards[r][li][b][rows[r]])
                rows[r] += 1
            assert rows == [shards[r][li][b].shape[0] for r in range(world)], f"rank {rank}: rows left over"
            torch.testing.assert_close(torch.stack(got), ref.layers[li].keys[0].transpose(0, 1), rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"rank {rank} seq {b} layer {li}: {m}")  # fmt: skip
    with pytest.raises(ValueError, match="cannot remove more than the shortest"):
        cache.crop(10**6)


def _hf_generate_hook(rank, world):
    """model.generate through enable_sharded_generate equals Hugging Face's own generate (one process), with
    left padding and EOS stopping (finished rows padded, shorter output when every row finished); options it
    cannot honour raise by name; disable restores HF's."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(8)
    ids, mask = left_pad([torch.randint(0, VOCAB, (n,), generator=g) for n in (15, 9)])
    hf = model.generate  # the class's method, before the hook
    model.set_attn_implementation("eager")
    plain = hf(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(plain[0, ids.shape[1] + 1])  # row 0 ends at its second new token
    model.set_attn_implementation("eager")
    want = hf(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    enable_sharded_generate(model, timeout_s=30)
    try:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, plain), f"rank {rank}: hooked generate {got.tolist()} != HF {plain.tolist()}"
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, want), f"rank {rank}: with EOS {eos}: {got.tolist()} != HF {want.tolist()}"
        with pytest.raises(NotImplementedError, match=r"\['num_beams'\]"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2)
        with pytest.raises(NotImplementedError, match="streamer"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, streamer=object())
    finally:
        disable_sharded_generate(model)
    assert "generate" not in vars(model)


def extras(world: int) -> list:
    """Checks run in the same spawn after the cases (bad inputs and Mixtral ride on world 2's)."""
    return [_sampled, _sparse_prefill, _crop, _hf_generate_hook] + (
        [_bad_inputs, _mixtral] if world == 2 else []
    )


def test_mixtral_style_moe_equals_single_process():
    failures = _failures(2)[len(cases(2)) + extras(2).index(_mixtral)]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------- dead rank
def _dead_mid_decode(rank, world):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def die(module, args, kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 4:  # the prefill, then decode steps 0, 1; dies entering step 2
            os._exit(3)

    model.register_forward_pre_hook(die, with_kwargs=True)
    try:
        generate(model, ids, max_new_tokens=6, timeout_s=5)
    except DecodeError as exc:
        msg = str(exc)
        assert f"rank {rank}" in msg and "token step 2" in msg, msg
        return msg
    raise AssertionError(f"rank {rank}: decoding with a dead peer did not raise")


def test_dead_rank_mid_decode_makes_the_others_raise():
    with pytest.raises(SpawnError) as info:
        spawn(_dead_mid_decode, 3, timeout_s=90)
    assert list(info.value.failures) == [1], info.value.failures  # only the dead rank failed
    assert info.value.terminated == [], "surviving ranks hung until the launcher killed them"
