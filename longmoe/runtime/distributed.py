"""Process-group setup from the torchrun environment, and small group-rank helpers.

Every distributed piece of longmoe gets its process groups from here:

* ``init_from_env()`` reads what ``torchrun`` (or ``longmoe.runtime.launcher.spawn``) exported
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and initialises the
  default process group: gloo for CPU tensors, NCCL for CUDA tensors.
* ``new_group_like(group)`` builds a second group over the same ranks. TokenRing keeps two batches of
  point-to-point operations in flight at once (Q forward, partial outputs back); each batch needs its
  own group, because a process group runs its P2P operations in order.
* ``group_rank``, ``group_size`` and ``global_rank_of`` translate between group and global ranks;
  ``None`` means the default (WORLD) group throughout.

Nothing here touches CUDA at import time: the device is resolved inside ``init_from_env``.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

__all__ = [
    "TORCHRUN_ENV_VARS",
    "default_backend_for",
    "init_from_env",
    "new_group_like",
    "group_rank",
    "group_size",
    "global_rank_of",
]

TORCHRUN_ENV_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables ``init_from_env`` needs (all set by ``torchrun`` and by ``launcher.spawn``)."""

_BACKEND_FOR_DEVICE_TYPE = {"cpu": "gloo", "cuda": "nccl"}


def default_backend_for(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for tensors on ``device``: ``"gloo"`` for CPU, ``"nccl"`` for CUDA.

    ``device`` may carry an index (``"cuda:3"``); only its type matters.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"default_backend_for(device={device!r}): not a torch device ({exc})") from exc
    try:
        return _BACKEND_FOR_DEVICE_TYPE[dev.type]
    except KeyError:
        raise ValueError(
            f"default_backend_for(device={device!r}): no distributed backend for device type {dev.type!r}; "
            f"expected one of {sorted(_BACKEND_FOR_DEVICE_TYPE)}"
        ) from None


def _read_env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, int]:
    """Initialise the default process group from the torchrun environment; return ``(rank, world_size)``.

    Args:
        device: the device this rank computes on. Default: ``cuda:LOCAL_RANK`` when CUDA is available,
            else ``cpu``. It picks the backend when ``backend`` is not given.
        backend: ``"gloo"``, ``"nccl"``, ... Default: ``default_backend_for(device)``.
        timeout_s: timeout of every collective of the default group, in seconds.

    When the default group is already initialised (by the caller, by ``launcher.spawn`` or by an earlier
    call) it is left as it is and its rank and size are returned; the environment is then not required.
    With the NCCL backend the current CUDA device is set to ``device``, as NCCL P2P needs.

    Raises:
        RuntimeError: torchrun environment variables are missing (their names are listed).
        ValueError: an environment variable is malformed, or an argument is out of range.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"init_from_env(timeout_s={timeout_s!r}): expected a finite number of seconds > 0")

    if dist.is_initialized():
        resolved_backend = str(dist.get_backend())
        if resolved_backend == "nccl":
            dev = torch.device(device) if device is not None else _default_device(local_rank=None)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
        return dist.get_rank(), dist.get_world_size()

    if not dist.is_available():
        raise RuntimeError("init_from_env(): this PyTorch build has no torch.distributed support")

    missing = [name for name in TORCHRUN_ENV_VARS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"init_from_env(): torchrun environment variable(s) {', '.join(missing)} are not set; "
            "launch with torchrun or longmoe.runtime.launcher.spawn"
        )
    rank = _read_env_int("RANK")
    world_size = _read_env_int("WORLD_SIZE")
    local_rank = _read_env_int("LOCAL_RANK")
    _read_env_int("MASTER_PORT")
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank} must be >= 0")

    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if backend is None:
        backend = default_backend_for(dev)
    kwargs = {}
    if backend == "nccl":
        if dev.type != "cuda":
            raise ValueError(f"init_from_env(backend='nccl', device={str(dev)!r}): NCCL needs a CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # Binding the group to the device lets NCCL create its communicator eagerly and split groups cheaply.
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return rank, world_size


def _default_device(local_rank: int | None) -> torch.device:
    # CUDA is queried here, at call time, never at import.
    if torch.cuda.is_available():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun sets it; one process: GPU 0
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _require_initialized(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what}: the default process group is not initialised; call longmoe.runtime.init_from_env() "
            "first (and launch with torchrun or longmoe.runtime.launcher.spawn)"
        )


def _resolve(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def group_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (``None``: the default group); ``-1`` when it is not a member."""
    _require_initialized("group_rank()")
    return dist.get_rank(_resolve(group))


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (``None``: the default group)."""
    _require_initialized("group_size()")
    return dist.get_world_size(_resolve(group))


def global_rank_of(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global (default-group) rank of ``group_rank`` in ``group`` (``None``: the default group)."""
    _require_initialized("global_rank_of()")
    g = _resolve(group)
    size = dist.get_world_size(g)
    if not isinstance(group_rank, int) or not 0 <= group_rank < size:
        raise ValueError(f"global_rank_of(group_rank={group_rank!r}): expected an int in [0, {size})")
    return dist.get_global_rank(g, group_rank)


def new_group_like(
    group: dist.ProcessGroup | None = None, *, timeout_s: float | None = None
) -> dist.ProcessGroup:
    """A new process group over the same ranks, with the same backend, as ``group`` (``None``: WORLD).

    Two batches of point-to-point operations run concurrently only on two different groups (a group
    executes its P2P operations in issue order), so TokenRing sends Q on one group and returns the
    partial outputs on a second one made here.

    This is collective over the *default* group, like ``torch.distributed.new_group``: every process of
    the job must call it, in the same order, even processes that are not members of ``group``.

    Args:
        group: the group to copy.
        timeout_s: collective timeout of the new group; default: the default group's timeout.
    """
    _require_initialized("new_group_like()")
    if timeout_s is not None and not (
        isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0
    ):
        raise ValueError(f"new_group_like(timeout_s={timeout_s!r}): expected a finite number of seconds > 0")
    g = _resolve(group)
    ranks = dist.get_process_group_ranks(g)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return dist.new_group(ranks=ranks, timeout=timeout, backend=str(dist.get_backend(g)))
