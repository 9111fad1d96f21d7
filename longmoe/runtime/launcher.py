"""Run a function on ``world_size`` real local processes joined by a process group (tests, examples).

``spawn(fn, world_size, *args)`` is a small, test-friendly ``torchrun``: it starts one process per rank
with the ``spawn`` start method, exports the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), initialises the process group, calls
``fn(rank, world_size, *args)`` and returns every rank's return value in rank order.

It never hangs: if a rank raises, the others get a short grace period to finish (their own errors are
usually consequences of the first one) and are then terminated, and ``SpawnError`` carries every failing
rank's full traceback. If the whole run exceeds ``timeout_s``, the ranks still running have their Python
stacks dumped (POSIX), are killed, and ``TimeoutError`` names them and shows where they were stuck.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait as _wait_ready
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longmoe.runtime.distributed import init_from_env

__all__ = ["SpawnError", "spawn", "free_port"]

# After the first rank fails, the others get this long to finish or fail on their own before they are
# terminated: peers blocked on the failed rank see "connection closed" from gloo within milliseconds.
_FAILURE_GRACE_S = 3.0
# Attempts with a fresh port when rank 0's TCP store finds its port taken (the free port is picked by
# binding port 0 and closing the socket, so another process can grab it before rank 0 listens).
_PORT_ATTEMPTS = 3
_HAS_STACK_DUMP = hasattr(signal, "SIGUSR1")


class SpawnError(RuntimeError):
    """One or more ranks of ``spawn`` raised or died.

    Attributes:
        failures: rank -> full traceback text (or exit description), in the order the failures arrived.
        terminated: ranks that were still running after the failure and were terminated.
    """

    def __init__(self, message: str, failures: dict[int, str], terminated: list[int]):
        super().__init__(message)
        self.failures = failures
        self.terminated = terminated


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it by binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _default_threads(world_size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // world_size)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    port: int,
    dist_backend: str | None,
    timeout_s: float,
    env: dict[str, str],
    conn,
    stack_path: str | None,
    netns: str | None = None,
) -> None:
    """Body of one rank's process: network namespace, environment, process group, ``fn``, report through
    ``conn``."""
    stack_file = None
    phase = "init"
    try:
        if netns is not None:  # before any socket exists: gloo's threads start later and inherit it
            _enter_netns(netns)
        if stack_path is not None:
            stack_file = open(stack_path, "w")  # noqa: SIM115  (kept open for faulthandler until exit)
            faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        os.environ.update(env)
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(max(1, threads))
        if dist_backend is not None:  # the environment set above is what torchrun would export
            device = None
            if "nccl" in dist_backend:
                device = torch.device("cuda", rank % torch.cuda.device_count())
            init_from_env(device=device, dist_backend=dist_backend, timeout_s=timeout_s)
        phase = "run"
        result = fn(rank, world_size, *args)
        phase = "teardown"
        if dist.is_initialized():
            dist.destroy_process_group()
        phase = "result"
        try:
            payload = pickle.dumps(("ok", result))
        except Exception as exc:
            raise TypeError(
                f"the return value of rank {rank} ({type(result).__name__}) cannot be pickled: {exc}"
            ) from exc
        conn.send_bytes(payload)
    except BaseException:
        text = traceback.format_exc()
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps(("error", phase, text)))
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        if stack_file is not None:
            faulthandler.unregister(signal.SIGUSR1)
            stack_file.close()


_CLONE_NEWNET = 0x40000000


def _enter_netns(name: str) -> None:
    """Move this process's main thread into the named network namespace (``/run/netns/<name>``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name!r} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _fn_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _stop(procs: list, ranks: list[int]) -> None:
    """SIGTERM ``ranks``, then SIGKILL whatever is left after one second."""
    for r in ranks:
        if procs[r].is_alive():
            procs[r].terminate()
    deadline = time.monotonic() + 1.0
    for r in ranks:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    for r in ranks:
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join(5.0)


