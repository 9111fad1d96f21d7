"""Per-head XAttention threshold calibration and its JSON file.

Inputs come from :func:`structured_qk`, a synthetic generator with real attention structure, one pattern
per KV head (each shared by ``group`` query heads):

* head 0, local window: q_i and k_j are the same bank of sinusoids of the position (periods 6 to ~400
  tokens), so ``q_i . k_j = A * sum_f cos(w_f (i - j))`` peaks at ``j = i`` and decays with distance;
* head 1, attention sinks: keys 0..3 carry a large component along a direction every query shares, so
  most of each row's mass sits on the first tokens;
* head 2, diffuse: small random q and k, near-uniform attention.

Every sample adds fresh noise (seeded), so calibration and held-out samples differ.
"""

import json

import pytest
import torch

from longmoe.attention.xattention import xattention_estimate
from longmoe.attention.xattention_calibrate import (
    calibrate_thresholds,
    load_thresholds,
    save_thresholds,
    true_block_mass,
)

L, D, BS, S = 512, 32, 32, 8  # 16 x 16 tiles; small enough that a calibration takes < 1 s
LOCAL, SINK, DIFFUSE = 0, 1, 2


def structured_qk(seed: int, batch: int = 2, group: int = 1):
    """q (batch, L, 3 * group, D), k (batch, L, 3, D) fp32: local-window, sink and diffuse KV heads."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    pos = torch.arange(L, dtype=torch.float64)
    freqs = 1.0 / (64.0 ** (torch.arange(D // 2, dtype=torch.float64) / (D // 2)))
    ang = pos[:, None] * freqs
    rot = torch.cat([ang.cos(), ang.sin()], -1)
    u = rnd(D)
    u /= u.norm()
    k_sink = 0.3 * rnd(L, D)
    k_sink[:4] += 10.0 * u
    q_sink = 0.3 * rnd(L, D) + 4.0 * u
    k = torch.stack([2.0 * rot, k_sink, 0.3 * rnd(L, D)], 1)
    q = torch.stack([2.0 * rot, q_sink, 0.3 * rnd(L, D)], 1).repeat_interleave(group, 1)
    k = k.expand(batch, -1, -1, -1) + 0.2 * rnd(batch, L, 3, D)
    q = q.expand(batch, -1, -1, -1) + 0.2 * rnd(batch, L, 3 * group, D)
    return q.float(), k.float()


def kept_mass_and_density(q, k, tau):
    """(batch, heads) fraction of true attention mass in the estimator's kept tiles, and the density."""
    _, mask = xattention_estimate(q, k, stride=S, block_size=BS, threshold=tau, causal=True)
    mass = true_block_mass(q, k, causal=True, block_size=BS)
    vis = torch.ones(L // BS, L // BS, dtype=torch.bool).tril()
    kept = (mass * mask).sum(-1).mean(-1)  # every block holds BS real queries: rows weigh the same
    density = (mask & vis).sum((-1, -2)).double() / vis.sum()
    return kept.double(), density.double()


@pytest.mark.parametrize(
    "lq,lk,hq,hkv,causal", [(97, 97, 4, 2, True), (40, 97, 2, 2, True), (97, 40, 3, 1, False)]
)
def test_true_block_mass_matches_dense(lq, lk, hq, hkv, causal):
    q, k = torch.randn(2, lq, hq, 16, dtype=torch.float64), torch.randn(2, lk, hkv, 16, dtype=torch.float64)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(hq // hkv, 2)) / 4.0
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).logical_not(), float("-inf"))
    p = torch.softmax(s, -1)
    bs = 16
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    p = torch.nn.functional.pad(p, (0, nkb * bs - lk, 0, nqb * bs - lq))
    rows = (
        torch.nn.functional.pad(torch.ones(lq, dtype=torch.float64), (0, nqb * bs - lq)).view(nqb, bs).sum(-1)
    )
    want = p.view(2, hq, nqb, bs, nkb, bs).sum((3, 5)) / rows[:, None]
    got = true_block_mass(q, k, causal=causal, block_size=bs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-12, rtol=0)


def test_target_mass_held_out_and_ordering():
    calib = [structured_qk(seed) for seed in range(3)]
    tau = calibrate_thresholds(calib, target_mass=0.9, stride=S, block_size=BS, causal=True)
    assert tau.shape == (3,) and bool(((tau > 0) & (tau <= 1)).all())
    # Worst calibration sequence meets the target; one bisection step lower does not (minimality).
    for q, k in calib:
        assert bool((kept_mass_and_density(q, k, tau)[0] >= 0.9 - 1e-6).all())
    step = 2.0**-20
    lower = (tau - 2 * step).clamp(min=step)
    worst = torch.stack([kept_mass_and_density(q, k, lower)[0].min(0).values for q, k in calib]).min(0).values
    assert bool((worst[tau > 4 * step] < 0.9).all())
    # Held-out samples from the same generator meet the target within a small slack (measured >= 0.895).
    dens = []
    for seed in (100, 101, 102):
        kept, density = kept_mass_and_density(*structured_qk(seed), tau)
        assert bool((kept >= 0.88).all()), kept
        dens.append(density.mean(0))
    dens = torch.stack(dens).mean(0)
    # Sharper heads need a lower threshold and fewer tiles than the diffuse one.
    assert tau[LOCAL] < tau[DIFFUSE] and tau[SINK] < tau[DIFFUSE]
    assert dens[LOCAL] < dens[DIFFUSE] and dens[SINK] < dens[DIFFUSE]


