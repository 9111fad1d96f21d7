"""Peak memory of the native attention forward + backward grows linearly in S, never as S².

Each length runs in a fresh process and reports the growth of its peak resident set (``ru_maxrss``) over
the import-and-warm-up baseline, which sees C++ allocations that tracemalloc does not. At S = 16K a single
fp32 score matrix would be S² * 4 B = 1 GiB per head; the linear working set (q, k, v, out, dout, dq, dk,
dv, lse) is 8 * S * D * 4 B + small = 32 MiB at D = 64.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from longmoe.runtime import native_available

_PROBE = r"""
import resource, sys, torch, longmoe
from longmoe.attention import flash_attention
torch.set_num_threads(1)
def run(s):
    q, k, v = (torch.randn(1, s, 1, 64, requires_grad=True) for _ in range(3))
    flash_attention(q, k, v, causal=True, backend="native").backward(torch.randn(1, s, 1, 64))
run(256)  # warm-up: kernels, thread pool, allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(int(sys.argv[1]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)  # KiB on Linux -> bytes
"""


def _peak_growth(seqlen: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(seqlen)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not native_available(), reason="longmoe._C not built: no native kernel to measure")
def test_native_attention_memory_is_linear_in_seqlen():
    growth = {s: _peak_growth(s) for s in (4096, 8192, 16384)}
    linear = {s: 8 * s * 64 * 4 for s in growth}  # the tensors that must exist, fp32
    quadratic = 16384 * 16384 * 4
    for s, g in growth.items():
        # 4x the linear working set leaves room for the allocator and per-thread tiles; an S² buffer
        # (1 GiB at 16K, 64 MiB at 4K) would not fit under it.
        assert g <= 4 * linear[s] + (16 << 20), f"S={s}: peak grew {g / 2**20:.1f} MiB: {growth}"
    assert growth[16384] < quadratic / 8, growth
