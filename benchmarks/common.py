"""What every benchmark script shares: timing, run metadata and CSV output.

Scripts run as ``python benchmarks/<name>.py``, so this directory is on ``sys.path`` and they import it as
``from common import ...``.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import longmoe

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, repeats: int, sync=None) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (``sync`` runs before each clock read)."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(thunks: dict, repeats: int) -> dict:
    """Median seconds per thunk, timed round-robin (one warm-up each), so that load from other processes on a
    shared machine hits every provider alike instead of whichever ran at the wrong moment."""
    for fn in thunks.values():
        fn()
    times = {k: [] for k in thunks}
    for _ in range(repeats):
        for k, fn in thunks.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_metadata(**extra) -> dict:
    """Machine, versions, threads and a UTC timestamp, for every CSV row of one run."""
    return dict(
        machine=f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        torch=torch.__version__,
        longmoe=longmoe.__version__,
        threads=torch.get_num_threads(),
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


def write_csv(rows: list[dict], path: Path) -> Path:
    """One CSV row per dict (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
