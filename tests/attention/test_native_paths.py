"""On a CPU where oneDNN's micro-kernels run bf16 (AMX, or AVX512-BF16 without AMX), bf16 inputs take the
brgemm tiles (the attention forward on AMX only, XAttention block scores, the router's logits, the expert GEMMs
of MoE experts with few rows); ``LONGMOE_NATIVE_AMX=0`` keeps them on the other native paths (AVX512-BF16 dot
products or fp32 tiles, mm_out for the experts). The fp32 expert forward takes brgemm on
AVX-512 builds (``LONGMOE_NATIVE_BRGEMM=0``: mm_out). The suite's cases run in this process on whatever the
CPU picks; these tests rerun them in a subprocess with those paths switched off, so that both paths stay
tested on such a machine (elsewhere both runs take the same path)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rerun(env: dict, cases: list[str], extra: list[str], min_passed: int, timeout: int) -> None:
    """Run the pytest `cases` in a subprocess with `env` added; all must pass, at least `min_passed` of them."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cases, *extra],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= min_passed, run.stdout[-2000:]


def test_bf16_native_cases_without_amx():
    cases = [
        "tests/attention/test_attention_core.py::test_matches_oracle",
        "tests/attention/test_xattention_kernels.py::test_native_block_scores",
        "tests/attention/test_fuzz.py",
    ]
    _rerun({"LONGMOE_NATIVE_AMX": "0"}, cases, ["-k", "bfloat16"], min_passed=20, timeout=900)


def test_grouped_mm_cases_without_brgemm():
    """The expert GEMM cases (bf16 and fp32, rows in expert order and gathered) with the brgemm paths off: every
    expert on mm_out; the router's bf16 GEMM with fp32 output on the fp32 mm."""
    cases = [
        "tests/moe/test_layer.py::test_native_grouped_mm_shapes",
        "tests/moe/test_layer.py::test_native_grouped_mm_kinds",
        "tests/moe/test_router.py::test_native_mm_bf16_f32",
        "tests/moe/test_router.py::test_router_dtype",
        "tests/moe/test_layer.py::test_native_grouped_mm_gathered_equals_permuted",
    ]
    _rerun({"LONGMOE_NATIVE_AMX": "0", "LONGMOE_NATIVE_BRGEMM": "0"}, cases, [], min_passed=22, timeout=600)
