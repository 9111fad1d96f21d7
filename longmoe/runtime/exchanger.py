"""Point-to-point exchanger: ``send_recv`` -> ``commit`` -> ``wait``, with timeouts and byte accounting.

The communication pattern of ring-flash-attention's ``utils.py`` (``RingComm``), kept apart from the
math: a ring step queues its sends and receives, launches them together with one
``torch.distributed.batch_isend_irecv`` call (so the relative order of sends and receives cannot
deadlock), computes while they are in flight, then waits::

    ex = P2PExchanger(group, timeout_s=60.0)
    next_k = ex.send_recv(k, dst=(rank + 1) % P, src=(rank - 1) % P, step=i)
    ex.commit()
    ...  # attention on the current block
    ex.wait()  # next_k is valid from here on

Every wait has a deadline: a peer that never sends raises ``ExchangeTimeout`` naming this rank, the
peer, the step and the exchanger, instead of hanging the job. Bytes are counted per ring direction and
per peer, so a test or a benchmark can check which links carried what.

Ranks in this API are ranks *within the exchanger's group*; they are translated to global ranks for
``torch.distributed``. One exchanger drives one group; run two batches concurrently (TokenRing's
forward Q and returning partial outputs) on two exchangers over two groups
(``longmoe.runtime.distributed.new_group_like``).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import time

import torch
import torch.distributed as dist

__all__ = ["P2PExchanger", "ExchangeTimeout", "ExchangeError", "CommStats"]

# Backends phrase timeouts differently: gloo "Timed out waiting 2000ms for recv operation to complete",
# NCCL "... timed out ...". "Application timeout caused pair closure" (gloo, after an earlier timeout)
# is deliberately not matched: it reports a broken group, not a fresh timeout.
_TIMEOUT_RE = re.compile(r"timed out", re.IGNORECASE)
# c10d reads a zero timeout as "use the group's default", so a wait never asks for less than this.
_MIN_WAIT = datetime.timedelta(milliseconds=1)


class ExchangeTimeout(TimeoutError):
    """A committed exchange did not complete within ``timeout_s``.

    Attributes:
        rank: this process's rank in the exchanger's group.
        peers: group ranks of the operations that did not complete.
        steps: step labels of those operations.
        name: the exchanger's name.

    With gloo the connection to the peer is closed after a timeout (the group is unusable afterwards);
    NCCL aborts the communicator. Treat it as fatal for the job and tear the process group down.
    """

    def __init__(self, message: str, *, rank: int, peers: list[int], steps: list[int], name: str):
        super().__init__(message)
        self.rank = rank
        self.peers = peers
        self.steps = steps
        self.name = name


class ExchangeError(RuntimeError):
    """The communication backend reported an error while an exchange completed (peer crash, closed link).

    The message adds this rank, the peers, the step and the exchanger name to the backend's message;
    the backend's exception is chained as ``__cause__``.
    """


@dataclasses.dataclass(slots=True)
class _Op:
    kind: str  # "send" | "recv"
    tensor: torch.Tensor  # contiguous; kept referenced until wait() (the backend reads/writes it)
    peer: int  # group rank
    step: int
    direction: str

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def describe(self, who) -> str:
        if self.kind == "recv":
            return f"no data from {who(self.peer)}"
        return f"send to {who(self.peer)} not completed"


@dataclasses.dataclass(slots=True)
class CommStats:
    """Bytes one rank moved in one or more calls, by direction label ("next", "prev", "other"; see
    :class:`P2PExchanger`), for tests, benchmarks and logs. Pass one as ``stats=`` to a sequence-parallel
    function: the forward and the backward add to it when they finish. Local copies ("self") are left out."""

    bytes_sent: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_received: dict[str, int] = dataclasses.field(default_factory=dict)
    messages: int = 0

    def add(self, label: str, sent: int, received: int, messages: int = 1) -> None:
        if label == "self":
            return
        for counter, n in ((self.bytes_sent, sent), (self.bytes_received, received)):
            if n:
                counter[label] = counter.get(label, 0) + n
        self.messages += messages

    def add_exchanger(self, ex: P2PExchanger) -> None:
        """Add what ``ex`` counted (its counters are not reset)."""
        for label in set(ex.bytes_sent) | set(ex.bytes_received):
            self.add(label, ex.bytes_sent.get(label, 0), ex.bytes_received.get(label, 0), messages=0)
        self.messages += ex.messages_sent

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.messages = 0


class P2PExchanger:
    """Queues point-to-point sends/receives on one process group and runs them as batches.

    Args:
        group: the process group (``None``: the default group). This process must be a member.
        timeout_s: how long ``wait`` waits for a committed batch before raising ``ExchangeTimeout``.
        name: label in error messages (``"q-ring"``, ``"out-return"``, ...).

    Byte counters (updated when a batch completes in ``wait``; reset with ``reset_counters``):
        bytes_sent / bytes_received: per direction label. A label names the ring direction in which the
            data travels, so the sender and the receiver of one message count it under the same label:
            ``"next"`` (rank r -> r+1), ``"prev"`` (r -> r-1), ``"other"``, and ``"self"`` for local
            copies (a rank exchanging with itself, e.g. world size 1), which are not link traffic.
        bytes_sent_to / bytes_received_from: per peer group rank, link traffic only (no ``"self"``).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout_s: float = 60.0, name: str = "p2p"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"P2PExchanger(name={name!r}): the default process group is not initialised; call "
                "longmoe.runtime.init_from_env() first "
                "(launch with torchrun or longmoe.runtime.launcher.spawn)"
            )
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(
                f"P2PExchanger(timeout_s={timeout_s!r}): expected a finite number of seconds > 0"
            )
        self.group = group
        self.name = name
        self._tag = f"P2PExchanger({name!r})"
        self.timeout_s = float(timeout_s)
        resolved = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(resolved)
        if self.rank < 0:
            raise ValueError(
                f"P2PExchanger(name={name!r}): global rank {dist.get_rank()} is not a member of the "
                "given group"
            )
        self.world_size = dist.get_world_size(resolved)
        self._global_ranks = tuple(dist.get_global_rank(resolved, r) for r in range(self.world_size))
        self._queued: list[_Op] = []
        self._inflight: list[_Op] | None = None
        self._works: list[tuple[dist.Work, list[_Op]]] = []
        self._commits = 0
        self.reset_counters()

    # ------------------------------------------------------------------ accounting
    def reset_counters(self) -> None:
        """Zero ``bytes_sent``, ``bytes_received``, ``bytes_sent_to``, ``bytes_received_from`` and
        ``messages_sent`` (link messages, local copies excluded)."""
        self.bytes_sent: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent_to: dict[int, int] = {}
        self.bytes_received_from: dict[int, int] = {}
        self.messages_sent = 0

    @property
    def in_flight(self) -> bool:
        """True between ``commit`` and the end of ``wait``."""
        return self._inflight is not None

    @property
    def num_queued(self) -> int:
        """Operations queued for the next ``commit``."""
        return len(self._queued)

    # ------------------------------------------------------------------ queueing
    def _check_peer(self, peer: int, what: str) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise ValueError(f"{self._tag}.{what}={peer!r}: expected a group rank in [0, {self.world_size})")
        return peer

    def _check_tensor(self, tensor: torch.Tensor, what: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self._tag}.{what}: expected a torch.Tensor, got {type(tensor).__name__}")

    def _label(self, peer: int, direction: str | None, *, outgoing: bool) -> str:
        if direction is not None:
            if not isinstance(direction, str) or not direction:
                raise ValueError(f"{self._tag}: direction={direction!r}: expected a non-empty str")
            return direction
        if peer == self.rank:
            return "self"
        forward = (self.rank + 1) % self.world_size if outgoing else (self.rank - 1) % self.world_size
        backward = (self.rank - 1) % self.world_size if outgoing else (self.rank + 1) % self.world_size
        if peer == forward:  # with 2 ranks the peer is both; "next" unless the caller says otherwise
            return "next"
        if peer == backward:
            return "prev"
        return "other"

    def _step(self, step: int | None) -> int:
        if step is None:
            return self._commits
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"{self._tag}: step={step!r}: expected an int or None")
        return step

    def send(
        self, tensor: torch.Tensor, dst: int, *, step: int | None = None, direction: str | None = None
    ) -> None:
        """Queue sending ``tensor`` to group rank ``dst`` (a contiguous copy is made if needed).

        ``tensor`` must not be modified until ``wait`` returns.
        """
        self._check_tensor(tensor, "send(tensor)")
        dst = self._check_peer(dst, "send(dst)")
        label = self._label(dst, direction, outgoing=True)
        self._queued.append(_Op("send", tensor.contiguous(), dst, self._step(step), label))

    def recv(
        self, buffer: torch.Tensor, src: int, *, step: int | None = None, direction: str | None = None
    ) -> torch.Tensor:
        """Queue receiving into ``buffer`` (contiguous) from group rank ``src``; return ``buffer``.

        The contents are valid after ``wait``. The sender's tensor must have the same number of
        elements and dtype.
        """
        self._check_tensor(buffer, "recv(buffer)")
        src = self._check_peer(src, "recv(src)")
        if not buffer.is_contiguous():
            raise ValueError(
                f"{self._tag}.recv(buffer): the receive buffer must be contiguous "
                f"(shape {tuple(buffer.shape)}, stride {buffer.stride()})"
            )
        label = self._label(src, direction, outgoing=False)
        self._queued.append(_Op("recv", buffer, src, self._step(step), label))
        return buffer

    def send_recv(
        self,
        send: torch.Tensor,
        dst: int,
        src: int,
        recv: torch.Tensor | None = None,
        *,
        step: int | None = None,
        direction: str | None = None,
    ) -> torch.Tensor:
        """Queue sending ``send`` to group rank ``dst`` and receiving a same-shaped tensor from ``src``.

        Args:
            send: any shape; a contiguous copy is made if it is not contiguous.
            dst: group rank to send to.
            src: group rank to receive from.
            recv: receive buffer (contiguous, same shape, dtype and device as ``send``, not overlapping
                it); default: a new empty tensor.
            step: label for error messages (default: the index of the commit this op will be part of).
            direction: byte-accounting label for both the send and the receive; default ``"next"`` when
                ``dst`` is the next rank, ``"prev"`` when it is the previous one, ``"self"`` when it is
                this rank, else ``"other"``.

        Returns:
            The receive buffer; its contents are valid after ``wait``.
        """
        self._check_tensor(send, "send_recv(send)")
        dst = self._check_peer(dst, "send_recv(dst)")
        src = self._check_peer(src, "send_recv(src)")
        send = send.contiguous()
        if recv is None:
            recv = torch.empty(send.shape, dtype=send.dtype, device=send.device)
        else:
            self._check_tensor(recv, "send_recv(recv)")
            if recv.shape != send.shape or recv.dtype != send.dtype or recv.device != send.device:
                raise ValueError(
                    f"{self._tag}.send_recv: recv buffer is {tuple(recv.shape)} {recv.dtype} on "
                    f"{recv.device}; expected {tuple(send.shape)} {send.dtype} on {send.device} like send"
                )
            if not recv.is_contiguous():
                raise ValueError(
                    f"{self._tag}.send_recv: recv buffer must be contiguous "
                    f"(shape {tuple(recv.shape)}, stride {recv.stride()})"
                )
            if _overlap(send, recv):
                raise ValueError(
                    f"{self._tag}.send_recv: recv buffer overlaps the send tensor in memory; "
                    "receive into a separate buffer"
                )
        label = self._label(dst, direction, outgoing=True)
        step_label = self._step(step)
        self._queued.append(_Op("send", send, dst, step_label, label))
        self._queued.append(_Op("recv", recv, src, step_label, label))
        return recv

    # ------------------------------------------------------------------ launching
    def commit(self) -> None:
        """Launch every queued operation with one ``batch_isend_irecv`` call.

        Exchanges with this rank itself are done here as local copies (gloo cannot send to its own rank):
        the k-th queued self-send fills the k-th queued self-receive.
        """
        if self._inflight is not None:
            raise RuntimeError(
                f"{self._tag}.commit(): the previous batch (step {self._inflight[0].step}) "
                "was committed but not waited for; call wait() first, or use a second exchanger on a "
                "second group (new_group_like) to keep two batches in flight"
            )
        if not self._queued:
            raise RuntimeError(f"{self._tag}.commit(): nothing queued; call send_recv/send/recv first")
        ops = self._queued

        self_sends = [op for op in ops if op.peer == self.rank and op.kind == "send"]
        self_recvs = [op for op in ops if op.peer == self.rank and op.kind == "recv"]
        if len(self_sends) != len(self_recvs):
            raise RuntimeError(
                f"{self._tag}.commit(): rank {self.rank} queued {len(self_sends)} send(s) "
                f"and {len(self_recvs)} receive(s) with itself; they must pair up"
            )
        for s, r in zip(self_sends, self_recvs, strict=True):
            if s.tensor.numel() != r.tensor.numel() or s.tensor.dtype != r.tensor.dtype:
                raise ValueError(
                    f"{self._tag}.commit(): step {s.step}: self-exchange of "
                    f"{tuple(s.tensor.shape)} {s.tensor.dtype} into {tuple(r.tensor.shape)} {r.tensor.dtype}"
                )
        # Validated: from here on the queue belongs to this batch.
        self._queued = []
        for s, r in zip(self_sends, self_recvs, strict=True):
            r.tensor.view(-1).copy_(s.tensor.view(-1))

        # Receives first: gloo then has every receive posted before the sends start, and concurrent sends to
        # two peers run side by side (sends posted first: often one after the other, ~2x the time).
        remote = [op for op in ops if op.peer != self.rank and op.kind == "recv"]
        remote += [op for op in ops if op.peer != self.rank and op.kind == "send"]
        works: list[tuple[dist.Work, list[_Op]]] = []
        if remote:
            p2p_ops = [
                dist.P2POp(
                    dist.isend if op.kind == "send" else dist.irecv,
                    op.tensor,
                    self._global_ranks[op.peer],
                    self.group,
                )
                for op in remote
            ]
            try:
                reqs = dist.batch_isend_irecv(p2p_ops)
            except Exception as exc:
                raise self._error(remote, "launching the batch failed", exc) from exc
            if len(reqs) == len(remote):  # gloo: one Work per op
                works = [(w, [op]) for w, op in zip(reqs, remote, strict=True)]
            else:  # NCCL coalesces the batch into one Work; it covers every op
                works = [(w, remote) for w in reqs]
        self._inflight = ops
        self._works = works
        self._commits += 1

    def wait(self) -> None:
        """Wait for the committed batch; afterwards every receive buffer holds its data.

        Raises:
            ExchangeTimeout: the batch did not complete within ``timeout_s`` (counted from this call).
            ExchangeError: the backend reported an error (for example a peer process died).
        """
        if self._inflight is None:
            raise RuntimeError(f"{self._tag}.wait(): nothing committed; call commit() first")
        ops, works = self._inflight, self._works
        self._inflight, self._works = None, []
        deadline = time.monotonic() + self.timeout_s
        for work, work_ops in works:
            # gloo honours Work.wait(timeout) (checked on torch 2.13): it raises "Timed out waiting
            # 2000ms for recv operation to complete" and closes the connection to that peer. NCCL, given
            # an explicit timeout, blocks the CPU until the work is done or raises "... timed out ...".
            remaining = datetime.timedelta(seconds=max(0.0, deadline - time.monotonic()))
            try:
                done = work.wait(timeout=max(remaining, _MIN_WAIT))
            except Exception as exc:
                if _TIMEOUT_RE.search(str(exc)) or time.monotonic() >= deadline:
                    raise self._timeout(work_ops) from exc
                raise self._error(work_ops, "the backend reported an error", exc) from exc
            if done is False:  # some backends report a timeout by returning False
                raise self._timeout(work_ops)
        for op in ops:
            if op.kind == "send":
                by_label, by_peer = self.bytes_sent, self.bytes_sent_to
            else:
                by_label, by_peer = self.bytes_received, self.bytes_received_from
            by_label[op.direction] = by_label.get(op.direction, 0) + op.nbytes
            if op.peer != self.rank:  # local copies are not link traffic
                by_peer[op.peer] = by_peer.get(op.peer, 0) + op.nbytes
                self.messages_sent += op.kind == "send"

    # ------------------------------------------------------------------ errors
    def _who(self, group_rank: int) -> str:
        g = self._global_ranks[group_rank]
        return f"rank {group_rank}" if g == group_rank else f"rank {group_rank} (global {g})"

    def _describe(self, ops: list[_Op]) -> str:
        by_step: dict[int, list[str]] = {}
        for op in ops:
            by_step.setdefault(op.step, []).append(op.describe(self._who))
        return "; ".join(f"step {step}: {', '.join(parts)}" for step, parts in by_step.items())

    def _timeout(self, ops: list[_Op]) -> ExchangeTimeout:
        return ExchangeTimeout(
            f"{self._who(self.rank)} ({self.name}): {self._describe(ops)} within {self.timeout_s} s "
            "(the peer crashed, is stalled, or did not post the matching send/recv; the process group "
            "cannot be used after this)",
            rank=self.rank,
            peers=sorted({op.peer for op in ops}),
            steps=sorted({op.step for op in ops}),
            name=self.name,
        )

    def _error(self, ops: list[_Op], what: str, exc: BaseException) -> ExchangeError:
        peers = ", ".join(
            f"send to {self._who(op.peer)}" if op.kind == "send" else f"recv from {self._who(op.peer)}"
            for op in ops
        )
        steps = sorted({op.step for op in ops})
        return ExchangeError(
            f"{self._who(self.rank)} ({self.name}): step {', '.join(map(str, steps))}: {what} ({peers}): "
            f"{type(exc).__name__}: {exc}"
        )

    def __repr__(self) -> str:
        state = "in flight" if self.in_flight else "idle"
        return (
            f"P2PExchanger(name={self.name!r}, rank={self.rank}, world_size={self.world_size}, "
            f"timeout_s={self.timeout_s}, {state}, queued={len(self._queued)})"
        )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two contiguous tensors share bytes of the same storage."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
