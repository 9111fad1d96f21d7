"""Router: capacity and dropping, auxiliary losses and their gradients, aux-loss-free expert bias."""

from __future__ import annotations

import math

import pytest
import torch

from longmoe.moe import (
    MoEConfig,
    MoELayer,
    apply_capacity,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
    topk_routing,
)
from longmoe.moe.router import _mm_f32, _onednn_f32_gemm
from tests.moe.reference import clone_params


def _identity_router_layer(cfg: MoEConfig) -> MoELayer:
    """hidden_size == num_experts and router weight = I: the input rows *are* the router logits."""
    layer = MoELayer(cfg, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(cfg.num_experts, dtype=torch.float64))
    return layer


def _expected_keep(probs, ids, num_experts, capacity, policy):
    """Slots kept, decided one expert at a time in plain Python."""
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(t, j) for t in range(ids.shape[0]) for j in range(ids.shape[1]) if ids[t, j] == e]
        if policy == "probs":
            slots.sort(key=lambda s: (-float(probs[s]), s[0]))  # highest weight first, earlier token on ties
        for t, j in slots[:capacity]:
            keep[t, j] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_what_the_policy_says(policy, capacity_factor):
    cfg = MoEConfig(
        hidden_size=6,
        ffn_hidden_size=8,
        num_experts=6,
        top_k=2,
        capacity_factor=capacity_factor,
        drop_policy=policy,
    )
    layer = _identity_router_layer(cfg)
    tokens = 30
    logits = torch.randn(tokens, 6, dtype=torch.float64)
    logits[:, 0] += 2.0  # skewed: expert 0 is over-subscribed
    logits[3, :] = logits[2, :]  # two tokens with identical weights: ties break by position
    x = logits.clone().requires_grad_(True)

    route = layer.router(x)
    probs, ids, _ = topk_routing(logits, top_k=2)
    cap = expert_capacity(tokens, 2, 6, capacity_factor)
    assert cap == math.ceil(capacity_factor * tokens * 2 / 6)
    keep = _expected_keep(probs, ids, 6, cap, policy)
    assert torch.equal(route.expert_ids, torch.where(keep, ids, -1))
    assert torch.equal(route.probs, torch.where(keep, probs, 0.0))
    assert bool((torch.bincount(route.expert_ids[keep], minlength=6) <= cap).all())

    out, aux = layer(x)
    assert aux.dropped_tokens.item() == int((~keep).sum()) > 0
    assert aux.tokens_per_expert.sum().item() == int(keep.sum())
    assert torch.equal(aux.routed_tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=6))

    # Kept slots are combined exactly like the dropless layer; dropped slots add nothing; tokens with no kept
    # slot come out as exactly 0 (the residual connection around the layer passes them through).
    params = clone_params(layer, torch.float64)
    rows = []
    for t in range(tokens):
        acc = torch.zeros(6, dtype=torch.float64)
        for j in range(2):
            if keep[t, j]:
                e = int(ids[t, j])
                h = params["experts.linear_fc1"][e] @ logits[t]
                y = params["experts.linear_fc2"][e] @ (torch.nn.functional.silu(h[:8]) * h[8:])
                acc = acc + probs[t, j] * y
        rows.append(acc)
    torch.testing.assert_close(out, torch.stack(rows), rtol=0, atol=1e-12)  # fp64, summation order only
    dead = ~keep.any(1)
    assert bool((out[dead] == 0).all())
    out.sum().backward()  # dropped slots get no gradient through their weights
    assert torch.isfinite(x.grad).all()


def test_capacity_function_matches_layer_on_arbitrary_ids():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    p, i = apply_capacity(probs, ids, 2, 2, "probs")
    assert i.tolist() == [[0, -1], [0, -1], [-1, 1], [1, -1]]
    assert p.tolist() == [
        [pytest.approx(0.9), 0.0],
        [pytest.approx(0.8), 0.0],
        [0.0, pytest.approx(0.7)],
        [0.5, 0.0],
    ]
    _, i = apply_capacity(probs, ids, 2, 2, "position")
    assert i.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1]]


