"""``longmoe.generate``: a Hugging Face causal LM across the ranks of a sequence-parallel group.

1. **Prefill** of the first ``L_b - 1`` prompt tokens of each sequence ``b``: every rank runs the model on
   its layout shard of the prompts (token ids and their global positions, so RoPE is exact) with the
   attention implementation ``"longmoe_sharded"``, which runs :func:`sequence_parallel_attention`
   (TokenRing, KV ring, Ulysses or ``auto``) and writes each rank's K/V shard into the
   :class:`ShardedKVCache` - no communication beyond the attention's own. Prompts of equal length that the
   layout divides run as a batch; otherwise they are packed as documents (``cu_seqlens``; rings only),
   which shards any length, also shorter than the group (a rank may hold no token of a sequence).
2. **Decode**: the last prompt token, then each generated token, runs through the model on every rank
   (replicated projections, MLP, head: (B, 1) tokens). Attention is :func:`sharded_decode_attention`:
   local partial over the shard, one all-gather of ``(B, Hq, D + 1)`` fp32 per layer, exact merge in rank
   order. The new K/V go to the rank with the fewest tokens of that sequence (balanced append).
3. The next token is chosen on every rank from identical logits: greedy ``argmax`` (ties to the lowest id,
   as ``torch.argmax``), or sampling from a ``torch.Generator`` seeded with ``seed`` on every rank, so
   every rank draws the same token without communicating.

Only the first token of a prompt is never prefilled (L_b - 1 tokens are), so a one-token prompt skips
prefill. Greedy output equals single-process greedy decoding token for token in fp32 (tests: HF ``generate``
on one process; a cache-free greedy loop at P = 2, 3, 4). The logits differ from one process's by rounding
(the LSE merge sums in another order), so a near-tie between two tokens could in principle flip.
"""

from __future__ import annotations

import bisect
import contextlib

import torch
import torch.distributed as dist

from longmoe.attention import XAttentionConfig
from longmoe.inference.cache import ShardedKVCache
from longmoe.inference.decode import (
    DECODE_MERGES,
    DecodeContext,
    choose_decode_merge,
    sharded_decode_attention,
)
from longmoe.parallel.api import ALGORITHM_CHOICES, sequence_parallel_attention
from longmoe.parallel.cost_model import Topology
from longmoe.parallel.layout import LAYOUTS, ShardLayout, check_layout, shard_positions
from longmoe.parallel.measure import measure_topology
from longmoe.runtime.collectives import check_same_across_ranks
from longmoe.runtime.distributed import group_key, world_and_rank
from longmoe.runtime.exchanger import CommStats

__all__ = [
    "generate", "register_sharded_attention", "SHARDED_ATTENTION_NAME", "enable_sharded_generate",
    "disable_sharded_generate",
]  # fmt: skip

SHARDED_ATTENTION_NAME = "longmoe_sharded"
_CTX_ATTR = "_longmoe_decode_ctx"


# ------------------------------------------------------------------------------------- HF attention
def _no_mask(*args, **kwargs):
    """Mask builder for ``longmoe_sharded``: the attention knows its mask (causal prefill over shards,
    full visibility of the cache in decode), so transformers builds none."""
    return None


def hf_sharded_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for :func:`generate`.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim) - the
    local prompt shard in prefill, this rank's cache shard in decode. Returns ((batch, seqlen_q, heads_q,
    head_dim), None).
    """
    ctx: DecodeContext | None = getattr(module, _CTX_ATTR, None)
    if ctx is None:
        raise RuntimeError(
            f"attn_implementation={SHARDED_ATTENTION_NAME!r} runs only inside longmoe.generate (it needs the "
            "sharded cache and the group)"
        )
    if dropout and module.training:
        raise NotImplementedError(f"{SHARDED_ATTENTION_NAME}: dropout is not supported")
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if ctx.phase == "prefill":
        out = sequence_parallel_attention(
            q, k, v, group=ctx.group, causal=True, softmax_scale=scaling, layout=ctx.layout,
            algorithm=ctx.algorithm, cu_seqlens=ctx.cu_seqlens, timeout_s=ctx.timeout_s, stats=ctx.stats,
            sparse=ctx.sparse, topology=ctx.topology,
        )  # fmt: skip
        return out, None
    out = sharded_decode_attention(
        q, k, v, ctx.cache.layer_lengths(module.layer_idx), group=ctx.group, softmax_scale=scaling,
        timeout_s=ctx.timeout_s, step=ctx.step, layer=module.layer_idx, stats=ctx.stats, merge=ctx.merge,
        owners=ctx.owners,
    )  # fmt: skip
    return out, None


def register_sharded_attention() -> None:
    """Register ``"longmoe_sharded"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SHARDED_ATTENTION_NAME, hf_sharded_attention)
    AttentionMaskInterface.register(SHARDED_ATTENTION_NAME, _no_mask)


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def _check_model(model) -> list:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model ({name}) is not a Hugging Face PreTrainedModel; expected a causal LM")
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        raise ValueError(
            f"model {name}: its attention does not go through transformers' AttentionInterface, so longmoe "
            "cannot shard it; supported: Llama-style and Mixtral-style causal LMs"
        )
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"model {name} has no attention modules with layer_idx and num_key_value_groups")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("sliding_window", "attn_logit_softcapping"):
        if getattr(text, attr, None) is not None:
            raise ValueError(
                f"model {name}: {attr}={getattr(text, attr)!r} is not supported by sharded decoding"
            )
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        raise ValueError(f"model {name}: layer_types={text.layer_types} - only full attention is supported")
    return mods


