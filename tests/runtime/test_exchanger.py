"""P2PExchanger and the launcher on real gloo processes (``longmoe.runtime.launcher.spawn``).

Every rank asserts; a failing assertion in a rank makes ``spawn`` raise with that rank's traceback.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longmoe.runtime import (
    ExchangeTimeout,
    P2PExchanger,
    SpawnError,
    default_dist_backend_for,
    init_from_env,
    new_group_like,
    spawn,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _payload(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors per rank with distinct values, dtypes and sizes (fp64 activations, int32 indices)."""
    x = torch.arange(2 * 5 * 3 * 4, dtype=torch.float64).reshape(2, 5, 3, 4) + 1000.0 * rank
    idx = torch.arange(7, dtype=torch.int32) * (rank + 1)
    return x, idx


# ---------------------------------------------------------------------------------------------- rank bodies
def _ring_fn(rank: int, world_size: int) -> dict:
    """Pass two tensors once around the ring: after P steps every rank holds its own tensors again."""
    ex = P2PExchanger(timeout_s=30.0, name="ring")
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    x, idx = _payload(rank)
    cur_x, cur_idx = x.transpose(1, 2), idx  # non-contiguous send: the exchanger copies it
    for step in range(world_size):
        got_x = ex.send_recv(cur_x, dst=nxt, src=prv, step=step)
        got_idx = ex.send_recv(cur_idx, dst=nxt, src=prv, step=step)
        ex.commit()
        ex.wait()
        owner = (rank - step - 1) % world_size  # whose tensors arrived in this step
        want_x, want_idx = _payload(owner)
        assert torch.equal(got_x, want_x.transpose(1, 2)), f"rank {rank} step {step}: wrong x"
        assert torch.equal(got_idx, want_idx), f"rank {rank} step {step}: wrong idx"
        cur_x, cur_idx = got_x, got_idx
    assert torch.equal(cur_x, x.transpose(1, 2)) and torch.equal(cur_idx, idx)

    per_step = _nbytes(x) + _nbytes(idx)
    total = world_size * per_step
    if world_size == 1:  # a local copy, not link traffic
        assert ex.bytes_sent == {"self": total}, ex.bytes_sent
        assert ex.bytes_received == {"self": total}, ex.bytes_received
        assert ex.bytes_sent_to == {} and ex.bytes_received_from == {}
    else:
        assert ex.bytes_sent == {"next": total}, ex.bytes_sent
        assert ex.bytes_received == {"next": total}, ex.bytes_received
        assert ex.bytes_sent_to == {nxt: total}, ex.bytes_sent_to
        assert ex.bytes_received_from == {prv: total}, ex.bytes_received_from
    ex.reset_counters()
    assert ex.bytes_sent == {} and ex.bytes_received == {}
    return {"rank": rank, "sent": total}


def _bidirectional_fn(rank: int, world_size: int) -> None:
    """Both directions of every link at once, as TokenRing does: two exchangers on two groups."""
    # spawn(dist_backend=None): the rank initialises the group itself from the torchrun environment.
    assert not dist.is_initialized()
    assert init_from_env(device="cpu", timeout_s=60.0) == (rank, world_size)
    assert dist.get_backend() == "gloo"
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size

    fwd = P2PExchanger(timeout_s=30.0, name="q-forward")
    bwd = P2PExchanger(new_group_like(None), timeout_s=30.0, name="out-return")
    q, _ = _payload(rank)
    out = torch.full((3, 11), float(rank), dtype=torch.float32)
    # With 2 ranks next == prev, so the label is given; with more it is derived from dst.
    back_label = "prev" if world_size == 2 else None
    got_q = fwd.send_recv(q, dst=nxt, src=prv, step=0)
    got_out = bwd.send_recv(out, dst=prv, src=nxt, step=0, direction=back_label)
    fwd.commit()
    bwd.commit()  # both batches in flight at once
    bwd.wait()
    fwd.wait()
    assert torch.equal(got_q, _payload(prv)[0])
    assert torch.equal(got_out, torch.full((3, 11), float(nxt)))
    assert fwd.bytes_sent == {"next": _nbytes(q)} and fwd.bytes_received == {"next": _nbytes(q)}
    assert bwd.bytes_sent == {"prev": _nbytes(out)} and bwd.bytes_received == {"prev": _nbytes(out)}
    assert fwd.bytes_sent_to == {nxt: _nbytes(q)} and bwd.bytes_sent_to == {prv: _nbytes(out)}
    assert bwd.bytes_received_from == {nxt: _nbytes(out)}

    # Both directions in one commit on one exchanger.
    fwd.reset_counters()
    a = fwd.send_recv(torch.full((5,), rank, dtype=torch.int64), dst=nxt, src=prv, step=1)
    b = fwd.send_recv(
        torch.full((9,), rank, dtype=torch.int16), dst=prv, src=nxt, step=1, direction=back_label
    )
    fwd.commit()
    fwd.wait()
    assert torch.equal(a, torch.full((5,), prv, dtype=torch.int64))
    assert torch.equal(b, torch.full((9,), nxt, dtype=torch.int16))
    assert fwd.bytes_sent == {"next": 5 * 8, "prev": 9 * 2}, fwd.bytes_sent
    assert fwd.bytes_received == {"next": 5 * 8, "prev": 9 * 2}, fwd.bytes_received

    # A group whose ranks differ from the global ones: the API speaks group ranks.
    if world_size >= 3:
        members = [world_size - 2, world_size - 1]
        sub = dist.new_group(members)  # collective over the default group: every rank calls it
        if rank in members:
            ex = P2PExchanger(sub, timeout_s=30.0, name="sub")
            me, peer = ex.rank, 1 - ex.rank
            assert me == members.index(rank)
            got = ex.send_recv(torch.tensor([rank], dtype=torch.float32), dst=peer, src=peer, step=0)
            ex.commit()
            ex.wait()
            assert got.item() == members[peer]
            assert ex.bytes_sent_to == {peer: 4} and ex.bytes_received_from == {peer: 4}


