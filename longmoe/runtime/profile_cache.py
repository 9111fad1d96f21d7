"""Measured profiles kept on disk, as cuDNN's benchmark cache does: what ``measure_topology`` learns about
the links and what ``profile_compute`` times for a shape are stored under a cache directory and reused by
later processes, so ``algorithm="auto"`` measures once per (machine, topology, shape, dtype), not once per
process.

* Where: ``$LONGMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/longmoe``, else ``~/.cache/longmoe``; one JSON file
  per entry, ``<dir>/<kind>/<sha256 of the key>.json``, written atomically (several processes may write
  the same entry at once).
* Off: ``LONGMOE_PROFILE_CACHE=0`` (or ``false`` / ``off``).
* Invalidation is by key: the key holds the machine's fingerprint (:func:`machine_fingerprint`: host, CPU,
  torch and longmoe versions, threads, device name) and the topology's (the ranks' hosts and devices, the
  group size, the backend, and ``$LONGMOE_TOPOLOGY_FINGERPRINT``, which an emulated cluster sets from its
  link configuration), so a change of either is a miss and is measured afresh. Delete the directory (or
  :meth:`ProfileCache.clear`) to drop everything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import socket
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["ProfileCache", "cache_dir", "machine_fingerprint"]

_FORMAT = 1
_KIND = re.compile(r"^[A-Za-z0-9_]+$")


def cache_dir() -> Path | None:
    """The cache directory (not created here), or None when ``LONGMOE_PROFILE_CACHE`` turns the cache off."""
    if os.environ.get("LONGMOE_PROFILE_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if os.environ.get("LONGMOE_CACHE_DIR"):
        return Path(os.environ["LONGMOE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "longmoe"
    return Path.home() / ".cache" / "longmoe"


@functools.cache
def _cpu() -> tuple[str, str]:
    """(CPU model name, a short hash of its feature flags) from /proc/cpuinfo where there is one."""
    model = flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = value.strip()
    return model or platform.processor() or platform.machine(), hashlib.sha256(flags.encode()).hexdigest()[
        :12
    ]


def machine_fingerprint(device: torch.device | str = "cpu") -> dict[str, str]:
    """What makes one machine's measurements differ from another's. Touches CUDA only for a CUDA device."""
    device = torch.device(device)
    try:
        from importlib.metadata import version

        ours = version("longmoe")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on sys.path)
        ours = "unknown"
    model, flags = _cpu()
    out = {
        "host": socket.gethostname(),
        "arch": platform.machine(),
        "cpu": model,
        "cpu_flags": flags,
        "torch": torch.__version__,
        "longmoe": ours,
        "threads": str(torch.get_num_threads()),
        "device": device.type,
    }
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


class ProfileCache:
    """JSON entries keyed by a dict, one file each (see the module docstring). ``directory=None``: the
    default :func:`cache_dir`; when that is off, ``get`` returns None and ``put`` does nothing."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory is not None else cache_dir()

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, kind: str, key: dict) -> tuple[Path, str]:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"ProfileCache: kind={kind!r} is not a plain name (expected letters, digits, _)")
        try:
            text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        except TypeError as exc:
            bad = [k for k, v in key.items() if not _jsonable(v)]
            raise TypeError(f"ProfileCache: key entries {bad} are not JSON-serialisable ({exc})") from exc
        digest = hashlib.sha256(text.encode()).hexdigest()
        return self.directory / kind / f"{digest}.json", text

    def get(self, kind: str, key: dict) -> dict | None:
        """The stored value for ``key``, or None (missing, unreadable, another format, or another key)."""
        if not self.enabled:
            return None
        path, text = self._path(kind, key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                path.unlink()  # a torn or corrupt file: measure again
            return None
        if not isinstance(entry, dict) or entry.get("format") != _FORMAT:
            return None
        if json.dumps(entry.get("key"), sort_keys=True, separators=(",", ":")) != text:
            return None
        return entry.get("value")

    def put(self, kind: str, key: dict, value: dict) -> None:
        """Store ``value`` for ``key`` (atomically: a temporary file renamed over the entry)."""
        if not self.enabled:
            return
        path, _ = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"format": _FORMAT, "key": key, "value": value, "created": time.time()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def clear(self) -> None:
        """Delete every entry."""
        if not self.enabled or not self.directory.exists():
            return
        for path in self.directory.glob("*/[!.]*.json"):  # not another process's temporary file
            with contextlib.suppress(OSError):
                path.unlink()


def _jsonable(value) -> bool:
    try:
        json.dumps(value, sort_keys=True)
    except TypeError:
        return False
    return True
