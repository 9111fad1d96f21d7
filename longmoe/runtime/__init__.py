"""Runtime: native extension loader, kernel-backend registry, process groups, collectives, launcher,
point-to-point exchanger."""

from longmoe.runtime.backend import (
    BACKENDS,
    select_backend,
    triton_available,
    triton_interpreting,
    use_backend,
)
from longmoe.runtime.collectives import CollectiveError, all_to_all, check_same_across_ranks
from longmoe.runtime.distributed import (
    TORCHRUN_ENV_VARS,
    default_dist_backend_for,
    group_device,
    group_key,
    init_from_env,
    new_group_like,
    ring_direction,
    second_group,
    world_and_rank,
)
from longmoe.runtime.exchanger import CommStats, ExchangeError, ExchangeTimeout, P2PExchanger
from longmoe.runtime.launcher import SpawnError, free_port, spawn
from longmoe.runtime.memory import keep_cpu_memory
from longmoe.runtime.native import load_native, native_available, native_build_info

__all__ = [
    # backend registry
    "BACKENDS",
    "select_backend",
    "use_backend",
    "triton_available",
    "triton_interpreting",
    # native extension
    "load_native",
    "native_available",
    "native_build_info",
    # CPU memory
    "keep_cpu_memory",
    # process groups
    "TORCHRUN_ENV_VARS",
    "default_dist_backend_for",
    "init_from_env",
    "new_group_like",
    "second_group",
    "world_and_rank",
    "group_key",
    "group_device",
    "ring_direction",
    # collectives
    "all_to_all",
    "check_same_across_ranks",
    "CollectiveError",
    # launcher
    "spawn",
    "SpawnError",
    "free_port",
    # point-to-point exchanger
    "P2PExchanger",
    "CommStats",
    "ExchangeTimeout",
    "ExchangeError",
]