def _stalled_fn(rank: int, world_size: int, done: mp.Event) -> str | None:
    """Rank 0 never sends; rank 1 must time out with a message naming itself, the step and the peer."""
    if rank == 0:
        # Stay alive (no sends) until rank 1 has seen its timeout, so that it is a timeout and not a
        # closed connection; the event bounds the wait so this rank cannot hang either.
        assert done.wait(timeout=60.0), "rank 1 never reported its timeout"
        return None
    ex = P2PExchanger(timeout_s=2.0, name="stall")
    ex.recv(torch.empty(4), src=0, step=3)
    ex.commit()
    start = time.monotonic()
    try:
        ex.wait()
    except ExchangeTimeout as err:
        elapsed = time.monotonic() - start
        msg = str(err)
        assert "rank 1" in msg and "step 3" in msg and "rank 0" in msg and "stall" in msg, msg
        assert err.peers == [0] and err.steps == [3] and err.rank == 1 and err.name == "stall"
        assert 1.5 <= elapsed <= 15.0, f"timed out after {elapsed:.1f} s, expected about 2 s"
        assert not ex.in_flight
        return msg
    finally:
        done.set()
    raise AssertionError("wait() returned although rank 0 never sent anything")


def _raise_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def _sleep_forever_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(1000)
    return rank


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_exchange(world_size):
    results = spawn(_ring_fn, world_size, timeout_s=90.0)
    assert [r["rank"] for r in results] == list(range(world_size))


def test_bidirectional_exchange_on_two_groups():
    spawn(_bidirectional_fn, 3, dist_backend=None, timeout_s=90.0)


def test_stalled_peer_raises_exchange_timeout():
    done = mp.get_context("spawn").Event()
    start = time.monotonic()
    results = spawn(_stalled_fn, 2, done, timeout_s=60.0)
    assert results[0] is None and "no data from rank 0 within 2.0 s" in results[1]
    assert time.monotonic() - start < 45.0


def test_spawn_reraises_rank_exception_with_rank_and_traceback():
    with pytest.raises(SpawnError, match=r"rank\(s\) \[1\] failed") as info:
        spawn(_raise_on_rank_1, 2, timeout_s=60.0)
    assert set(info.value.failures) == {1}
    text = str(info.value)
    assert "ValueError: deliberate failure on rank 1" in text and "_raise_on_rank_1" in text


def test_spawn_timeout_kills_running_ranks():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] were still running") as info:
        spawn(_sleep_forever_on_rank_1, 2, timeout_s=8.0)
    assert not isinstance(info.value, SpawnError)
    assert time.monotonic() - start < 20.0
    assert "_sleep_forever_on_rank_1" in str(info.value)  # the stack dump shows where it was stuck


def test_argument_errors_without_processes(monkeypatch):
    assert (
        default_dist_backend_for("cpu") == "gloo"
        and default_dist_backend_for(torch.device("cuda", 1)) == "nccl"
    )
    with pytest.raises(ValueError, match="meta"):
        default_dist_backend_for("meta")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE.*launch with torchrun or longmoe\.runtime\.launcher"):
        init_from_env()
    with pytest.raises(RuntimeError, match="init_from_env"):
        P2PExchanger()
    with pytest.raises(TypeError, match="module-level"):
        spawn(lambda rank, world_size: None, 1)
    with pytest.raises(ValueError, match="world_size=0"):
        spawn(_raise_on_rank_1, 0)