def test_target_mass_gqa_and_grid():
    calib = [structured_qk(seed, group=2) for seed in range(2)]
    tau = calibrate_thresholds(calib, target_mass=0.8, stride=S, block_size=BS, causal=True)
    assert tau.shape == (6,)
    kept, _ = kept_mass_and_density(*structured_qk(50, group=2), tau)
    assert bool((kept >= 0.78).all()), kept
    # Grid search picks the smallest grid value at or above the bisection's answer.
    grid = [0.1 * i for i in range(1, 11)]
    tau_grid = calibrate_thresholds(calib, target_mass=0.8, stride=S, block_size=BS, causal=True, grid=grid)
    want = torch.tensor([min(g for g in grid if g >= t - 1e-6) for t in tau.tolist()])
    torch.testing.assert_close(tau_grid, want.float())


def test_density_budget():
    calib = [structured_qk(seed) for seed in range(3)]
    tau = calibrate_thresholds(calib, density_budget=0.5, stride=S, block_size=BS, causal=True)
    mean = torch.stack([kept_mass_and_density(q, k, tau)[1] for q, k in calib]).mean((0, 1))
    assert bool((mean <= 0.5 + 1e-9).all()), mean
    # Maximal: a step higher breaks the budget for heads below 1.0.
    higher = (tau + 2 * 2.0**-20).clamp(max=1.0)
    mean_hi = torch.stack([kept_mass_and_density(q, k, higher)[1] for q, k in calib]).mean((0, 1))
    assert bool((mean_hi[tau < 1] > 0.5).all())
    held = torch.stack([kept_mass_and_density(*structured_qk(s), tau)[1] for s in (200, 201)]).mean((0, 1))
    assert bool((held <= 0.5 + 0.05).all()), held
    # A budget below the always-kept tiles (sink + diagonal) warns and returns the smallest τ.
    with pytest.warns(UserWarning, match="density_budget"):
        low = calibrate_thresholds(calib, density_budget=0.05, stride=S, block_size=BS, causal=True)
    assert bool((low > 0).all())


def test_json_round_trip(tmp_path):
    path = tmp_path / "thr.json"
    layers = {
        "model.layers.0.self_attn": torch.tensor([0.25, 0.5, 0.9]),
        "model.layers.1.self_attn": torch.ones(3),
    }
    meta = {"stride": 8, "block_size": 128, "target_mass": 0.9}
    save_thresholds(path, layers, model="tiny-llama", meta=meta)
    got, info = load_thresholds(path, return_info=True)
    assert info == {"model": "tiny-llama", "meta": meta}
    assert got.keys() == layers.keys()
    for name in layers:
        torch.testing.assert_close(got[name], layers[name])
    save_thresholds(path, torch.tensor([0.5, 0.75]), model="m")
    assert list(load_thresholds(path)) == ["default"]


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda d: d.pop("model"), "'model'"),
        (lambda d: d.update(format="x"), "'format'"),
        (lambda d: d["layers"].update(a=[0.5, 1.5]), "layers.a"),
        (lambda d: d["layers"].update(a="0.5"), "layers.a"),
        (lambda d: d["meta"].update(stride=0), "meta.stride"),
    ],
)
def test_json_validation_names_field(tmp_path, edit, field):
    path = tmp_path / "thr.json"
    save_thresholds(path, {"a": torch.tensor([0.5])}, model="m", meta={"stride": 8})
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=field):
        load_thresholds(path)


def test_bad_inputs(tmp_path):
    q, k = structured_qk(0)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_thresholds([(q, k)], target_mass=0.9, density_budget=0.3, stride=S, block_size=BS)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_thresholds([(q, k)], stride=S, block_size=BS)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"target_mass must be a number in \(0, 1\]"):
            calibrate_thresholds([(q, k)], target_mass=bad, stride=S, block_size=BS)
    with pytest.raises(ValueError, match=r"density_budget must be a number in \(0, 1\]"):
        calibrate_thresholds([(q, k)], density_budget=2.0, stride=S, block_size=BS)
    with pytest.raises(ValueError, match=r"samples\[0\].*4-D|samples\[0\]: q must be"):
        calibrate_thresholds([(q[0], k)], target_mass=0.9, stride=S, block_size=BS)
    with pytest.raises(ValueError, match=r"samples\[1\].*heads_q=2"):
        calibrate_thresholds([(q, k), (q[:, :, :2], k[:, :, :1])], target_mass=0.9, stride=S, block_size=BS)
    with pytest.raises(ValueError, match="heads_q=3 must be a multiple of heads_kv=2"):
        calibrate_thresholds([(q, k[:, :, :2])], target_mass=0.9, stride=S, block_size=BS)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_thresholds([], target_mass=0.9)
    with pytest.raises(ValueError, match="multiple of stride"):
        calibrate_thresholds([(q, k)], target_mass=0.9, stride=8, block_size=20)
    with pytest.raises(ValueError, match="grid"):
        calibrate_thresholds([(q, k)], target_mass=0.9, stride=S, block_size=BS, grid=[0.5, 1.2])
    with pytest.raises(ValueError, match="model"):
        save_thresholds(tmp_path / "x.json", torch.ones(3), model="")
    with pytest.raises(ValueError, match=r"thresholds\['l0'\]"):
        save_thresholds(tmp_path / "x.json", {"l0": torch.zeros(3)}, model="m")