def test_aux_losses_and_gradients_match_hand_computation():
    cfg = MoEConfig(
        hidden_size=3, ffn_hidden_size=4, num_experts=3, top_k=1, aux_loss_coeff=0.5, z_loss_coeff=0.25
    )
    layer = _identity_router_layer(cfg)
    logits = torch.tensor(
        [[2.0, 0.0, -1.0], [1.5, 0.5, 0.0], [0.0, 3.0, 0.0], [0.2, 0.1, 0.0]], dtype=torch.float64
    )
    x = logits.clone().requires_grad_(True)
    _, aux = layer(x)

    T, E = 4, 3
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    counts = [3, 1, 0]  # argmax of the rows: 0, 0, 1, 0
    f = [c / (T * 1) for c in counts]
    P = [sum(p[t][e] for t in range(T)) / T for e in range(E)]
    lb = E * sum(f[e] * P[e] for e in range(E))
    lse = [math.log(sum(math.exp(u) for u in row)) for row in logits.tolist()]
    z = sum(v * v for v in lse) / T
    assert aux.tokens_per_expert.tolist() == counts
    assert aux.load_balancing_loss.item() == pytest.approx(lb, rel=1e-12)
    assert aux.z_loss.item() == pytest.approx(z, rel=1e-12)
    assert aux.loss.item() == pytest.approx(0.5 * lb + 0.25 * z, rel=1e-12)

    # d lb / d logit[t, i] = E/T * p[t][i] * (f[i] - sum_e f[e] p[t][e]); d z / d logit[t, i] = 2 lse[t] p[t][i] / T
    aux.loss.backward()
    want = [
        [
            0.5 * E / T * p[t][i] * (f[i] - sum(f[e] * p[t][e] for e in range(E)))
            + 0.25 * 2 * lse[t] * p[t][i] / T
            for i in range(E)
        ]
        for t in range(T)
    ]
    torch.testing.assert_close(x.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # Standalone functions, balanced case: loss 1.
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4]), 2).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_zero_coefficients_build_no_graph():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2)
    _, aux = MoELayer(cfg)(torch.randn(5, 8, requires_grad=True))
    assert aux.load_balancing_loss.grad_fn is None and aux.z_loss is None and aux.loss.item() == 0.0


def test_sigmoid_with_expert_bias_selects_by_biased_scores_but_weights_unbiased():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    bias = torch.tensor([1.0, 0.0, 0.0, 0.0])
    probs, ids, scores = topk_routing(logits, top_k=2, score_function="sigmoid", expert_bias=bias)
    assert sorted(ids[0].tolist()) == [0, 3]
    s = torch.sigmoid(logits[0])
    want = torch.stack((s[ids[0, 0]], s[ids[0, 1]]))
    torch.testing.assert_close(probs[0], want / want.sum())
    torch.testing.assert_close(scores.sum(-1), torch.ones(1))


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_expert_bias_moves_load_toward_balance(score_function):
    """DeepSeek-V3's setting (sigmoid scores) balances fully. With softmax scores the minor experts' scores are
    tiny and close, so fixed-size sign steps end in a limit cycle: there we require a 20% reduction."""
    rate, steps = (0.003, 100) if score_function == "sigmoid" else (0.005, 120)
    cfg = MoEConfig(
        hidden_size=16,
        ffn_hidden_size=8,
        num_experts=8,
        top_k=2,
        score_function=score_function,
        expert_bias_update_rate=rate,
    )
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[0] += 0.8  # skewed: with inputs of positive mean, expert 0 takes most tokens
    x = torch.randn(512, 16) + 0.5

    layer(x)  # a layer forward with autograd on counts its kept slots...
    assert layer.router.local_tokens_per_expert.sum() == 512 * 2
    layer.router.local_tokens_per_expert.zero_()
    history = []
    for _ in range(steps):
        layer.router(x)  # ...and so does the router alone, which is all the bias dynamics need
        load = layer.update_expert_bias()  # counts of this step's forward; resets them
        assert load.sum().item() == 512 * 2
        history.append(float(load.max() / load.mean()))
    before, after = history[0], sum(history[-20:]) / 20
    assert before > 3.0, f"the input is not skewed enough to test balancing (imbalance {before:.2f})"
    limit = 1.3 if score_function == "sigmoid" else 0.8 * before
    assert after < limit, f"imbalance {before:.2f} -> {after:.2f} (limit {limit:.2f})"
    assert layer.router.expert_bias[0] < 0, "the over-loaded expert's bias must go down"
    assert (
        "router.expert_bias" in layer.state_dict()
        and "router.local_tokens_per_expert" not in layer.state_dict()
    )
    layer.eval()
    with torch.no_grad():
        layer(x)  # forwards without autograd (evaluation, a teacher) do not count, as in Megatron-core
    assert layer.router.local_tokens_per_expert.sum() == 0


