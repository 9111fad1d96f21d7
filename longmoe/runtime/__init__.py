"""Runtime: native extension loader, backend registry, process groups, launcher, point-to-point exchanger."""

from longmoe.runtime.backend import (
    BACKENDS,
    select_backend,
    triton_available,
    triton_interpreting,
    use_backend,
)
from longmoe.runtime.distributed import (
    TORCHRUN_ENV_VARS,
    default_backend_for,
    global_rank_of,
    group_rank,
    group_size,
    init_from_env,
    new_group_like,
)
from longmoe.runtime.exchanger import ExchangeError, ExchangeTimeout, P2PExchanger
from longmoe.runtime.launcher import SpawnError, free_port, spawn
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
    # process groups
    "TORCHRUN_ENV_VARS",
    "default_backend_for",
    "init_from_env",
    "new_group_like",
    "group_rank",
    "group_size",
    "global_rank_of",
    # launcher
    "spawn",
    "SpawnError",
    "free_port",
    # point-to-point exchanger
    "P2PExchanger",
    "ExchangeTimeout",
    "ExchangeError",
]
