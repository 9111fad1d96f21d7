"""Token dispatch kernels (longmoe.moe.permute): native C++, Triton (interpreter on CPU) and reference.

Permute and unpermute move and sum rows; every backend follows one contract (stable sort by expert, fp32
accumulation from -0.0 in slot order, one rounding), so their results are compared bit for bit. Only the
probs gradient, a dot product whose summation order differs, is compared with the tolerance rule.
"""

from __future__ import annotations

import pytest
import torch

from longmoe.moe.permute import (
    moe_dispatch_map,
    moe_dispatch_map_ref,
    moe_permute,
    moe_permute_forward,
    moe_permute_ref,
    moe_unpermute,
    moe_unpermute_forward,
    moe_unpermute_probs_grad,
    moe_unpermute_probs_grad_ref,
    moe_unpermute_ref,
)
from longmoe.runtime import native_available
from tests.oracle import assert_within_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"] + (["native"] if native_available() and DEVICE == "cpu" else [])
# The Triton interpreter stores bf16 as raw uint16: bf16 runs on GPUs only.
DTYPES = {
    "reference": (torch.float32, torch.bfloat16, torch.float64),
    "native": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}
DTYPES["triton"] = (torch.float32, torch.float16, torch.float64) + (
    (torch.bfloat16,) if DEVICE == "cuda" else ()
)

# (num_tokens, top_k, num_experts, hidden): odd sizes, top_k 1..3, a token count of 0, a hidden size that is
# not a multiple of any vector width, more experts than slots (some experts get zero tokens), and the
# fine-grained regime (256 experts, top-8: most experts empty, eight rows per token in the Triton kernels).
SHAPES = [(97, 2, 8, 33), (0, 2, 4, 8), (13, 1, 3, 16), (5, 3, 16, 24), (23, 8, 256, 40)]