def test_expert_bias_counts_the_slots_kept_after_capacity():
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, capacity_factor=0.5,
                    expert_bias_update_rate=0.01)  # fmt: skip
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # most tokens want expert 0, which keeps only its capacity
    x = torch.randn(64, 16).abs()
    _, aux = layer(x)
    assert aux.dropped_tokens > 0
    counted = layer.router.local_tokens_per_expert
    torch.testing.assert_close(counted, aux.tokens_per_expert.float())  # kept, not routed
    assert counted.max() <= math.ceil(0.5 * 64 * 2 / 4)


def _fp32_gemm_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - a @ b| for an fp32 GEMM summed in any order with exact products:
    gamma_K * (|a| @ |b|), gamma_K = K u / (1 - K u), u = 2^-24."""
    k, u = a.shape[1], 2.0**-24
    return k * u / (1 - k * u) * (a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("router_dtype", ["float32", "input"])
def test_router_dtype(router_dtype):
    """``input``: logits in the activation dtype (Hugging Face's bf16 router); ``float32``: fp32 logits, equal
    to the fp32 GEMM of the same bf16 operands within fp32 summation error (on CPUs with bf16 micro-kernels
    they are summed there), with that GEMM's gradients: exactly where the backward runs torch's fp32 GEMM,
    within its summation bound plus the bf16 rounding where it runs oneDNN's (AMD CPUs, router._mm_f32)."""
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=8, num_experts=8, top_k=2, router_dtype=router_dtype)
    layer = MoELayer(cfg).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    out = layer.router(x)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    if router_dtype == "input":
        want = torch.nn.functional.linear(x, layer.router.weight)
        torch.testing.assert_close(out.logits, want.float(), rtol=0, atol=0)
        return
    w = layer.router.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    want = torch.nn.functional.linear(x2.float(), w.float())
    exact = x.detach().double() @ w.detach().double().t()
    assert ((out.logits.double() - exact).abs() <= _fp32_gemm_bound(x.detach(), w.detach().t())).all()
    g = torch.randn_like(want)
    out.logits.backward(g)
    want.backward(g)
    if not _onednn_f32_gemm():
        assert torch.equal(x.grad, x2.grad) and torch.equal(layer.router.weight.grad, w.grad)
        return
    wd = layer.router.weight.detach()
    for got, a, b in ((x.grad, g, wd.float()), (layer.router.weight.grad, g.t(), x.detach().float())):
        exact, bound = a.double() @ b.double(), _fp32_gemm_bound(a, b)
        assert ((got.double() - exact).abs() <= bound + 2.0**-8 * (exact.abs() + bound)).all()


