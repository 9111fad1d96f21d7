"""Process groups: setup from the torchrun environment, and the group helpers every distributed piece uses.

* ``init_from_env()`` reads what ``torchrun`` (or ``longmoe.runtime.launcher.spawn``) exported
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and initialises the
  default process group: gloo for CPU tensors, NCCL for CUDA tensors (``dist_backend``).
* ``world_and_rank(group)`` (``(1, 0)`` without torch.distributed, so the sequence-parallel functions run
  in one process), ``group_key(group)`` (a cache key that pins the group), ``group_device(group)`` (where a
  collective's tensors must live: CUDA for an NCCL group, CPU for gloo).
* ``new_group_like(group)`` / ``second_group(group)``: a second group over the same ranks. TokenRing keeps
  two batches of point-to-point operations in flight at once (Q forward, partial outputs back); each batch
  needs its own group, because a process group runs its P2P operations in order. Only the members
  synchronise (``use_local_synchronization``), so two sequence-parallel groups of one job can each make
  theirs lazily, at different times, without a job-wide collective.
* ``ring_direction(offset, world)``: the byte-accounting label of a send to rank ``r + offset``.

Nothing here touches CUDA at import time: the device is resolved inside the functions.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

__all__ = [
    "TORCHRUN_ENV_VARS",
    "default_dist_backend_for",
    "init_from_env",
    "new_group_like",
    "second_group",
    "world_and_rank",
    "group_key",
    "group_device",
    "ring_direction",
]

TORCHRUN_ENV_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables ``init_from_env`` needs (all set by ``torchrun`` and by ``launcher.spawn``)."""

_DIST_BACKEND_FOR_DEVICE_TYPE = {"cpu": "gloo", "cuda": "nccl"}


def default_dist_backend_for(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for tensors on ``device``: ``"gloo"`` for CPU, ``"nccl"`` for CUDA.

    ``device`` may carry an index (``"cuda:3"``); only its type matters.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"default_dist_backend_for(device={device!r}): not a torch device ({exc})") from exc
    try:
        return _DIST_BACKEND_FOR_DEVICE_TYPE[dev.type]
    except KeyError:
        raise ValueError(
            f"default_dist_backend_for(device={device!r}): no distributed backend for device type {dev.type!r}; "
            f"expected one of {sorted(_DIST_BACKEND_FOR_DEVICE_TYPE)}"
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
    dist_backend: str | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, int]:
    """Initialise the default process group from the torchrun environment; return ``(rank, world_size)``.

    Args:
        device: the device this rank computes on. Default: ``cuda:LOCAL_RANK`` when CUDA is available,
            else ``cpu``. It picks the process-group backend when ``dist_backend`` is not given.
        dist_backend: ``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``, ... Default:
            ``default_dist_backend_for(device)``. (``backend`` elsewhere in longmoe means a kernel backend.)
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
        if "nccl" in resolved_backend:
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
    if dist_backend is None:
        dist_backend = default_dist_backend_for(dev)
    kwargs = {}
    if "nccl" in dist_backend:
        if dev.type != "cuda":
            raise ValueError(
                f"init_from_env(dist_backend={dist_backend!r}, device={str(dev)!r}): NCCL needs a CUDA device"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # Binding the group to the device lets NCCL create its communicator eagerly and split groups cheaply.
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=dist_backend,
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


def world_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) for ``group=None`` without an initialised process group
    (single-process use of the sequence-parallel functions)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    g = _resolve(group)
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group")
    return world, rank


_PINNED_GROUPS: dict[int, object] = {}


def group_key(group: dist.ProcessGroup | None) -> int:
    """A cache key for ``group`` (0 for the default group). The group is kept alive by the cache, so its
    ``id`` can never be reused by a different group while a cached entry refers to it."""
    if group is None:
        return 0
    _PINNED_GROUPS.setdefault(id(group), group)
    return id(group)


def group_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device a collective's tensors must be on for ``group``: this process's current accelerator
    device for an NCCL-only group (no device type is named here: ``torch.accelerator`` says which), the
    CPU for gloo (and for a ``"cpu:gloo,cuda:nccl"`` group, whose metadata collectives then stay off the
    accelerator). The CPU without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend(_resolve(group))).lower()
    if "nccl" in backend and "gloo" not in backend:
        accel = torch.accelerator.current_accelerator()
        if accel is None:
            raise RuntimeError(
                f"group_device: the group's backend is {backend!r} but this process has no accelerator"
            )
        return torch.device(accel.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def ring_direction(offset: int, world: int) -> str:
    """Byte-accounting label of a send to rank ``r + offset`` in a ring of ``world``: "next", "prev", or
    "other" (a non-neighbour)."""
    offset %= world
    if offset == 1:
        return "next"
    if offset == world - 1:
        return "prev"
    return "other"


def new_group_like(
    group: dist.ProcessGroup | None = None, *, timeout_s: float | None = None
) -> dist.ProcessGroup:
    """A new process group over the same ranks, with the same backend, as ``group`` (``None``: WORLD).

    Two batches of point-to-point operations run concurrently only on two different groups (a group
    executes its P2P operations in issue order), so TokenRing sends Q on one group and returns the
    partial outputs on a second one made here.

    Only the members of ``group`` take part (``use_local_synchronization=True``): with two
    sequence-parallel groups {0,1} and {2,3} each pair makes its own second group when it first needs it.
    (Without it ``dist.new_group`` is collective over the whole job and the two pairs, asking for
    different ranks, hang.) The members must call it in the same order.

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
    return dist.new_group(
        ranks=ranks, timeout=timeout, backend=str(dist.get_backend(g)), use_local_synchronization=True
    )


_SECOND_GROUPS: dict[int, dist.ProcessGroup] = {}


def second_group(group: dist.ProcessGroup | None, *, timeout_s: float | None = None) -> dist.ProcessGroup:
    """A second process group over ``group``'s ranks, made by :func:`new_group_like` on first use (only
    the members synchronise) and cached, for rings that keep two P2P batches in flight."""
    key = group_key(group)
    if key not in _SECOND_GROUPS:
        _SECOND_GROUPS[key] = new_group_like(group, timeout_s=timeout_s)
    return _SECOND_GROUPS[key]