def _expert_ids(tokens, top_k, experts, drop_frac=0.2, seed=0):
    """Distinct experts per token (as top-k gives), a fraction of slots dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids = (
        torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        if tokens
        else torch.empty(0, top_k, dtype=torch.long)
    )
    drop = torch.rand(ids.shape, generator=g) < drop_frac
    return torch.where(drop, -1, ids).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_map_is_stable_sort(shape, backend):
    tokens, top_k, experts, _ = shape
    ids = _expert_ids(tokens, top_k, experts)
    m = moe_dispatch_map(ids, experts, backend=backend)
    r = moe_dispatch_map_ref(ids, experts)
    for a, b, name in zip(m, r, ("row_map", "src_slot", "tokens_per_expert"), strict=True):
        assert torch.equal(a, b), f"{name} differs from the reference"
    # The contract itself, independent of the reference: rows grouped by expert, slot order within an expert.
    flat = ids.reshape(-1).cpu()
    src = m.src_slot.cpu()
    assert torch.equal(flat[src], torch.sort(flat[flat >= 0], stable=True).values)
    for e in range(experts):
        slots = src[flat[src] == e]
        assert torch.equal(slots, torch.sort(slots).values)
        assert int(m.tokens_per_expert[e]) == int((flat == e).sum())
    kept = (flat >= 0).nonzero().squeeze(1)
    assert torch.equal(m.row_map.reshape(-1).cpu()[kept].sort().values, torch.arange(len(kept)))
    assert bool((m.row_map.reshape(-1).cpu()[flat < 0] == -1).all())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and dtypes, NaN where the other is NaN, and equal bit patterns everywhere else (signed zeros
    and subnormals included). NaN payloads may differ: torch's vectorised bf16 conversion writes 0xFFFF, c10's
    scalar one 0x7FC0."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    keep = ~a.isnan()
    return torch.equal(a.view(ints)[keep], b.view(ints)[keep])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_bit_exact(shape, backend):
    tokens, top_k, experts, hidden = shape
    for dtype in DTYPES[backend]:
        # top_k = 1, nothing dropped, unit weights: permute then unpermute is the identity, signed zeros too.
        ids1 = _expert_ids(tokens, 1, experts, drop_frac=0.0)
        m1 = moe_dispatch_map(ids1, experts, backend=backend)
        x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
        if tokens:
            x[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), -1e-30], dtype=dtype)
        back = moe_unpermute_forward(
            moe_permute_forward(x, m1.src_slot, 1, backend=backend), m1.row_map, backend=backend
        )
        assert torch.equal(back, x) and torch.equal(torch.signbit(back), torch.signbit(x)), (
            f"{dtype}: round trip"
        )

        # General case: every backend equals the reference bit for bit, with and without weights.
        ids = _expert_ids(tokens, top_k, experts)
        m = moe_dispatch_map(ids, experts, backend=backend)
        x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
        # weighted rows that round at the edges: NaN, Inf, subnormal products
        if tokens and dtype != torch.float16:
            special = [float("nan"), float("inf"), -float("inf"), 1e-38, -2e-39, 3.3e38, 1.00390625]
            x[0, : min(hidden, 7)] = torch.tensor(special[: min(hidden, 7)], dtype=dtype)
        probs = torch.rand(tokens, top_k, device=DEVICE)
        y = torch.randn(m.num_rows, hidden, dtype=dtype, device=DEVICE)
        for p in (None, probs):
            got = moe_permute_forward(x, m.src_slot, top_k, p, backend=backend)
            assert _same_bits(got, moe_permute_ref(x, m.src_slot, top_k, p)), (
                f"{dtype} permute probs={p is not None}"
            )
            got = moe_unpermute_forward(y, m.row_map, p, backend=backend)
            assert got.dtype == dtype and got.shape == (tokens, hidden)
            want = moe_unpermute_ref(y, m.row_map, p)
            assert torch.equal(got, want), f"{dtype} unpermute probs={p is not None}"
        # Tokens whose every slot was dropped come back as +0.
        dead = (m.row_map < 0).all(1)
        assert bool((got[dead] == 0).all()) and not bool(torch.signbit(got[dead]).any())


@pytest.mark.skipif("native" not in BACKENDS, reason="the native ops are CPU-only and built here")
@pytest.mark.parametrize("hidden", [1024, 1000], ids=["whole-lines", "row-not-lines"])
def test_native_large_permute_bit_exact(hidden):
    """A permute whose output exceeds 2 MB writes unweighted rows with non-temporal stores where rows are whole
    64-byte lines (hidden 1024; hidden 1000 keeps ordinary stores for bf16): bit for bit the reference, with
    dropped slots, and the unpermute (next token's rows prefetched) inverts it at top_k 1."""
    tokens, top_k, experts = 700, 3, 16
    ids = _expert_ids(tokens, top_k, experts)
    m = moe_dispatch_map(ids, experts, backend="native")
    for dtype in DTYPES["native"]:
        x = torch.randn(tokens, hidden, dtype=dtype)
        got = moe_permute_forward(x, m.src_slot, top_k, backend="native")
        assert got.numel() * got.element_size() > 2 << 20
        assert _same_bits(got, moe_permute_ref(x, m.src_slot, top_k)), f"{dtype} hidden {hidden}"
        m1 = moe_dispatch_map(_expert_ids(tokens, 1, experts, drop_frac=0.0), experts, backend="native")
        rows = moe_permute_forward(x, m1.src_slot, 1, backend="native")
        assert torch.equal(moe_unpermute_forward(rows, m1.row_map, backend="native"), x), (
            f"{dtype} round trip"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probs_grad_within_oracle(backend, dtype):
    tokens, top_k, experts, hidden = 61, 2, 5, 72
    m = moe_dispatch_map(_expert_ids(tokens, top_k, experts), experts)
    dout = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    y = torch.randn(m.num_rows, hidden, dtype=dtype, device=DEVICE)
    got = moe_unpermute_probs_grad(dout, y, m.row_map, backend=backend)
    oracle = moe_unpermute_probs_grad_ref(dout.double(), y.double(), m.row_map)
    same = moe_unpermute_probs_grad_ref(dout, y, m.row_map, upcast=False).float()
    assert got.dtype == torch.float32
    assert_within_oracle("dprobs", got, same, oracle, dtype)
    assert bool((got[m.row_map < 0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_matches_dense_formulation(backend):
    """Gradients of permute/unpermute in fp64 equal those of the same map written with index ops."""
    tokens, top_k, experts, hidden = 23, 2, 4, 8
    ids = _expert_ids(tokens, top_k, experts)
    m = moe_dispatch_map(ids, experts)
    x = torch.randn(tokens, hidden, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(m.num_rows, hidden, dtype=torch.float64, device=DEVICE)
    probs = torch.rand(tokens, top_k, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(tokens, hidden, dtype=torch.float64, device=DEVICE)
    out = moe_unpermute(moe_permute(x, m, backend=backend) * w, m, probs, backend=backend)
    (out * g).sum().backward()

    x2, p2 = x.detach().clone().requires_grad_(True), probs.detach().clone().requires_grad_(True)
    rows = x2[m.src_slot // top_k] * w
    keep = m.row_map >= 0
    gathered = torch.where(keep[..., None], rows[m.row_map.clamp(min=0)], 0.0)  # (tokens, top_k, hidden)
    out2 = (p2[..., None] * gathered).sum(1)
    (out2 * g).sum().backward()
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-12)  # fp64: only summation order differs
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(probs.grad, p2.grad, rtol=0, atol=1e-12)


def test_bad_indices_name_argument_and_value():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"expert_ids holds 7, outside \[-1, num_experts=4\)"):
        moe_dispatch_map(torch.tensor([[7], [0], [1], [2]]), 4, backend="reference")
    with pytest.raises(TypeError, match=r"expert_ids must be an int64 or int32 tensor; got torch.float32"):
        moe_dispatch_map(torch.zeros(4, 1), 4)
    with pytest.raises(ValueError, match=r"probs must be \(num_tokens, top_k\) = \(4, 1\); got \(4, 2\)"):
        moe_permute_forward(x, torch.arange(4), 1, torch.ones(4, 2))
    if native_available():
        with pytest.raises(RuntimeError, match=r"expert_ids\[0, 0\]=7 is outside \[-1, num_experts=4\)"):
            moe_dispatch_map(torch.tensor([[7], [0], [1], [2]]), 4, backend="native")
        with pytest.raises(RuntimeError, match=r"src_slot\[1\]=9 is outside \[0, num_tokens \* top_k = 4\)"):
            moe_permute_forward(x, torch.tensor([0, 9]), 1, backend="native")
        with pytest.raises(RuntimeError, match=r"row_map\[0, 0\]=5 is outside \[-1, num_rows=2\)"):
            moe_unpermute_forward(torch.randn(2, 8), torch.tensor([[5], [0]]), backend="native")


@pytest.mark.skipif(
    not native_available(), reason="longmoe._C not built (LONGMOE_SKIP_NATIVE=1): no C++ ops to check"
)
def test_native_ops_schema_and_fake_kernels():
    """torch.library.opcheck: schemas, fake (meta) kernels for torch.compile, no aliasing surprises."""
    ids = _expert_ids(40, 2, 5).cpu()
    m = moe_dispatch_map(ids, 5, backend="native")
    x, y = torch.randn(40, 16), torch.randn(m.num_rows, 16)
    probs = torch.rand(40, 2)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.longmoe.moe_permute.default, (x, m.src_slot, 2, probs), test_utils=checks)
    torch.library.opcheck(torch.ops.longmoe.moe_unpermute.default, (y, m.row_map, probs), test_utils=checks)
    torch.library.opcheck(
        torch.ops.longmoe.moe_unpermute_probs_grad.default, (x, y, m.row_map), test_utils=checks
    )
    torch.library.opcheck(torch.ops.longmoe.moe_dispatch_map.default, (ids, 5), test_utils=("test_schema",))
    with torch._subclasses.fake_tensor.FakeTensorMode(
        shape_env=torch.fx.experimental.symbolic_shapes.ShapeEnv()
    ):
        row_map, src_slot, tpe = torch.ops.longmoe.moe_dispatch_map(torch.empty(40, 2, dtype=torch.long), 5)
        assert row_map.shape == (40, 2) and tpe.shape == (5,) and src_slot.dim() == 1


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
def test_native_weighted_bf16_rows_round_ties_to_even():
    """bf16 rows times a weight whose fp32 product lies exactly halfway between two bf16 values:
    1.9921875 * 1.0019607543945312 = 1.99609375 (fp32 0x3FFF8000) goes up to the even 2.0, -1.9921875 likewise
    down to -2.0; the 16-lane path (32 columns) and the scalar tail (3) both, against torch's own conversion."""
    w = torch.tensor([0x3F804040], dtype=torch.int32).view(torch.float32).item()
    x = torch.tensor([[1.9921875, -1.9921875, 1.0] * 11 + [1.9921875, 1.0]]).to(torch.bfloat16)  # 35 columns
    src = torch.zeros(1, dtype=torch.int64)
    got = moe_permute_forward(x, src, 1, torch.full((1, 1), w), backend="native")
    assert _same_bits(got, moe_permute_ref(x, src, 1, torch.full((1, 1), w)))
    assert got[0, :3].tolist() == [2.0, -2.0, 1.0] and got[0, 33:].tolist() == [2.0, 1.0]
