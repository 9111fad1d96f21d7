"""Property-based fuzzing (hypothesis) of token dispatch and routing, bounded to keep the suite's time.

* permute then unpermute with unit weights and top_k = 1 returns the input bit for bit, and with any
  probabilities equals the explicit per-slot sum, for any expert ids (dropped slots, empty experts);
* no row is lost or duplicated, up to 256 experts and top-8, with drops and with every slot on one expert:
  the dispatch map is a bijection between kept slots and rows, every row is its token's row bit for bit,
  the counts sum to ``tokens * top_k - dropped``, and unpermute inverts permute;
* top-k routing with many tied scores picks a valid top-k (no unpicked expert scores higher than a
  picked one), distinct experts, the same picks on a rerun, and weights that sum to 1. Ties go to the lower
  expert index (the order of a stable descending sort), on every device; ``torch.topk`` leaves them to the
  implementation, so Hugging Face and Megatron-core agree with us only where scores are distinct.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longmoe.moe import moe_dispatch_map, moe_permute, moe_unpermute
from longmoe.moe.router import topk_routing

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**16), st.booleans())
def test_permute_unpermute(tokens, experts, top_k, seed, drop):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    if drop:
        ids[torch.rand(tokens, top_k, generator=g) < 0.3] = -1  # dropped slots
    x = torch.randn(tokens, 8, generator=g, dtype=torch.float64)
    dmap = moe_dispatch_map(ids, experts)
    rows = moe_permute(x, dmap)
    assert rows.shape[0] == int((ids >= 0).sum()) == int(dmap.tokens_per_expert.sum())
    probs = torch.rand(tokens, top_k, generator=g, dtype=torch.float64)
    out = moe_unpermute(rows * 3.0, dmap, probs)
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            if ids[t, j] >= 0:
                want[t] += probs[t, j] * 3.0 * x[t]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if top_k == 1 and not drop:
        assert torch.equal(moe_unpermute(rows, dmap, torch.ones(tokens, 1, dtype=torch.float64)), x)


@SETTINGS
@given(
    st.integers(0, 64),
    st.sampled_from([1, 2, 8, 64, 256]),
    st.integers(1, 8),
    st.integers(0, 2**16),
    st.sampled_from(["random", "distinct", "one-expert"]),
    st.floats(0.0, 0.9),
)
def test_no_row_lost_or_duplicated(tokens, experts, top_k, seed, kind, drop_frac):
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":  # as top-k routing gives (needs top_k <= experts)
        top_k = min(top_k, experts)
        ids = torch.rand(tokens, experts, generator=g).argsort(-1)[:, :top_k]
    elif kind == "one-expert":  # every slot on one expert: the others get nothing
        ids = torch.full((tokens, top_k), int(torch.randint(0, experts, (1,), generator=g)))
    else:
        ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    ids[torch.rand(tokens, top_k, generator=g) < drop_frac] = -1  # capacity drops
    dropped = int((ids < 0).sum())
    x = torch.randn(tokens, 24, generator=g)
    dmap = moe_dispatch_map(ids, experts)
    rows = moe_permute(x, dmap)

    # Counts: the histogram of kept slots, summing to tokens * top_k - dropped.
    assert int(dmap.tokens_per_expert.sum()) == tokens * top_k - dropped == rows.shape[0]
    assert torch.equal(dmap.tokens_per_expert, torch.bincount(ids[ids >= 0], minlength=experts))
    # A bijection: every kept slot has one row, every row one kept slot, and the row is its token's.
    flat = dmap.row_map.reshape(-1)
    kept = (ids.reshape(-1) >= 0).nonzero().squeeze(1)
    assert torch.equal(flat[kept].sort().values, torch.arange(rows.shape[0]))
    assert bool((flat[ids.reshape(-1) < 0] == -1).all())
    assert torch.equal(dmap.src_slot.sort().values, kept)
    assert torch.equal(flat[dmap.src_slot], torch.arange(rows.shape[0]))
    assert torch.equal(rows, x[dmap.src_slot // top_k])  # bit for bit
    # Expert-contiguous: rows of expert e are the e-th block.
    assert torch.equal(ids.reshape(-1)[dmap.src_slot], torch.repeat_interleave(dmap.tokens_per_expert))
    # unpermute inverts permute: weights 1 / (kept slots of the token) give back x (0 for fully dropped
    # tokens); with one kept slot per token it is exact.
    n_kept = (ids >= 0).sum(1, keepdim=True)
    w = torch.where(ids >= 0, 1.0 / n_kept.clamp(min=1), 0.0)
    back = moe_unpermute(rows, dmap, w)
    want = torch.where(n_kept > 0, x, 0.0)
    torch.testing.assert_close(back, want, rtol=1e-6, atol=1e-6)
    if bool((n_kept <= 1).all()):
        assert torch.equal(back, want)


@SETTINGS
@given(st.integers(1, 30), st.sampled_from([2, 3, 8, 64, 256]), st.integers(0, 2**16), st.booleans())
def test_topk_routing_with_ties(tokens, experts, seed, biased):
    g = torch.Generator().manual_seed(seed)
    top_k = int(torch.randint(1, min(experts, 8) + 1, (1,), generator=g))
    levels = torch.randint(0, 3, (tokens, experts), generator=g).double()  # few distinct values: many ties
    bias = torch.randint(0, 2, (experts,), generator=g).float() if biased else None
    probs, ids, _ = topk_routing(levels, top_k=top_k, score_function="softmax", expert_bias=bias)
    assert torch.equal(ids, topk_routing(levels, top_k=top_k, score_function="softmax", expert_bias=bias)[1])
    # The rule: a stable descending sort of the (biased) scores, i.e. ties go to the lower expert index.
    key = torch.softmax(levels, -1) + (0 if bias is None else bias.double())
    assert torch.equal(ids, torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :top_k])
    if biased:
        return
    for t in range(tokens):
        picked = ids[t].tolist()
        assert len(set(picked)) == top_k, picked
        rest = [e for e in range(experts) if e not in picked]
        if rest:
            assert min(levels[t, picked]) >= max(levels[t, rest]), (levels[t].tolist(), picked)
    torch.testing.assert_close(probs.sum(-1), torch.ones(tokens, dtype=torch.float64))