# ----------------------------------------------------------------------------------------- prefill
def _prefill_plan(lengths, world, rank, layout, algorithm):
    """Local prompt tokens of this rank. Returns (mode, cu_seqlens or None, per-sequence global positions
    on this rank, per-rank counts, per-sequence owner rank of every token). mode: "batch" (equal lengths the
    layout divides), "packed" or "none" (nothing to prefill)."""
    parts = 2 * world if layout == "zigzag" else world
    equal = len(set(lengths)) == 1
    if equal and lengths[0] > 0 and lengths[0] % parts == 0:
        owner = [0] * lengths[0]
        for r in range(world):
            for t in shard_positions(lengths[0], r, world, layout).tolist():
                owner[t] = r
        pos = shard_positions(lengths[0], rank, world, layout).tolist()
        each = lengths[0] // world
        return "batch", None, [pos] * len(lengths), [[each] * world for _ in lengths], [owner] * len(lengths)
    if algorithm == "ulysses":
        raise ValueError(
            f"algorithm='ulysses' needs prompts of equal length divisible by {parts} (layout={layout!r}, world "
            f"{world}) after the last prompt token is held back for decoding; got prefill lengths {lengths}. Use "
            "'token_ring', 'kv_ring' or 'auto'"
        )
    docs = [n for n in lengths if n > 0]
    if not docs:
        return "none", None, [[] for _ in lengths], [[0] * world for _ in lengths], [[] for _ in lengths]
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int64)
    shard = ShardLayout.make(world, layout, cu_seqlens=cu)
    starts, doc_of = [], []
    for b, n in enumerate(lengths):
        if n > 0:
            starts.append(int(cu[len(starts)]))
            doc_of.append(b)
    positions = [[] for _ in lengths]
    counts = [[0] * world for _ in lengths]
    owners = [[0] * n for n in lengths]
    bounds = cu.tolist()
    for r in range(world):
        for g in shard.global_index(r):
            d = bisect.bisect_right(bounds, g) - 1
            counts[doc_of[d]][r] += 1
            owners[doc_of[d]][g - starts[d]] = r
            if r == rank:
                positions[doc_of[d]].append(g - starts[d])
    return "packed", cu, positions, counts, owners


def _prefill(model, ids, lengths, cache, ctx, world, rank, layout, algorithm):
    """Run the sequence-parallel prefill of ``lengths[b]`` leading tokens of each row ``ids[b]``."""
    mode, cu, positions, counts, owners = _prefill_plan(lengths, world, rank, layout, algorithm)
    if mode == "none":
        cache.plan_prefill([(0, 0, 0)] * len(lengths), counts, owners)
        return
    if mode == "batch":
        pos = torch.tensor(positions[0], dtype=torch.int64)
        local_ids = ids[:, pos]
        position_ids = pos.unsqueeze(0).expand(len(lengths), -1)
        rows = [(b, 0, len(positions[0])) for b in range(len(lengths))]
    else:
        flat_ids, flat_pos, rows = [], [], []
        for b, pos in enumerate(positions):
            rows.append((0, len(flat_pos), len(flat_pos) + len(pos)))
            flat_ids.extend(int(ids[b, p]) for p in pos)
            flat_pos.extend(pos)
        local_ids = torch.tensor([flat_ids], dtype=torch.int64)
        position_ids = torch.tensor([flat_pos], dtype=torch.int64)
    cache.plan_prefill(rows, counts, owners)
    ctx.phase, ctx.cu_seqlens = "prefill", cu
    model(input_ids=local_ids.to(ids.device), position_ids=position_ids.to(ids.device), past_key_values=cache,
          use_cache=True, logits_to_keep=1)  # fmt: skip


