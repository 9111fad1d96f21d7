"""ShardedKVCache through the Hugging Face Cache API, the balanced-append policy, decode bytes, and
longmoe.generate's single-process behaviour and input checks (no process group)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from longmoe.inference import ShardedKVCache, balanced_owner, decode_bytes, generate
from tests.inference.test_generate import NEW, VOCAB, greedy_ref, hf_greedy, left_pad, tiny_llama


def test_reference_is_hf_generate():
    """The cache-free greedy reference used by the distributed tests equals HF generate, and so does ours
    on one process (B = 1 and a left-padded B = 3 batch)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (1, 2, 17)]
    want = [hf_greedy(model, p, NEW) for p in prompts]
    assert [greedy_ref(model, p, NEW) for p in prompts] == want
    assert [generate(model, p[None], max_new_tokens=NEW)[0, p.numel() :].tolist() for p in prompts] == want
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
    assert out[:, ids.shape[1] :].tolist() == want


def test_balanced_owner_keeps_shards_within_one_token():
    counts = [3, 2, 3, 2]
    owners = []
    for _ in range(9):
        r = balanced_owner(counts)
        owners.append(r)
        counts[r] += 1
        assert max(counts) - min(counts) <= 1, counts
    assert owners[:4] == [1, 3, 0, 1]  # fewest tokens first, ties to the lowest rank


def test_single_process_cache_equals_dynamic_cache():
    """At P = 1 the sharded cache holds exactly HF's DynamicCache (same bytes and values)."""
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    cache = ShardedKVCache(2)
    out = generate(model, ids, max_new_tokens=3, cache=cache)
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        model(out[:, :-1], past_key_values=dyn, use_cache=True)  # the last token is never cached
    assert cache.global_lengths() == [13, 13] and cache.get_seq_length() == dyn.get_seq_length() == 13
    dyn_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in dyn.layers)
    assert cache.memory_bytes() == dyn_bytes
    for i, layer in enumerate(dyn.layers):
        ours = cache.layers[i].keys[:, :13].transpose(1, 2)
        torch.testing.assert_close(ours, layer.keys, rtol=1e-5, atol=1e-5)


def test_hf_cache_api_reorder_and_crop():
    cache = ShardedKVCache(3)
    cache.plan_prefill([(b, 0, n) for b, n in enumerate((4, 2, 3))], [[4], [2], [3]])
    k = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).reshape(3, 2, 4, 5)
    assert cache.update(k, k + 1, 0)[0] is k  # prefill returns the local shard unchanged
    assert cache.layer_lengths(0) == [4, 2, 3] and cache.get_seq_length() == 4 and cache.batch_size == 3
    cache.reorder_cache(torch.tensor([2, 0, 0]))  # beam search: rows follow their beams
    assert cache.layer_lengths(0) == [3, 4, 4] and cache.global_lengths() == [3, 4, 4]
    torch.testing.assert_close(cache.layers[0].keys[0, :3], k[2, :, :3].transpose(0, 1))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and cache.global_lengths() == [3, 3, 4, 4, 4, 4]
    assert cache.is_croppable
    with pytest.raises(ValueError, match=r"crop\(tokens_to_remove=-1\)"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="cannot remove more than the shortest"):
        cache.crop(4)
    cache.crop(1)  # drops the last token of every row
    assert cache.layer_lengths(0) == [2, 2, 3, 3, 3, 3] and cache.global_lengths() == [2, 2, 3, 3, 3, 3]
    cache.crop(0)
    owners = cache.plan_decode()
    assert owners == [0] * 6
    k1 = torch.randn(6, 2, 1, 5)
    keys, _ = cache.update(k1, k1, 0)
    assert keys.shape == (6, 2, 4, 5) and cache.layer_lengths(0) == [3, 3, 4, 4, 4, 4]
    torch.testing.assert_close(keys[0, :, 2], k1[0, :, 0])  # the new token follows the cropped prefix
    with pytest.raises(ValueError, match="decode step takes"):
        cache.update(torch.randn(6, 2, 2, 5), torch.randn(6, 2, 2, 5), 0)
    cache.reset()
    assert cache.get_seq_length() == 0
    with pytest.raises(RuntimeError, match="no plan"):
        cache.update(k1, k1, 0)


