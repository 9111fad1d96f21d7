"""Property-based fuzzing (hypothesis) of token dispatch and routing, bounded to keep the suite's time.

* permute then unpermute with unit weights and top_k = 1 returns the input bit for bit, and with any
  probabilities equals the explicit per-slot sum, for any expert ids (dropped slots, empty experts);
* top-k routing with many tied scores picks a valid top-k (no unpicked expert scores higher than a
  picked one), distinct experts, the same picks on a rerun, and weights that sum to 1. Ties are broken as
  ``torch.topk`` breaks them, which is what Hugging Face and Megatron-core routers do (parity).
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
@given(st.integers(1, 30), st.integers(2, 8), st.integers(0, 2**16))
def test_topk_routing_with_ties(tokens, experts, seed):
    g = torch.Generator().manual_seed(seed)
    top_k = int(torch.randint(1, experts + 1, (1,), generator=g))
    levels = torch.randint(0, 3, (tokens, experts), generator=g).double()  # few distinct values: many ties
    probs, ids, _ = topk_routing(levels, top_k=top_k, score_function="softmax")
    assert torch.equal(ids, topk_routing(levels, top_k=top_k, score_function="softmax")[1])  # deterministic
    for t in range(tokens):
        picked = ids[t].tolist()
        assert len(set(picked)) == top_k, picked
        rest = [e for e in range(experts) if e not in picked]
        if rest:
            assert min(levels[t, picked]) >= max(levels[t, rest]), (levels[t].tolist(), picked)
    torch.testing.assert_close(probs.sum(-1), torch.ones(tokens, dtype=torch.float64))
