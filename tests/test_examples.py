"""The example scripts a user copies run end to end (small sizes) and check themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed  # the examples spawn local gloo ranks

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def test_long_context_train_matches_single_process():
    r = run("examples/long_context_train.py", "--world-size", "3", "--seqlen", "384", "--steps", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: max |loss difference|" in r.stdout and "standard library" in r.stdout


def test_demo_small():
    r = run("examples/demo.py", "--world-size", "2", "--sp", "2", "--ep", "2", "--steps", "2",
            "--train-seqlen", "256", "--full", "--seqlen", "512", "--sp-seqlen", "512")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every rank matches single-process attention" in r.stdout
    for alg in ("token_ring", "kv_ring", "ulysses"):
        assert alg in r.stdout
    assert "demo finished: the sharded run matches one process" in r.stdout


def test_train_long_moe_expert_parallel_matches_one_process():
    r = run("examples/train_long_moe.py", "--world-size", "3", "--sp", "3", "--ep", "1", "--experts", "3",
            "--steps", "3", "--seqlen", "192", "--quiet", "--png", "/tmp/longmoe_test_train.png")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: max relative loss difference" in r.stdout and "standard library" in r.stdout


def test_generate_long_matches_single_process():
    r = run("examples/generate_long.py", "--world-size", "2", "--prompt-bytes", "512", "--new-tokens", "4",
            "--train-steps", "2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 2-rank greedy tokens equal one process's" in r.stdout
    assert "bytes sent per decoded token per rank" in r.stdout and "KV cache" in r.stdout