@pytest.fixture(params=["default", "torch"])
def router_gemm_path(request, monkeypatch):
    """router._mm_f32's path: ``default`` (oneDNN's fp32 GEMM on AMD CPUs, torch's elsewhere) or ``torch``
    (LONGMOE_ROUTER_ONEDNN=0), with the cached choice cleared before and after."""
    if request.param == "torch":
        monkeypatch.setenv("LONGMOE_ROUTER_ONEDNN", "0")
    _onednn_f32_gemm.cache_clear()
    yield request.param
    _onednn_f32_gemm.cache_clear()


def test_router_fp32_logits_and_grads(router_gemm_path):
    """An fp32 layer's router (oneDNN's fp32 GEMM on AMD CPUs, torch's elsewhere; ``torch``:
    LONGMOE_ROUTER_ONEDNN=0): logits and both gradients within the fp32 GEMM's summation bound of fp64, at odd
    token and expert counts."""
    cfg = MoEConfig(hidden_size=96, ffn_hidden_size=8, num_experts=13, top_k=3)
    layer = MoELayer(cfg)
    x = torch.randn(37, 96, requires_grad=True)
    out = layer.router(x)
    w = layer.router.weight.detach()
    assert out.logits.dtype == torch.float32
    exact = x.detach().double() @ w.double().t()
    assert ((out.logits.double() - exact).abs() <= _fp32_gemm_bound(x.detach(), w.t())).all()
    g = torch.randn_like(out.logits)
    out.logits.backward(g)
    for got, a, b in ((x.grad, g, w), (layer.router.weight.grad, g.t(), x.detach())):
        assert ((got.double() - a.double() @ b.double()).abs() <= _fp32_gemm_bound(a, b)).all()