def test_decode_merge_choice_follows_the_topology():
    """Latency-bound (gloo on CPU): the all-gather at P = 2, the owner merge for one owner at P = 4, the
    all-gather again when four owners each need their own gather and broadcast. Bandwidth-bound, large
    partials: the all-reduce (2 (P - 1) chunks of 1/P; the owner merge moves two whole partials, and
    behind a switch the owner's NIC carries every one)."""
    from longmoe.inference import DECODE_MERGES, choose_decode_merge, decode_merge_time, merge_sends
    from longmoe.parallel import Topology

    lat = Topology(latency=1e-3, link_bandwidth=50e6)
    kw = dict(heads_q=32, head_dim=128)
    assert choose_decode_merge(lat, world=2, batch=1, **kw)[0] == "allgather"
    assert choose_decode_merge(lat, world=4, batch=1, owners=[3], **kw)[0] == "owner"
    assert choose_decode_merge(lat, world=4, batch=4, owners=[0, 1, 2, 3], **kw)[0] == "allgather"
    big = dict(world=8, batch=64, heads_q=64, head_dim=128)
    for kind, want in (("mesh", "allreduce"), ("switch", "allreduce")):
        topo = Topology(kind=kind, latency=0.0, link_bandwidth=1e9)
        pick, times = choose_decode_merge(topo, **big)
        assert pick == want, (kind, times)
        assert set(times) == set(DECODE_MERGES) and times[pick] == decode_merge_time(pick, topo, **big)
        assert times["owner"] < times["allgather"] if kind == "mesh" else times["owner"] > times["allgather"]
    # Rounds: P - 1 for the all-gather, 4 (P - 1) for the two ring all-reduces, 2 per distinct owner.
    assert len(merge_sends("allgather", world=5, batch=1, **kw)) == 4
    assert len(merge_sends("allreduce", world=5, batch=1, **kw)) == 16
    assert len(merge_sends("owner", world=5, batch=3, owners=[1, 4, 1], **kw)) == 4
    with pytest.raises(ValueError, match="merge='tree'"):
        merge_sends("tree", world=2, batch=1, **kw)


def test_decode_bytes_do_not_grow_with_context():
    kw = dict(world=4, batch=1, heads_q=32, heads_kv=8, head_dim=128, layers=32)
    short, long = decode_bytes(context=4096, **kw), decode_bytes(context=65536, **kw)
    assert short["token_ring"] == long["token_ring"] == 32 * 3 * 32 * 129 * 4
    assert long["naive_kv_gather"] == 16 * short["naive_kv_gather"]


def test_bad_inputs_name_the_argument():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="input_ids must be a .* int64"):
        generate(model, ids.float(), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="algorithm='ring'"):
        generate(model, ids, max_new_tokens=1, algorithm="ring")
    with pytest.raises(ValueError, match="layout='diagonal'"):
        generate(model, ids, max_new_tokens=1, layout="diagonal")
    with pytest.raises(ValueError, match="attention_mask row 0 must be left padding"):
        generate(model, ids, max_new_tokens=1, attention_mask=torch.tensor([[1, 1, 1, 0, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="pad_token_id=None: an int is needed with eos_token_id=3"):
        generate(model, ids, max_new_tokens=1, eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id='x'"):
        generate(model, ids, max_new_tokens=1, eos_token_id="x", pad_token_id=0)
    with pytest.raises(ValueError, match="min_new_tokens=-2"):
        generate(model, ids, max_new_tokens=1, min_new_tokens=-2)
    with pytest.raises(ValueError, match="merge='tree'"):
        generate(model, ids, max_new_tokens=1, merge="tree")
    with pytest.raises(ValueError, match="cache must be empty and for batch 2"):
        generate(model, ids, max_new_tokens=1, cache=ShardedKVCache(3))
    with pytest.raises(TypeError, match="not a Hugging Face PreTrainedModel"):
        generate(torch.nn.Linear(2, 2), ids, max_new_tokens=1)
    with pytest.raises(RuntimeError, match="runs only inside longmoe.generate"):
        from longmoe.inference import register_sharded_attention

        register_sharded_attention()
        model.set_attn_implementation("longmoe_sharded")
        try:
            model(ids)
        finally:
            model.set_attn_implementation("eager")