def _dump_stacks(procs: list, ranks: list[int], stack_paths: list[str | None]) -> str:
    """Ask ``ranks`` to write their Python stacks (faulthandler on SIGUSR1) and return the text."""
    if not _HAS_STACK_DUMP:
        return ""
    for r in ranks:
        if procs[r].is_alive() and procs[r].pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    parts = []
    for r in ranks:
        path = stack_paths[r]
        try:
            with open(path) as f:  # type: ignore[arg-type]
                text = f.read().strip()
        except (OSError, TypeError):
            text = ""
        parts.append(f"--- rank {r} stack at the timeout ---\n{text or '(no stack dump: still starting up)'}")
    return "\n".join(parts)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    dist_backend: str | None = "gloo",
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    netns: list[str] | None = None,
    master_addr: str = "127.0.0.1",
    rank_env: list[dict[str, str]] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return the results by rank.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable.
        world_size: number of processes (>= 1).
        *args: extra positional arguments for ``fn`` (picklable; tensors travel through shared memory).
        dist_backend: process-group backend each rank initialises (with ``init_from_env``) before calling
            ``fn`` (``"gloo"``; ``"nccl"`` binds rank ``r`` to ``cuda:r % device_count``). ``None``: do not initialise a group, so ``fn``
            can call ``longmoe.runtime.init_from_env()`` itself. A group still alive when ``fn`` returns
            is destroyed.
        timeout_s: limit for the whole run (start-up included) and the process group's collective timeout.
        env: extra environment variables for every rank. ``OMP_NUM_THREADS`` (and ``torch`` threads)
            default to ``max(1, cpu_count // world_size)`` so that ranks do not oversubscribe the CPU.
        netns: one network namespace name per rank (``/run/netns/<name>``, as ``ip netns add`` makes);
            each rank enters its own before it opens any socket (``longmoe.runtime.netem`` builds them).
        master_addr: ``MASTER_ADDR`` of every rank (rank 0's address; with ``netns``, in its namespace).
        rank_env: extra environment per rank (``GLOO_SOCKET_IFNAME`` of each namespace), applied last.

    Returns:
        ``[result_of_rank_0, ..., result_of_rank_{world_size-1}]``.

    Raises:
        SpawnError: a rank raised or died; the message names the rank(s) and holds their tracebacks.
        TimeoutError: the run exceeded ``timeout_s``; the message names the ranks still running.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"spawn(world_size={world_size!r}): expected an int >= 1")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"spawn(timeout_s={timeout_s!r}): expected a finite number of seconds > 0")
    for what, value in (("netns", netns), ("rank_env", rank_env)):
        if value is not None and len(value) != world_size:
            raise ValueError(f"spawn({what}={value!r}): expected one entry per rank ({world_size})")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"spawn(env={env!r}): expected a dict of str -> str")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"spawn(fn={fn!r}): fn must be a module-level function so that it can be pickled into the "
            f"rank processes ({exc})"
        ) from exc

    deadline = time.monotonic() + timeout_s
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _spawn_once(
                fn,
                world_size,
                args,
                dist_backend,
                timeout_s,
                deadline,
                env or {},
                netns,
                master_addr,
                rank_env,
            )
        except SpawnError as err:
            init_failure = err.failures.get(0, "")
            port_taken = "EADDRINUSE" in init_failure or "ddress already in use" in init_failure
            if not port_taken or attempt == _PORT_ATTEMPTS - 1 or time.monotonic() >= deadline:
                raise
    raise AssertionError("unreachable")


