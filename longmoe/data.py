"""Training text the machine already has: the Python standard library's own ``.py`` sources, as bytes.

No model or dataset is downloaded anywhere in longmoe. Every LM trained here (the XAttention benchmark's
byte LM, the slimming teacher, the long-context examples) reads the same corpus through this module:

- :func:`stdlib_files`: the standard library's ``.py`` files (``Path(os.__file__).parent``, recursively,
  ``site-packages`` excluded), in sorted relative-path order, so the order is the same on every machine
  with the same Python.
- :func:`stdlib_split`: (train, held_out) uint8 byte streams; every ``HOLDOUT_EVERY``-th file of that
  order (index % 20 == 0) is held out and never trained on.
- :func:`windows`: random (count, seqlen + 1) int64 windows for next-byte prediction.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["HOLDOUT_EVERY", "stdlib_files", "stdlib_split", "windows", "held_out_tokens"]

HOLDOUT_EVERY = 20
"""Files whose sorted index % 20 == 0 go to the held-out stream."""


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(os.__file__).parent


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted relative-path order (``site-packages`` excluded)."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=1)
def _split_bytes() -> tuple[bytes, bytes, int, int, int]:
    root = stdlib_root()
    train, held = [], []
    files = stdlib_files()
    for i, path in enumerate(files):
        rel = path.relative_to(root).as_posix()
        chunk = b"# file: " + rel.encode() + b"\n" + path.read_bytes() + b"\n"
        (held if i % HOLDOUT_EVERY == 0 else train).append(chunk)
    return b"".join(train), b"".join(held), len(files), len(train), len(held)


def stdlib_split() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, held_out) uint8 byte streams (n_bytes,) and a description of the split.

    Each file contributes ``b"# file: <relative path>\\n" + its bytes + b"\\n"``; every ``HOLDOUT_EVERY``-th
    file (sorted index % 20 == 0) goes to the held-out stream. The bytes are read once per process.
    """
    train, held, n_files, n_train, n_held = _split_bytes()
    tr = torch.frombuffer(bytearray(train), dtype=torch.uint8)
    ho = torch.frombuffer(bytearray(held), dtype=torch.uint8)
    info = dict(root=str(stdlib_root()), files=n_files, train_files=n_train, held_out_files=n_held,
                train_bytes=tr.numel(), held_out_bytes=ho.numel(),
                holdout_rule=f"sorted index % {HOLDOUT_EVERY} == 0")  # fmt: skip
    return tr, ho, info


def windows(data: torch.Tensor, seqlen: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``seqlen + 1`` bytes from ``data`` (n,) as int64 (count, seqlen + 1)."""
    if data.dim() != 1 or data.numel() < seqlen + 2:
        raise ValueError(
            f"data must be 1-D with at least seqlen + 2 = {seqlen + 2} bytes, got shape {tuple(data.shape)}"
        )
    if seqlen < 1 or count < 1:
        raise ValueError(f"seqlen={seqlen} and count={count} must both be >= 1")
    starts = torch.randint(0, data.numel() - seqlen - 1, (count,), generator=generator)
    return torch.stack([data[s : s + seqlen + 1] for s in starts.tolist()]).long()


def held_out_tokens(seqlen: int) -> torch.Tensor:
    """The first ``seqlen + 1`` bytes of the held-out stream (held-out files concatenated in sorted order)
    as int64 (1, seqlen + 1): inputs are ``[:, :-1]``, next-byte targets ``[:, 1:]``."""
    _, held, _ = stdlib_split()
    if held.numel() < seqlen + 1:
        raise ValueError(f"seqlen={seqlen} exceeds the held-out text ({held.numel() - 1} bytes)")
    return held[: seqlen + 1].long()[None]