def test_router_mm_f32(router_gemm_path):
    """router._mm_f32 (oneDNN's fp32 GEMM on AMD CPUs, torch's elsewhere; ``torch``: LONGMOE_ROUTER_ONEDNN=0)
    vs the fp64 product within the fp32 GEMM's summation bound: strided and transposed operands, odd sizes,
    an empty K (zeros) and empty M / N."""
    if router_gemm_path == "torch":
        assert not _onednn_f32_gemm()
    gen = torch.Generator().manual_seed(3)
    for m, k, n in ((1, 1, 1), (37, 256, 1000), (2048, 64, 130), (5, 0, 7), (0, 9, 4), (6, 9, 0)):
        a = torch.randn(k, m, generator=gen).t()  # transposed, as the weight gradient's g^T
        b = torch.randn(k, 2 * n, generator=gen)[:, ::2]  # strided columns
        got = _mm_f32(a, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        exact = a.double() @ b.double()
        assert ((got.double() - exact).abs() <= _fp32_gemm_bound(a, b)).all()


@pytest.mark.parametrize("b_layout", ["rows", "transposed", "strided"])
def test_native_mm_bf16_f32(b_layout):
    """torch.ops.longmoe.mm_bf16_f32 (bf16 micro-kernels, fp32 output) vs the fp64 product of the same bf16
    operands, within the fp32 GEMM's own summation bound (which the fp32 mm meets too): odd M, N around the
    64-column blocks, K not a multiple of the 32-wide tile rows (and odd), a strided a, empty dimensions, and
    Inf / NaN propagated as the fp32 mm propagates them."""
    g = torch.Generator().manual_seed(5)
    op = torch.ops.longmoe.mm_bf16_f32
    for m, k, n in ((1, 32, 1), (37, 48, 3), (130, 1024, 256), (64, 100, 65), (5, 7, 300), (70, 64, 128)):
        a = torch.randn(m, k, generator=g).bfloat16()
        if b_layout == "rows":
            b = torch.randn(k, n, generator=g).bfloat16()
        elif b_layout == "transposed":  # a router weight (num_experts, hidden) seen as (hidden, num_experts)
            b = torch.randn(n, k, generator=g).bfloat16().t()
        else:  # every other row of a wider tensor, columns strided too
            b = torch.randn(2 * k, 2 * n, generator=g).bfloat16()[::2, ::2]
            a = torch.randn(m, 3 * k, generator=g).bfloat16()[:, 1::3]
        got = op(a, b)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        exact, bound = a.double() @ b.double(), _fp32_gemm_bound(a, b)
        assert ((a.float() @ b.float()).double() - exact).abs().le(bound).all()  # the bound holds for fp32 mm
        err = (got.double() - exact).abs()
        assert err.le(bound).all(), (m, k, n, float((err - bound).max()))
    a = torch.randn(6, 64, generator=g).bfloat16()
    b = torch.randn(64, 70, generator=g).bfloat16()
    a[1, 3], a[2, 5], a[3, 0] = float("inf"), float("nan"), float("-inf")
    got, want = op(a, b), a.float() @ b.float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    assert op(a[:0], b).shape == (0, 70) and op(a, b[:, :0]).shape == (6, 0)
    assert torch.equal(op(a[:, :0], b[:0]), torch.zeros(6, 70))
    checks = ("test_schema", "test_faketensor")  # schema and fake kernel (torch.compile)
    torch.library.opcheck(op.default, (a, b), test_utils=checks)


def test_native_mm_bf16_f32_checks():
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    with pytest.raises(RuntimeError, match="a and b must be bfloat16; got Float and BFloat16"):
        torch.ops.longmoe.mm_bf16_f32(a.float(), b)
    with pytest.raises(RuntimeError, match=r"a \(M, K\) and b \(K, N\) expected; got a \[4, 8\], b \[3, 8\]"):
        torch.ops.longmoe.mm_bf16_f32(a, b.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_native_topk_lowest_index_matches_the_stable_sort_rule(dtype):
    """The native top-k (torch.ops.longmoe.topk_lowest_index) against a stable descending sort: ties (few
    distinct values) go to the lower index, NaN ranks first, odd widths around the 16-lane chunks, k from 1
    to n, no rows, and a strided key."""
    from longmoe.moe.router import topk_lowest_index, topk_lowest_index_ref

    g = torch.Generator().manual_seed(3)
    for tokens, n in ((0, 8), (1, 1), (5, 7), (37, 16), (64, 17), (300, 64), (129, 256), (33, 257)):
        key = torch.randint(0, 4, (tokens, n), generator=g).to(dtype)  # many ties
        if tokens > 3:
            key[1, n // 2] = float("nan")
            key[2, :: max(n // 3, 1)] = float("nan")  # several NaNs in one row
            key[3] = torch.randn(n, generator=g).to(dtype)  # distinct values
        for k in sorted({1, min(2, n), min(8, n), max(n - 1, 1), n}):
            want = torch.sort(key.float(), dim=-1, descending=True, stable=True).indices[:, :k]
            got = topk_lowest_index(key, k, backend="native")
            assert got.dtype == torch.int64 and got.shape == (tokens, k)
            assert torch.equal(got, want), (tokens, n, k)
            assert torch.equal(topk_lowest_index_ref(key, k), want), (tokens, n, k)
    wide = torch.randn(40, 300, generator=g).to(dtype)
    strided = wide[:, 7:263]  # row stride 300, 256 columns
    assert torch.equal(topk_lowest_index(strided, 8, backend="native"), topk_lowest_index_ref(strided, 8))
    assert torch.equal(topk_lowest_index(wide.t(), 5, backend="native"), topk_lowest_index_ref(wide.t(), 5))


def test_native_topk_lowest_index_checks():
    key = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"k=7 must be in \[1, n=6\]"):
        torch.ops.longmoe.topk_lowest_index(key, 7)
    with pytest.raises(RuntimeError, match=r"key must be \(num_tokens, n\); got shape \[6\]"):
        torch.ops.longmoe.topk_lowest_index(key[0], 2)