def _spawn_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    dist_backend: str | None,
    timeout_s: float,
    deadline: float,
    user_env: dict[str, str],
    netns: list[str] | None = None,
    master_addr: str = "127.0.0.1",
    rank_env: list[dict[str, str]] | None = None,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = free_port()
    threads = _default_threads(world_size)
    name = f"spawn(fn={_fn_name(fn)}, world_size={world_size})"

    with tempfile.TemporaryDirectory(prefix="longmoe-spawn-") as tmp:
        procs: list = []
        readers: list = []
        stack_paths: list[str | None] = []
        try:
            for rank in range(world_size):
                env = {
                    "RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "GROUP_RANK": "0",
                    "MASTER_ADDR": master_addr,
                    "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": str(threads),
                }
                env.update(user_env)
                if rank_env is not None:
                    env.update(rank_env[rank])
                stack_path = os.path.join(tmp, f"rank{rank}.stack") if _HAS_STACK_DUMP else None
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker,
                    args=(
                        fn,
                        rank,
                        world_size,
                        args,
                        port,
                        dist_backend,
                        timeout_s,
                        env,
                        writer,
                        stack_path,
                        None if netns is None else netns[rank],
                    ),
                    name=f"longmoe-rank{rank}",
                    daemon=False,
                )
                try:
                    proc.start()
                except Exception as exc:
                    raise TypeError(
                        f"{name}: could not start rank {rank} (are all args picklable?): {exc}"
                    ) from exc
                finally:
                    writer.close()
                procs.append(proc)
                readers.append(reader)
                stack_paths.append(stack_path)
            return _collect(name, procs, readers, stack_paths, deadline, timeout_s)
        finally:
            _stop(procs, list(range(len(procs))))
            for reader in readers:
                reader.close()


def _collect(
    name: str, procs: list, readers: list, stack_paths: list[str | None], deadline: float, timeout_s: float
) -> list[Any]:
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    pending = set(range(world_size))
    grace_deadline = math.inf

    def take_report(rank: int) -> None:
        try:
            report = pickle.loads(readers[rank].recv_bytes())
        except EOFError:
            procs[rank].join(1.0)
            failures[rank] = (
                f"rank {rank} {_describe_exit(procs[rank].exitcode)} without reporting a result "
                "(crashed or was killed)"
            )
        except Exception:
            failures[rank] = f"rank {rank}: its report could not be unpickled:\n{traceback.format_exc()}"
        else:
            if report[0] == "ok":
                results[rank] = report[1]
            else:
                _, phase, text = report
                where = {
                    "init": "while initialising the process group",
                    "run": "in fn",
                    "teardown": "while destroying the process group",
                    "result": "while pickling its result",
                }.get(phase, phase)
                failures[rank] = f"rank {rank} raised {where}:\n{text}"
        pending.discard(rank)

    while pending:
        now = time.monotonic()
        if failures:
            grace_deadline = min(grace_deadline, now + _FAILURE_GRACE_S)
        limit = min(deadline, grace_deadline)
        if now >= limit:
            break
        by_object = {}
        for r in pending:
            by_object[readers[r]] = r
            by_object[procs[r].sentinel] = r
        ready = _wait_ready(list(by_object), timeout=limit - now)
        for obj in ready:
            r = by_object[obj]
            # A rank that reported and exited makes both its pipe and its sentinel ready; the first one
            # seen reads the report. A process that died without reporting leaves its pipe at EOF.
            if r in pending:
                take_report(r)

    still_running = sorted(pending)
    if failures:
        order = list(failures)
        lines = [
            f"{name}: rank(s) {sorted(order)} failed (first failure: rank {order[0]})"
            + (
                f"; rank(s) {still_running} were still running {_FAILURE_GRACE_S:g} s later and were "
                "terminated"
                if still_running
                else ""
            )
        ]
        for r in order:
            lines.append(f"--- rank {r} ---\n{failures[r].rstrip()}")
        _stop(procs, still_running)
        raise SpawnError("\n".join(lines), failures, still_running)
    if still_running:
        stacks = _dump_stacks(procs, still_running, stack_paths)
        _stop(procs, still_running)
        done = sorted(results)
        raise TimeoutError(
            f"{name}: timed out after {timeout_s:g} s; rank(s) {still_running} were still running and were "
            f"killed (finished: {done})" + (f"\n{stacks}" if stacks else "")
        )
    # Every rank reported; let them exit on their own before the final cleanup kills stragglers.
    for proc in procs:
        proc.join(max(0.1, min(5.0, deadline - time.monotonic())))
    return [results[r] for r in range(world_size)]
