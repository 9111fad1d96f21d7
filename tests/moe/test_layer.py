"""MoELayer against a per-token loop reference in fp64: output and every gradient, dropless.

Tolerance (tests/oracle.py): ``err(layer, loop64) <= 2 * err(loop_same_dtype, loop64) + atol``. The loop in
the test dtype is what plain PyTorch gets for the same math, so the bound allows at most twice PyTorch's own
rounding error; atol is a few ulp of an O(1) value for tiny problems where that error is 0 by luck.
"""

from __future__ import annotations

import copy
import dataclasses
from itertools import pairwise

import pytest
import torch

from longmoe.moe import MoEConfig, MoELayer
from longmoe.runtime import native_available
from tests.moe.reference import clone_params, dense_mlp, moe_loop_reference
from tests.oracle import assert_within_oracle

BACKENDS = ["reference"] + (["native"] if native_available() else [])

BASE = dict(hidden_size=32, ffn_hidden_size=24, num_experts=6, top_k=2)
CONFIGS = {
    "softmax-swiglu": MoEConfig(**BASE),
    "softmax-unnormalized-gelu": MoEConfig(**BASE, normalize_topk=False, activation="gelu"),
    "sigmoid-top3": MoEConfig(**{**BASE, "top_k": 3}, score_function="sigmoid"),
    "shared-gated": MoEConfig(**BASE, shared_expert_ffn_hidden_size=40, shared_expert_gate=True),
    "slimmed-widths": MoEConfig(**BASE, expert_ffn_hidden_sizes=(24, 8, 16, 24, 5, 12)),
    "top1-many-experts": MoEConfig(**{**BASE, "num_experts": 16, "top_k": 1}),
}


def _layer(cfg: MoEConfig, dtype: torch.dtype, backend=None, router_scale=20.0) -> MoELayer:
    """A layer with a sharp router (std 0.4), so that fp32 and fp64 routing agree (no near-ties)."""
    layer = MoELayer(cfg, backend=backend)
    with torch.no_grad():
        layer.router.weight.mul_(router_scale)
        for p in layer.experts.parameters():
            p.mul_(10.0)  # O(1) activations, so errors are measured at a meaningful scale
    return layer.to(dtype)


