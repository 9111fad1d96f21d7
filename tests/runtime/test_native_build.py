"""How the package behaves with and without its native extension, and the bf16 tile paths."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import longmoe

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, **env},
    )  # fmt: skip


def test_build_info_reports_kernels():
    info = longmoe.runtime.native_build_info()
    assert set(info) >= {"blas_sgemm", "bf16_dot", "isa", "openmp"}
    assert "OpenMP" in info["openmp"]


def test_missing_extension_warns_once_and_uses_reference():
    """Without longmoe._C (as after LONGMOE_SKIP_NATIVE=1) the package imports, warns once, and CPU ops
    run on the reference backend; forcing the native backend raises instead of falling back silently."""
    code = """
import sys, warnings
sys.modules["longmoe._C"] = None  # what an install without the extension looks like to the import
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, longmoe
    from longmoe.attention import flash_attention
    from longmoe.runtime import select_backend
    q = torch.randn(1, 5, 2, 8)
    out = flash_attention(q, q, q, causal=True)
    assert select_backend(q) == "reference", select_backend(q)
    try:
        flash_attention(q, q, q, backend="native")
        raise AssertionError("forcing native without the extension must raise")
    except RuntimeError as exc:
        assert "longmoe._C is not built" in str(exc), exc
mine = [w for w in caught if "longmoe._C" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in caught]
print("ok")
"""
    r = run_python(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_skip_native_build_has_no_extension(tmp_path):
    """LONGMOE_SKIP_NATIVE=1 builds a wheel without longmoe._C (and without compiling anything)."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LONGMOE_SKIP_NATIVE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    wheels = list(tmp_path.glob("longmoe-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "longmoe/attention/flash_attention.py" in names
    assert not [n for n in names if n.endswith(".so")], names


@pytest.mark.skipif(
    not longmoe.runtime.native_build_info().get("bf16_dot"),
    reason="this CPU has no AVX512-BF16: bf16 already runs on the fp32 tiles tested everywhere else",
)
def test_bf16_fp32_tile_path_matches_oracle():
    """The suite's bf16 cases run the AVX512-BF16 tiles on this CPU; run the fp32-tile bf16 path too
    (what CPUs without AVX512-BF16 use), in a process that switches the dot-product tiles off."""
    code = """
import torch
from tests.attention.test_attention_core import check_against_oracle
for shape in [(1, 97, 1025, 4, 1, 64), (3, 128, 97, 2, 2, 128)]:
    for causal in (False, True):
        check_against_oracle("native", shape, torch.bfloat16, causal)
print("ok")
"""
    r = run_python(code, LONGMOE_NATIVE_BF16_DOT="0")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_huge_page_allocations_follow_the_kernel_and_the_user():
    """import longmoe turns on PyTorch's huge-page CPU allocations where the kernel has THP enabled (not
    "never"), and leaves a value the user set alone."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            usable = "[never]" not in f.read()
    except OSError:
        usable = False
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = "import os, longmoe; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("1" if usable else "None"), (usable, r.stdout)
    r = run_python(code, THP_MEM_ALLOC_ENABLE="0")
    assert r.stdout.strip() == "0", r.stdout
