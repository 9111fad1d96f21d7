"""Routing statistics: per-step, per-layer expert load, drops, entropy, imbalance; CSV and heatmap."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from longmoe.moe import MoEConfig, MoELayer, RoutingStats


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, capacity_factor=0.5)
        self.blocks = nn.ModuleList([MoELayer(cfg), MoELayer(cfg)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)[0]
        return x


def test_stats_csv_and_heatmap(tmp_path):
    model = TwoLayers()
    stats = RoutingStats()
    assert stats.attach(model) == ["blocks.0", "blocks.1"]
    seen = []
    for step in range(3):
        for _micro in range(2):  # two micro-batches per step are summed
            x = torch.randn(10, 8)
            h = x
            for b in model.blocks:
                out, aux = b(h)
                seen.append(
                    (step, aux.tokens_per_expert.clone(), int(aux.dropped_tokens), aux.router_entropy.item())
                )
                h = h + out
        stats.step()
    rows = stats.rows()
    assert [(r.step, r.layer) for r in rows] == [(s, f"blocks.{i}") for s in range(3) for i in range(2)]
    for r in rows:
        mine = [v for k, v in enumerate(seen) if v[0] == r.step and k % 2 == int(r.layer[-1])]
        assert r.load == (mine[0][1] + mine[1][1]).tolist()
        assert r.dropped == mine[0][2] + mine[1][2] > 0  # capacity 0.5 drops
        assert r.tokens == 20
        assert r.entropy == pytest.approx((mine[0][3] + mine[1][3]) / 2, rel=1e-6)
        assert r.imbalance == pytest.approx(max(r.load) / (sum(r.load) / 4))

    path = stats.to_csv(tmp_path / "routing.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 2 * 4
    assert {k: table[5][k] for k in ("step", "layer", "expert")} == {
        "step": "0",
        "layer": "blocks.1",
        "expert": "1",
    }
    assert int(table[5]["load"]) == rows[1].load[1]

    png = stats.plot_heatmap(tmp_path / "routing.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    stats.detach()
    model(torch.randn(4, 8))
    assert len(stats.rows()) == 6
    with pytest.raises(ValueError, match=r"no MoELayer inside"):
        RoutingStats().attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"nothing recorded yet"):
        RoutingStats().plot_heatmap(tmp_path / "empty.png")