def _run(layer: MoELayer, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, aux = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert aux.dropped_tokens.item() == 0
    (out * g).sum().backward()
    grads = {"out": out.detach(), "dx": x.grad}
    grads.update({f"d{k}": p.grad for k, p in layer.named_parameters()})
    return grads


def _run_loop(cfg, layer, x, g, dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = clone_params(layer, dtype)
    xs = x.detach().to(dtype).clone().requires_grad_(True)
    out, ids = moe_loop_reference(cfg, params, xs)
    (out * g.to(dtype)).sum().backward()
    res = {"out": out.detach(), "dx": xs.grad}
    res.update({f"d{k}": p.grad for k, p in params.items()})
    return res, ids


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless_matches_per_token_loop(name, dtype, backend):
    cfg = CONFIGS[name]
    layer = _layer(cfg, dtype, backend)
    tokens = 37  # odd; with 6-16 experts some get few or zero tokens
    x = torch.randn(tokens, cfg.hidden_size).to(dtype)
    g = torch.randn(tokens, cfg.hidden_size).to(dtype)
    ours = _run(layer, x.view(1, tokens, -1), g.view(1, tokens, -1))  # (batch, seq, hidden) input
    oracle, ids64 = _run_loop(cfg, layer, x, g, torch.float64)
    same, _ = _run_loop(cfg, layer, x, g, dtype)
    assert torch.equal(layer.router(x).expert_ids.sort(-1).values, ids64.sort(-1).values), "routing differs"
    for key, want in oracle.items():
        got = ours[key].reshape(want.shape)
        assert_within_oracle(f"{name} {key}", got.float(), same[key].float(), want, dtype)
    if cfg.expert_ffn_hidden_sizes is not None:  # padding of slimmed experts never gets gradient
        for e, w in enumerate(cfg.expert_widths):
            assert bool((ours["dexperts.linear_fc2"][e, :, w:] == 0).all())


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fine_grained_empty_experts_and_capacity(capacity_factor, dtype):
    """64 narrow experts, top-8 (OLMoE's regime), four experts that never win a slot, dropless and with
    capacity 1.25 (slots dropped by probability): output and every gradient against the per-token loop in
    fp64, which drops the same slots."""
    cfg = MoEConfig(
        hidden_size=32, ffn_hidden_size=8, num_experts=64, top_k=8, capacity_factor=capacity_factor
    )
    layer = _layer(cfg, dtype, router_scale=40.0)
    with torch.no_grad():  # experts 60..63: logit -5 * mean(x) * sqrt(H) with inputs of mean 2: never picked
        layer.router.weight[60:] = -5.0 / cfg.hidden_size**0.5
    tokens = 41
    x = (torch.randn(tokens, cfg.hidden_size) + 2.0).to(dtype)
    g = torch.randn(tokens, cfg.hidden_size).to(dtype)
    with torch.no_grad():
        route = layer.router(x)
    keep = route.expert_ids >= 0
    xs = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, aux = layer(xs)
    (out * g).sum().backward()
    ours = {"out": out.detach(), "dx": xs.grad, **{f"d{k}": p.grad for k, p in layer.named_parameters()}}
    assert bool((aux.tokens_per_expert[60:] == 0).all()) and bool((aux.tokens_per_expert[:60] > 0).any())
    dropped = int(aux.dropped_tokens)
    assert int(aux.tokens_per_expert.sum()) == tokens * 8 - dropped
    assert (dropped > 0) == (capacity_factor is not None), dropped
    assert int((~keep).sum()) == dropped

    def loop(dt):
        params = clone_params(layer, dt)
        xr = x.detach().to(dt).clone().requires_grad_(True)
        o, ids = moe_loop_reference(cfg, params, xr, keep=keep)
        (o * g.to(dt)).sum().backward()
        return {"out": o.detach(), "dx": xr.grad, **{f"d{k}": p.grad for k, p in params.items()}}, ids

    oracle, ids64 = loop(torch.float64)
    same, _ = loop(dtype)
    assert torch.equal(torch.where(keep, route.expert_ids, -1), torch.where(keep, ids64, -1)), (
        "routing differs"
    )
    for key, want in oracle.items():
        assert_within_oracle(
            f"E=64 top-8 cf={capacity_factor} {key}", ours[key].float(), same[key].float(), want, dtype
        )


def test_one_expert_top1_equals_dense_mlp():
    """Degeneracy (megablocks): one expert, top-1: the router weight is 1 and the layer is that expert's MLP."""
    cfg = MoEConfig(hidden_size=48, ffn_hidden_size=40, num_experts=1, top_k=1)
    for dtype in (torch.float32, torch.float64):
        layer = _layer(cfg, dtype)
        x = torch.randn(2, 19, 48, dtype=dtype)
        out, aux = layer(x)
        fc1, fc2 = layer.experts.linear_fc1[0], layer.experts.linear_fc2[0]
        dense = dense_mlp(x.reshape(-1, 48), fc1, fc2, "swiglu").view_as(x)
        oracle = dense_mlp(x.reshape(-1, 48).double(), fc1.double(), fc2.double(), "swiglu").view_as(x)
        assert_within_oracle(f"{dtype} out", out.detach(), dense.detach(), oracle.detach(), dtype)
        assert aux.tokens_per_expert.tolist() == [38]
        # The gradient reaches the expert, not the router: a single softmax weight is constant 1.
        out.sum().backward()
        assert torch.count_nonzero(layer.router.weight.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_bit_identical(dtype):
    """Permute/unpermute are bit-exact across backends, so the output and the expert gradients are too. The
    router and input gradients pass through the probs gradient, a dot product whose summation order is the
    backend's own: those agree to a few ulp of the largest entry (fp32: 1e-6; fp64: 1e-13). The native backend
    runs the experts on the tokens (GroupedExperts.forward_tokens), whose backward weights the (rows, ffn)
    activations instead of the output gradient: its expert gradients agree to that rounding too. The shared
    expert's are exact."""
    cfg = CONFIGS["shared-gated"]
    x = torch.randn(3, 11, cfg.hidden_size, dtype=dtype)
    g = torch.randn_like(x)
    results = {}
    for backend in BACKENDS + ["triton"]:
        torch.manual_seed(5)
        results[backend] = _run(_layer(cfg, dtype, backend), x, g)
    base = results["reference"]
    for backend, res in results.items():
        for key in base:
            if key in ("dx", "drouter.weight") or (backend == "native" and key.startswith("dexperts.")):
                tol = (1e-6 if dtype == torch.float32 else 1e-13) * float(base[key].abs().max())
                diff = float((res[key] - base[key]).abs().max())
                assert diff <= tol, f"{backend} {key}: max diff {diff:.3e} > {tol:.3e}"
            else:
                assert torch.equal(res[key], base[key]), f"{backend} {key} differs from the reference backend"


def test_empty_batch_and_aux_fields():
    cfg = dataclasses.replace(CONFIGS["softmax-swiglu"], aux_loss_coeff=0.1, z_loss_coeff=0.01)
    layer = _layer(cfg, torch.float32)
    x = torch.randn(0, 5, cfg.hidden_size, requires_grad=True)
    out, aux = layer(x)
    assert out.shape == x.shape
    (out.sum() + aux.loss).backward()
    assert aux.num_tokens == 0 and aux.tokens_per_expert.tolist() == [0] * 6 and aux.loss.item() == 0.0
    assert torch.count_nonzero(layer.experts.linear_fc1.grad) == 0

    x = torch.randn(4, 9, cfg.hidden_size)
    out, aux = layer(x)
    assert aux.num_tokens == 36 and int(aux.tokens_per_expert.sum()) == 72
    assert torch.equal(aux.tokens_per_expert, aux.routed_tokens_per_expert)
    assert 0 < aux.router_entropy.item() <= torch.log(torch.tensor(6.0)).item() + 1e-6
    torch.testing.assert_close(aux.loss, 0.1 * aux.load_balancing_loss + 0.01 * aux.z_loss)


def test_state_dict_round_trip_and_keys():
    cfg = CONFIGS["shared-gated"]
    a, b = MoELayer(cfg), MoELayer(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, cfg.hidden_size)
    assert torch.equal(a(x)[0], b(x)[0])
    assert sorted(a.state_dict()) == [
        "experts.linear_fc1",
        "experts.linear_fc2",
        "router.weight",
        "shared_expert.linear_fc1.weight",
        "shared_expert.linear_fc2.weight",
        "shared_expert_gate.weight",
    ]
    assert a.state_dict()["experts.linear_fc1"].shape == (6, 48, 32)
    assert a.full_state_dict().keys() == a.state_dict().keys()


@pytest.mark.parametrize("widths", [None, (8, 5, 8, 3, 8)], ids=["uniform", "slimmed"])
def test_split_passes_equal_the_full_pass(widths):
    """GroupedExperts.split (chunked dispatch): the passes over expert ranges equal the full pass, output and
    gradients, including a range whose experts get no row."""
    from longmoe.moe import GroupedExperts

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=5, top_k=2, expert_ffn_hidden_sizes=widths)
    torch.manual_seed(0)
    experts = GroupedExperts(cfg, dtype=torch.float64)
    counts = [2, 3, 0, 4, 0]
    x = torch.randn(sum(counts), 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(sum(counts), 16, dtype=torch.float64)
    bounds = [0, 1, 4, 5]  # ranges [0], [1, 2, 3], [4] (no rows)
    passes = experts.split(bounds)
    ys, start = [], 0
    for f, a, b in zip(passes, bounds[:-1], bounds[1:], strict=True):
        n = sum(counts[a:b])
        ys.append(f(x[start : start + n], torch.tensor(counts[a:b])))
        start += n
    (torch.cat(ys) * dy).sum().backward()
    ours = [x.grad.clone(), experts.linear_fc1.grad.clone(), experts.linear_fc2.grad.clone()]
    x.grad = None
    experts.zero_grad(set_to_none=True)
    (experts(x, torch.tensor(counts)) * dy).sum().backward()
    for a, b in zip(ours, [x.grad, experts.linear_fc1.grad, experts.linear_fc2.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"bounds=\[0, 3, 3, 5\]"):
        experts.split([0, 3, 3, 5])
    if widths is None:
        with pytest.raises(ValueError, match="must have 3 entries"):
            passes[1](x[:7], torch.tensor([7]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_native_grouped_mm_kinds(dtype):
    """torch.ops.longmoe.moe_grouped_mm, the CPU expert GEMMs: forward, dx and dw against fp64 per-expert
    products, with empty experts (first, middle, last) and an odd width; dw of an empty expert is 0."""
    counts = [0, 5, 0, 9, 1, 0]
    n, e, out_f, in_f = sum(counts), len(counts), 7, 12
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(n, in_f, generator=g), torch.randn(n, out_f, generator=g)
    w = torch.randn(e, out_f, in_f, generator=g)
    segs = torch.tensor([0, *counts]).cumsum(0).tolist()
    want_y = torch.cat([x.double()[a:b] @ w.double()[i].t() for i, (a, b) in enumerate(pairwise(segs))])
    want_dx = torch.cat([dy.double()[a:b] @ w.double()[i] for i, (a, b) in enumerate(pairwise(segs))])
    want_dw = torch.stack([dy.double()[a:b].t() @ x.double()[a:b] for a, b in pairwise(segs)])
    op = torch.ops.longmoe.moe_grouped_mm
    x, dy, w = x.to(dtype), dy.to(dtype), w.to(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-1}[dtype]
    for got, want in (
        (op(x, w, counts, 0), want_y),
        (op(dy, w, counts, 1), want_dx),
        (op(dy, x, counts, 2), want_dw),
    ):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert (op(dy, x, counts, 2)[[0, 2, 5]] == 0).all()
    with pytest.raises(RuntimeError, match="counts sum to 14; expected a's rows 15"):
        op(x, w, [0, 5, 0, 9, 0, 0], 0)
    with pytest.raises(RuntimeError, match="kind must be 0"):
        op(x, w, counts, 3)


@pytest.mark.parametrize(
    "counts,out_f,in_f",
    [
        ([0, 33, 1, 600, 17, 2], 96, 70),  # K = 70: A copied with zero columns; 600 rows: mm_out for fwd/dx
        ([64, 0, 1025, 7], 130, 1024),  # 1025 rows: mm_out for all kinds; 130 outputs: column tail 2
        ([0, 0, 300, 0], 64, 128),  # every row to one expert
        ([3, 5, 0, 2], 48, 33),  # odd input width: forward on mm_out (no 32-bit row pairs)
        ([64, 65, 0, 130], 1040, 1026),  # 2.1 MB bf16 weights (over the L2): fwd/dx on brgemm to 64 rows only
        # bf16 outputs over 2 MB (y 2.6, dx 3.7, dw 11.6 MB): non-temporal stores, column tail 2 stored plainly
        ([0, 500, 64, 511, 437, 1, 0, 300], 706, 1024),
    ],
    ids=["k-tail", "big-expert", "one-expert", "odd-width", "weights-over-l2", "outputs-streamed"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_grouped_mm_shapes(counts, out_f, in_f, dtype):
    """moe_grouped_mm at the shapes that split its CPU paths (on AMX CPUs, bf16 experts with few rows run on
    brgemm tiles and the rest on mm_out): K and column tails, odd rows per expert, empty experts, experts over
    the row limit, all rows to one expert. Within twice a same-dtype per-expert torch.mm's error of fp64."""
    n, e = sum(counts), len(counts)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(n, in_f, generator=g), torch.randn(n, out_f, generator=g)
    w = torch.randn(e, out_f, in_f, generator=g) / in_f**0.5
    segs = list(pairwise(torch.tensor([0, *counts]).cumsum(0).tolist()))

    def per_expert(x, dy, w):
        return (
            torch.cat([x[a:b] @ w[i].t() for i, (a, b) in enumerate(segs)]),
            torch.cat([dy[a:b] @ w[i] for i, (a, b) in enumerate(segs)]),
            torch.stack([dy[a:b].t() @ x[a:b] for a, b in segs]),
        )

    oracle = per_expert(x.double(), dy.double(), w.double())
    x, dy, w = x.to(dtype), dy.to(dtype), w.to(dtype)
    same = per_expert(x, dy, w)
    op = torch.ops.longmoe.moe_grouped_mm
    ours = (op(x, w, counts, 0), op(dy, w, counts, 1), op(dy, x, counts, 2))
    for name, o, s_, want in zip(("y", "dx", "dw"), ours, same, oracle, strict=True):
        assert o.dtype == dtype
        assert_within_oracle(name, o, s_, want, dtype)
    for i, c in enumerate(counts):
        if c == 0:
            assert (ours[2][i] == 0).all(), f"dw of empty expert {i} is not zero"


def _routing(tokens: int, top_k: int, kind: str, num_experts: int, g: torch.Generator):
    """expert_ids (tokens, top_k) for a named routing: 'random' (with empty experts and dropped slots) or
    'one-expert' (every kept slot to expert 1, so one expert holds more rows than a gather pass)."""
    if kind == "one-expert":
        ids = torch.full((tokens, top_k), 1, dtype=torch.int64)
        ids[:, 1:] = -1  # one slot per token kept
        return ids
    ids = torch.stack([torch.randperm(num_experts - 3, generator=g)[:top_k] + 1 for _ in range(tokens)])
    ids[torch.rand(tokens, top_k, generator=g) < 0.1] = -1  # capacity drops; experts 0, E-2, E-1 stay empty
    return ids


# Routings of the gathered and unpermuted grouped ops: one gather pass; several (and outputs over 2 MB, stored
# non-temporally); one expert with more rows than a pass and than the brgemm row limit.
_ROUTED = pytest.mark.parametrize(
    "tokens,top_k,hidden,routing",
    [(37, 4, 48, "random"), (700, 6, 1024, "random"), (1500, 2, 1024, "one-expert")],
    ids=["small", "several-passes", "expert-over-a-pass"],
)


@_ROUTED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_grouped_mm_gathered_equals_permuted(tokens, top_k, hidden, routing, dtype):
    """moe_grouped_mm with a gathered operand (src_slot: rows gathered from the tokens per pass of experts;
    gather_b for kind 2's x) is bit-identical to moe_permute followed by the plain op: every kind, one pass and
    several (1 MB of gathered rows per pass), an expert with more rows than a pass (and than the brgemm row
    limit), empty experts and dropped slots."""
    from longmoe.moe.permute import moe_dispatch_map, moe_permute_forward

    g = torch.Generator().manual_seed(11)
    num_experts, ffn = 12, 40
    dmap = moe_dispatch_map(_routing(tokens, top_k, routing, num_experts, g), num_experts)
    counts, src = dmap.tokens_per_expert.tolist(), dmap.src_slot
    assert counts[0] == 0 and counts[-1] == 0 and sum(counts) == src.numel()
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    dout = torch.randn(tokens, hidden, generator=g).to(dtype)
    w1 = (torch.randn(num_experts, ffn, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, ffn, generator=g) / ffn**0.5).to(dtype)
    dh = torch.randn(src.numel(), ffn, generator=g).to(dtype)
    op = torch.ops.longmoe.moe_grouped_mm
    px = moe_permute_forward(x, src, top_k, backend="native")
    pd = moe_permute_forward(dout, src, top_k, backend="native")
    cases = {
        "fwd, x gathered": (op(x, w1, counts, 0, src, top_k), op(px, w1, counts, 0)),
        "dx, dout gathered": (op(dout, w2, counts, 1, src, top_k), op(pd, w2, counts, 1)),
        "dw, dout gathered": (op(dout, dh, counts, 2, src, top_k), op(pd, dh, counts, 2)),
        "dw, x gathered (gather_b)": (op(dh, x, counts, 2, src, top_k, True), op(dh, px, counts, 2)),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max diff {(got.float() - want.float()).abs().max()}"
    with pytest.raises(RuntimeError, match="gather_b applies to kind 2"):
        op(x, w1, counts, 0, src, top_k, True)
    with pytest.raises(RuntimeError, match="gather_b needs src_slot"):
        op(dh, px, counts, 2, None, top_k, True)
    with pytest.raises(RuntimeError, match="expected src_slot's rows"):
        op(x, w1, [c + 1 for c in counts], 0, src, top_k)
    # the message names the first bad row some thread checked
    with pytest.raises(RuntimeError, match=r"src_slot\[\d+\]=\d+ is outside"):
        op(x, w1, counts, 0, src + tokens * top_k, top_k)
    if tokens < 100:  # schema and fake kernel (torch.compile) of the gathered forms
        checks = ("test_schema", "test_faketensor")
        torch.library.opcheck(op.default, (x, w1, counts, 0, src, top_k), test_utils=checks)
        torch.library.opcheck(op.default, (dh, x, counts, 2, src, top_k, True), test_utils=checks)


@_ROUTED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_grouped_mm_unpermute_equals_two_step(tokens, top_k, hidden, routing, dtype):
    """moe_grouped_mm_unpermute (kinds 0 and 1: each expert row written to the slot it came from, then the
    combine in slot order) is bit-identical to moe_grouped_mm followed by moe_unpermute: with and without
    probs, empty experts, dropped slots, outputs over 2 MB (non-temporal stores), and an expert with more rows
    than the brgemm path takes (mm_out, then scattered)."""
    g = torch.Generator().manual_seed(12)
    num_experts, ffn = 12, 40
    ids = _routing(tokens, top_k, routing, num_experts, g)
    row_map, src, tpe = torch.ops.longmoe.moe_dispatch_map(ids, num_experts)
    counts = tpe.tolist()
    assert counts[0] == 0 and counts[-1] == 0 and (row_map < 0).any()
    w1 = (torch.randn(num_experts, ffn, hidden, generator=g) / hidden**0.5).to(dtype)
    a0 = torch.randn(src.numel(), hidden, generator=g).to(dtype)  # kind 0: (rows, hidden) @ w1[e]^T
    a1 = torch.randn(src.numel(), ffn, generator=g).to(dtype)  # kind 1: (rows, ffn) @ w1[e]
    probs = torch.rand(tokens, top_k, generator=g)
    op, grouped, unpermute = (
        torch.ops.longmoe.moe_grouped_mm_unpermute,
        torch.ops.longmoe.moe_grouped_mm,
        torch.ops.longmoe.moe_unpermute,
    )
    for kind, a in ((0, a0), (1, a1)):
        for p in (probs, None):
            got = op(a, w1, counts, kind, row_map, src, p)
            want = unpermute(grouped(a, w1, counts, kind), row_map, p)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want), (
                f"kind {kind}, probs {p is not None}: max diff {(got - want).abs().max()}"
            )
    with pytest.raises(RuntimeError, match=r"kind must be 0 \(x @ w\^T\) or 1"):
        op(a1, a0, counts, 2, row_map, src, None)
    with pytest.raises(RuntimeError, match=r"src_slot\[0\]=\d+ is not the slot of row 0 in row_map"):
        op(a0, w1, counts, 0, row_map, src.roll(1), None)
    with pytest.raises(RuntimeError, match="expected a's rows"):
        op(a0, w1, [c + 1 for c in counts], 0, row_map, src, None)
    if tokens < 100:  # schema and fake kernel (torch.compile)
        checks = ("test_schema", "test_faketensor")
        torch.library.opcheck(op.default, (a0, w1, counts, 0, row_map, src, probs), test_utils=checks)


@pytest.mark.parametrize("capacity_factor", [None, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gathered_layer_matches_permuted(capacity_factor, dtype, monkeypatch):
    """MoELayer on the native CPU backend runs the experts on the tokens (GroupedExperts.forward_tokens: no
    permuted copy of x, no kept second-GEMM output); with a forward hook on its experts it permutes, runs the
    experts (the hook sees the rows) and unpermutes. The outputs are bit-identical, dropless and with slots
    dropped; the gradients (whose backward formulas differ) are each within twice the permuted path's error of
    the same layer in fp64, routed the same way."""
    from longmoe.moe.experts import GroupedExperts

    cfg = MoEConfig(
        hidden_size=64, ffn_hidden_size=16, num_experts=32, top_k=6, capacity_factor=capacity_factor
    )
    torch.manual_seed(3)
    layer = _layer(cfg, dtype, router_scale=10.0)
    x = torch.randn(300, cfg.hidden_size).to(dtype)
    g = torch.randn_like(x)
    calls = []
    real = GroupedExperts.forward_tokens

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(GroupedExperts, "forward_tokens", counted)
    layer.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    out, aux = layer(xs)
    (out * g).sum().backward()
    fused = {"out": out.detach(), "dx": xs.grad, **{k: p.grad.clone() for k, p in layer.named_parameters()}}
    assert calls == [1] and (int(aux.dropped_tokens) > 0) == (capacity_factor is not None)
    # A forward hook on the experts keeps the permuted path (the hook sees the permuted rows).
    seen = []
    layer.experts.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    layer.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    out, _ = layer(xs)
    (out * g).sum().backward()
    plain = {"out": out.detach(), "dx": xs.grad, **{k: p.grad for k, p in layer.named_parameters()}}
    assert calls == [1] and seen == [(300 * 6 - int(aux.dropped_tokens), cfg.hidden_size)]
    assert torch.equal(fused["out"], plain["out"])
    layer64 = copy.deepcopy(layer).double()  # the hook comes along: the permuted path, in fp64
    assert torch.equal(layer64.router(x.double()).expert_ids, layer.router(x).expert_ids), "routing differs"
    xs = x.double().requires_grad_(True)
    out, aux64 = layer64(xs)
    (out * g.double()).sum().backward()
    assert int(aux64.dropped_tokens) == int(aux.dropped_tokens)
    oracle = {"out": out.detach(), "dx": xs.grad, **{k: p.grad for k, p in layer64.named_parameters()}}
    for key, want in oracle.items():
        assert_within_oracle(key, fused[key], plain[key], want, dtype)


def test_forward_tokens_rejects_what_it_cannot_run():
    from longmoe.moe.permute import moe_dispatch_map

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg)
    x = torch.randn(5, 16)
    dmap = moe_dispatch_map(layer.router(x).expert_ids, 4)
    with pytest.raises(
        ValueError, match=r"x in the weights' dtype torch.float32.*got uniform=True, x torch.float64"
    ):
        layer.experts.forward_tokens(x.double(), dmap, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_tokens_unit_weights_and_frozen_router(dtype):
    """forward_tokens without probs (unit weights), with probs that need no gradient, and with only the second
    GEMM's weight trained (x constant): the output equals permute -> experts -> unpermute bit for bit, and every
    gradient it returns matches that path's (fp64: to 1e-12 relative; fp32: within twice its error of fp64)."""
    from longmoe.moe.permute import moe_dispatch_map, moe_permute, moe_unpermute

    cfg = MoEConfig(hidden_size=24, ffn_hidden_size=10, num_experts=7, top_k=3)
    torch.manual_seed(4)
    layer = _layer(cfg, dtype)
    x = torch.randn(29, cfg.hidden_size, dtype=dtype)
    route = layer.router(x)
    dmap = moe_dispatch_map(route.expert_ids, cfg.num_experts)
    g = torch.randn_like(x)
    # unit weights; probs without gradient; and with only linear_fc2 trainable and x constant (the backward
    # then needs neither da nor the probs gradient, only p * a for dw)
    for probs, only_fc2 in ((None, False), (route.probs.detach(), False), (route.probs.detach(), True)):
        res = {}
        for name, d in (("fused", dtype), ("plain", dtype), ("fp64", torch.float64)):
            experts = copy.deepcopy(layer.experts).to(d)
            experts.linear_fc1.requires_grad_(not only_fc2)
            xs = x.to(d).clone().requires_grad_(not only_fc2)
            p = None if probs is None else probs.to(d)
            if name == "fused":
                out = experts.forward_tokens(xs, dmap, p)
            else:
                out = moe_unpermute(experts(moe_permute(xs, dmap), dmap.tokens_per_expert), dmap, p)
            (out * g.to(d)).sum().backward()
            res[name] = {
                "out": out.detach(),
                "dx": xs.grad,
                **{k: q.grad for k, q in experts.named_parameters()},
            }
        assert torch.equal(res["fused"]["out"], res["plain"]["out"])
        for key, want in res["fp64"].items():
            if want is None:  # not trained in this case
                assert res["fused"][key] is None and only_fc2 and key in ("dx", "linear_fc1")
                continue
            if dtype == torch.float64:
                torch.testing.assert_close(res["fused"][key], res["plain"][key], rtol=1e-12, atol=1e-12)
            else:
                assert_within_oracle(key, res["fused"][key], res["plain"][key], want, dtype)
