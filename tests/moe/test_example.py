"""The user-facing MoE example runs end to end on 2 local ranks and writes its routing statistics."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def test_moe_expert_parallel_example(tmp_path):
    cmd = [
        sys.executable,
        "examples/moe_expert_parallel.py",
        "--spawn",
        "2",
        "--steps",
        "12",
        "--out",
        str(tmp_path),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    first, last = (float(v) for v in r.stdout.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first, r.stdout
    imbalance = [float(v) for v in r.stdout.strip().splitlines()[1].split()]
    assert len(imbalance) == 12 and imbalance[-1] < imbalance[0], (
        r.stdout
    )  # the expert bias balances the load
    with (tmp_path / "moe_routing.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 * 8 and {r["layer"] for r in rows} == {"moe"}
    assert (tmp_path / "moe_routing.png").stat().st_size > 5000