# ---------------------------------------------------------------------------------------- generate
def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    """logits: (batch, vocab) fp32 -> (batch,) int64."""
    if not do_sample:
        return logits.argmax(dim=-1)  # first maximum: ties go to the lowest token id
    scores = logits / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@contextlib.contextmanager
def _sharded_attention(model, mods, ctx):
    register_sharded_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(SHARDED_ATTENTION_NAME)
    for m in mods:
        setattr(m, _CTX_ATTR, ctx)
    try:
        yield
    finally:
        for m in mods:
            with contextlib.suppress(AttributeError):
                delattr(m, _CTX_ATTR)
        model.set_attn_implementation(previous)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
    layout: str = "zigzag",
    algorithm: str = "auto",
    cache: ShardedKVCache | None = None,
    timeout_s: float = 60.0,
    stats: CommStats | None = None,
    timings: dict | None = None,
    merge: str = "auto",
    topology: Topology | None = None,
    sparse: XAttentionConfig | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens per sequence with a Hugging Face causal LM over ``group``.

    Every rank of ``group`` calls it with the same model weights and arguments. input_ids: (batch, seqlen)
    int64; with ``attention_mask`` (batch, seqlen) of 0/1, prompts are left-padded as for HF ``generate``
    (each row's 1s must be a suffix). Returns (batch, seqlen + max_new_tokens) int64: the prompts (padding
    kept) followed by the new tokens, identical on every rank. With ``eos_token_id`` (one id or a list), as
    Hugging Face: a sequence that produced an EOS continues with ``pad_token_id``, and generation stops
    once every sequence has (so the result may be shorter); EOS is suppressed for the first
    ``min_new_tokens`` tokens. Every rank stops at the same step without communicating (same tokens).

    ``layout``/``algorithm`` choose the prefill's sharding and sequence-parallel attention (``"auto"``: the
    cost model). ``cache``: an empty :class:`ShardedKVCache` for this batch and group (default: a new one);
    it holds the sharded K/V afterwards. ``stats`` receives the bytes moved (prefill and decode);
    ``timings`` (a dict) receives ``prefill_s``, ``decode_s`` (per-token list) and ``steps`` (per token:
    the merge used and each sequence's owner rank). Every wait is bounded by ``timeout_s`` and raises naming the rank and the token step.

    ``merge``: how each decode step's attention partials merge - ``"allgather"`` (every rank merges),
    ``"allreduce"`` (two all-reduces), ``"owner"`` (on each sequence's token owner, then broadcast) or
    ``"auto"``: per token step, the cheapest by :func:`~longmoe.inference.choose_decode_merge` on
    ``topology`` (default: measured on ``group``, cached). ``sparse``: an
    :class:`~longmoe.attention.XAttentionConfig` makes the prefill XAttention block-sparse (Ulysses: prompts
    of equal length that the layout divides, heads divisible by the group); decode stays dense. With
    ``head_selection="group"`` and fewer K/V heads than ranks, a GQA group's mask averages only the query
    heads on one rank (see :func:`~longmoe.parallel.ulysses_attention`); ``"head"`` matches one process.
    """
    import time

    mods = _check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seqlen) int64 tensor; got {got}")
    batch, seqlen = input_ids.shape
    if batch < 1 or seqlen < 1:
        raise ValueError(f"input_ids has shape {(batch, seqlen)}; expected at least one token per sequence")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 0")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature!r}; expected > 0 when sampling")
    eos = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos):
        raise ValueError(f"eos_token_id={eos_token_id!r}; expected an int, a list of ints or None")
    if eos and not isinstance(pad_token_id, int):
        raise ValueError(
            f"pad_token_id={pad_token_id!r}: an int is needed with eos_token_id={eos_token_id!r}"
        )
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens={min_new_tokens!r}; expected an int >= 0")
    check_layout(layout)
    if algorithm not in ALGORITHM_CHOICES:
        raise ValueError(f"algorithm={algorithm!r}; expected one of {ALGORITHM_CHOICES}")
    if merge not in ("auto", *DECODE_MERGES):
        raise ValueError(f"merge={merge!r}; expected 'auto' or one of {DECODE_MERGES}")
    if sparse is not None and not isinstance(sparse, XAttentionConfig):
        raise TypeError(f"sparse must be an XAttentionConfig or None; got {type(sparse).__name__}")
    if attention_mask is None:
        lengths = [seqlen] * batch
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        m = attention_mask.to(torch.int64)
        lengths = m.sum(1).tolist()
        for b, n in enumerate(lengths):
            if n < 1 or not bool((m[b, seqlen - n :] == 1).all()):
                raise ValueError(
                    f"attention_mask row {b} must be left padding (0s then at least one 1); got {m[b].tolist()}"
                )
    world, rank = world_and_rank(group)
    if cache is None:
        cache = ShardedKVCache(batch, group=group)
    else:
        if not isinstance(cache, ShardedKVCache):
            raise TypeError(f"cache must be a ShardedKVCache; got {type(cache).__name__}")
        if cache.group_id != group_key(group) or cache.world != world:
            raise ValueError(
                f"cache was built for a different process group (size {cache.world}, key {cache.group_id}) than "
                f"generate's group (size {world}, key {group_key(group)}); build it with the same group"
            )
        if cache.batch != batch or cache.get_seq_length() != 0:
            raise ValueError(
                f"cache must be empty and for batch {batch}; got batch {cache.batch} holding {cache.global_lengths()}"
            )
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD) if world > 1 else [0]
    fields = {
        "group size": world, "group's first global rank": ranks[0], "batch": batch, "seqlen": seqlen,
        "max_new_tokens": max_new_tokens, "do_sample": int(do_sample), "seed": seed,
        "layout": LAYOUTS.index(layout), "algorithm": ALGORITHM_CHOICES.index(algorithm),
        "merge": ("auto", *DECODE_MERGES).index(merge), "sparse": int(sparse is not None),
        "eos ids checksum": sum((i + 1) * (e + 1) for i, e in enumerate(eos)), "min_new_tokens": min_new_tokens,
        "input_ids checksum": int((input_ids * torch.arange(1, seqlen + 1)).sum()) % (1 << 61),
        "prompt lengths checksum": sum((i + 1) * n for i, n in enumerate(lengths)),
    }  # fmt: skip
    check_same_across_ranks(fields, group, what="longmoe.generate arguments", timeout_s=timeout_s)

    ids = torch.stack([input_ids[b, seqlen - n :].new_zeros(seqlen).index_copy(
        0, torch.arange(n), input_ids[b, seqlen - n :]) for b, n in enumerate(lengths)])  # fmt: skip
    if sparse is not None:
        if algorithm not in ("auto", "ulysses"):
            raise ValueError(
                f"sparse prefill runs on Ulysses only (whole sequences per rank); got algorithm={algorithm!r}"
            )
        if world > 1:  # raises, naming the lengths, unless the prompts can run as one Ulysses batch
            _prefill_plan([n - 1 for n in lengths], world, rank, layout, "ulysses")
    if world > 1 and topology is None and (merge == "auto" or algorithm == "auto"):
        topology = measure_topology(group)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads_q = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads_q
    ctx = DecodeContext(cache=cache, group=group, layout=layout, algorithm=algorithm, timeout_s=timeout_s,
                        stats=stats, sparse=sparse, topology=topology)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    new_tokens = []
    decode_s = []
    steps = []
    finished = torch.zeros(batch, dtype=torch.bool)
    with _sharded_attention(model, mods, ctx):
        t0 = time.perf_counter()
        _prefill(model, ids, [n - 1 for n in lengths], cache, ctx, world, rank, layout, algorithm)
        if timings is not None:
            timings["prefill_s"] = time.perf_counter() - t0
        ctx.phase, ctx.cu_seqlens = "decode", None
        token = torch.tensor([int(ids[b, n - 1]) for b, n in enumerate(lengths)], dtype=torch.int64)
        for step in range(max_new_tokens):
            t1 = time.perf_counter()
            ctx.step = step
            position = torch.tensor(cache.global_lengths(), dtype=torch.int64).unsqueeze(1)  # (B, 1)
            ctx.owners = cache.plan_decode()
            ctx.merge = merge
            if merge == "auto":
                ctx.merge = "allgather" if world == 1 else choose_decode_merge(
                    topology, world=world, batch=batch, heads_q=heads_q, head_dim=head_dim, owners=ctx.owners
                )[0]  # fmt: skip
            steps.append((ctx.merge, list(ctx.owners)))
            out = model(input_ids=token.unsqueeze(1).to(input_ids.device), position_ids=position.to(input_ids.device),
                        past_key_values=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1].float()
            if eos and step < min_new_tokens:
                logits[:, eos] = float("-inf")
            token = _pick(logits, do_sample, temperature, top_k, gen)
            if eos:  # as HF: finished sequences continue with the pad id; stop when all have finished
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
                finished |= torch.isin(token, torch.tensor(eos))
            new_tokens.append(token)
            decode_s.append(time.perf_counter() - t1)
            if eos and bool(finished.all()):
                break
    if timings is not None:
        timings["decode_s"] = decode_s
        timings["steps"] = steps
    new = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(batch, 0)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


# ------------------------------------------------------------------------------- model.generate hook
# Generation options the hook maps onto generate(); the others must be unset or at their no-op value.
_HOOK_OPTIONS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k",
                 "eos_token_id", "pad_token_id")  # fmt: skip
_HOOK_NEUTRAL = {
    "num_beams": 1, "num_return_sequences": 1, "top_p": 1.0, "repetition_penalty": 1.0, "use_cache": True,
    "return_dict_in_generate": False, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "output_logits": False, "length_penalty": 1.0, "early_stopping": False,
}  # fmt: skip
_HOOK_IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config"}


def _unsupported(key: str, value) -> bool:
    if key in _HOOK_OPTIONS or key in _HOOK_IGNORED or value is None:
        return False
    return key not in _HOOK_NEUTRAL or value != _HOOK_NEUTRAL[key]


def enable_sharded_generate(model, *, group: dist.ProcessGroup | None = None, **options):
    """Make ``model.generate(input_ids, attention_mask=..., max_new_tokens=..., ...)`` run
    :func:`generate` across ``group`` (every rank calls it, as with :func:`generate`). Returns ``model``.

    The call takes Hugging Face's arguments and ``generation_config`` (merged over
    ``model.generation_config``): ``max_new_tokens`` (or ``max_length``), ``min_new_tokens``, ``do_sample``,
    ``temperature``, ``top_k``, ``eos_token_id``, ``pad_token_id``; ``options`` are passed to :func:`generate`
    (``layout``, ``algorithm``, ``merge``, ``sparse``, ``seed``, ``timeout_s``...). Greedy output equals
    Hugging Face's own ``generate`` token for token. Any other generation option set to something but its
    no-op value (beam search, top-p, repetition penalty, logits processors, stopping criteria, assistant
    models, streamers) raises ``NotImplementedError`` naming it. :func:`disable_sharded_generate` undoes it.
    """
    _check_model(model)

    def sharded(inputs=None, generation_config=None, **kwargs):
        ids = kwargs.pop("input_ids", inputs)
        mask = kwargs.pop("attention_mask", None)
        cfg = (generation_config or model.generation_config).to_dict()
        cfg.update({k: kwargs.pop(k) for k in list(kwargs) if k in cfg or k in _HOOK_OPTIONS})
        unsupported = sorted(kwargs) + sorted(k for k, val in cfg.items() if _unsupported(k, val))
        if unsupported:
            raise NotImplementedError(
                f"model.generate with longmoe's sharded decoding does not support {unsupported}; supported: "
                f"{list(_HOOK_OPTIONS)} (see longmoe.inference.enable_sharded_generate)"
            )
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"input_ids must be a (batch, seqlen) int64 tensor; got {type(ids).__name__}")
        new = cfg.get("max_new_tokens")
        if new is None:
            if cfg.get("max_length") is None:
                raise ValueError("model.generate needs max_new_tokens or max_length")
            new = max(cfg["max_length"] - ids.shape[1], 0)
        eos = cfg.get("eos_token_id")
        pad = cfg.get("pad_token_id")
        if eos is not None and pad is None:
            pad = eos if isinstance(eos, int) else eos[0]  # HF's fallback, with its warning left out
        return generate(
            model, ids, group=group, attention_mask=mask, max_new_tokens=new, do_sample=bool(cfg.get("do_sample")),
            temperature=1.0 if cfg.get("temperature") is None else cfg["temperature"], top_k=cfg.get("top_k"),
            eos_token_id=eos, pad_token_id=pad, min_new_tokens=cfg.get("min_new_tokens") or 0, **options,
        )  # fmt: skip

    sharded.__doc__ = (
        f"longmoe sharded generate (group size {world_and_rank(group)[0]}); see enable_sharded_generate"
    )
    model.generate = sharded
    return model


def disable_sharded_generate(model):
    """Undo :func:`enable_sharded_generate`: ``model.generate`` is Hugging Face's again. Returns ``model``."""
    if "generate" in vars(model):
        del model.generate
    return model
