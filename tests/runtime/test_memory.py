"""longmoe.runtime.keep_cpu_memory: after it, a large tensor freed and allocated again reuses the freed memory
instead of being faulted in afresh. Each case runs in its own process (the setting is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from longmoe.runtime import keep_cpu_memory

# Allocate, touch and free a 64 MB tensor 24 times; count the minor page faults of the last 4. With 4 KB pages
# (huge pages off for this check) a fresh mapping takes ~16K faults. Kept heap memory is reused once the heap
# has settled (up to ~10 rounds here grew it past small allocations made in between).
_PROBE = """
import resource, sys, torch
import longmoe
if sys.argv[1] == "1":
    assert longmoe.runtime.keep_cpu_memory() is True
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
print(sum(faults[-4:]))
"""


def _faults(keep: bool) -> int:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0", "LONGMOE_KEEP_CPU_MEMORY": "0"}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if keep else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1])


def test_keep_cpu_memory_reuses_freed_memory():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":  # nothing to tune: it says so
        assert keep_cpu_memory() is False
        return
    default, kept = _faults(False), _faults(True)
    assert default > 4 * 8000, f"the probe should fault each fresh 64 MB tensor in 4 KB pages; got {default}"
    assert kept < 1000, (
        f"after keep_cpu_memory 4 rounds of a 64 MB tensor took {kept} page faults ({default})"
    )
