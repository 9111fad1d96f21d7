"""runtime.collectives and the group helpers: the one autograd all-to-all, the bounded cross-rank check,
and the device every collective's tensors are put on (CUDA for NCCL, CPU for gloo), checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from longmoe.runtime import (
    CollectiveError,
    all_to_all,
    check_same_across_ranks,
    collectives,
    distributed,
    group_device,
    ring_direction,
    spawn,
    world_and_rank,
)


def test_group_device_follows_the_backend(monkeypatch):
    assert group_device(None) == torch.device("cpu")  # no process group: CPU
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(distributed.torch.accelerator, "current_device_index", lambda: 3)
    for backend, want in (("gloo", "cpu"), ("nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cpu")):
        monkeypatch.setattr(distributed.dist, "get_backend", lambda g=None, b=backend: b)
        assert group_device(None) == torch.device(want), backend
    monkeypatch.setattr(distributed.torch.accelerator, "current_accelerator", lambda: None)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda g=None: "nccl")
    with pytest.raises(RuntimeError, match="'nccl' but this process has no accelerator"):
        group_device(None)


def test_cross_rank_check_puts_its_tensors_on_the_group_device(monkeypatch):
    """Under NCCL the metadata all-gather must use CUDA tensors: the check asks group_device, never
    hard-codes the CPU. A stand-in device ("meta") and a recording all_gather show which it used."""
    seen = []

    class Recorded(Exception):  # stops the check once the collective's tensors are seen
        pass

    def fake_all_gather(outs, t, group=None, async_op=False):
        seen.append((t.device, [o.device for o in outs]))
        raise Recorded

    monkeypatch.setattr(collectives, "group_device", lambda g: torch.device("meta"))
    monkeypatch.setattr(collectives, "world_and_rank", lambda g: (2, 0))
    monkeypatch.setattr(collectives.dist, "all_gather", fake_all_gather)
    with pytest.raises(Recorded):
        check_same_across_ranks({"a": 1}, None, what="x", timeout_s=1.0)
    meta = torch.device("meta")
    assert seen == [(meta, [meta, meta])]


def test_ring_direction_labels():
    assert [ring_direction(o, 4) for o in range(1, 4)] == ["next", "other", "prev"]
    assert [ring_direction(o, 2) for o in (1, 3)] == ["next", "next"]


def test_single_process_is_world_one():
    assert world_and_rank(None) == (1, 0)
    x = torch.randn(4, 3, requires_grad=True)
    assert all_to_all(x) is x  # nothing to exchange
    check_same_across_ranks({"a": 1}, None, what="x")  # nothing to compare


@pytest.mark.parametrize(
    "bad", [dict(output_splits=[1], input_splits=None), dict(output_splits=[1, 2], input_splits=[3])]
)
def test_all_to_all_bad_splits(bad):
    with pytest.raises(ValueError, match="splits"):
        all_to_all(torch.zeros(3, 2), **bad)


def _exchange(rank, world):
    g = torch.Generator().manual_seed(rank)
    # equal slices: slice r goes to rank r, with autograd (the backward is the reverse exchange)
    x = torch.randn(world * 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = all_to_all(x)
    everyone = [torch.randn(world * 2, 3, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                for r in range(world)]  # fmt: skip
    want = torch.cat([e[2 * rank : 2 * rank + 2] for e in everyone])
    assert torch.equal(y.detach(), want), f"rank {rank}"
    (y * (rank + 1)).sum().backward()
    grad_want = torch.cat([torch.full((2, 3), float(r + 1), dtype=torch.float64) for r in range(world)])
    assert torch.equal(x.grad, grad_want), f"rank {rank}"
    # variable splits: rank r sends r + 1 rows to every rank (one may be empty at rank 0 of a 1-row split)
    rows = torch.full((world * (rank + 1), 2), float(rank))
    out = all_to_all(rows, [r + 1 for r in range(world)], [rank + 1] * world, what="test rows")
    assert out.tolist() == [[float(r)] * 2 for r in range(world) for _ in range(r + 1)], f"rank {rank}"
    # a disagreeing rank is named, on every rank
    try:
        check_same_across_ranks({"heads": 4 if rank else 8, "batch": 2}, None, what="inputs", timeout_s=30)
    except ValueError as exc:
        assert "heads is" in str(exc) and "on rank" in str(exc), exc
    else:
        raise AssertionError(f"rank {rank}: a mismatch was not caught")
    return "ok"


@pytest.mark.distributed
def test_all_to_all_and_check_on_three_ranks():
    assert spawn(_exchange, 3, timeout_s=120) == ["ok"] * 3


def _missing_peer(rank, world):
    if rank == 1:
        import time

        time.sleep(8)  # never joins the check
        return "late"
    try:
        check_same_across_ranks({"a": 1}, None, what="inputs", timeout_s=2.0)
    except CollectiveError as exc:
        assert f"rank {rank}" in str(exc) and "within 2.0 s" in str(exc), exc
        return "raised"
    raise AssertionError(f"rank {rank}: a missing peer was not detected")


@pytest.mark.distributed
def test_cross_rank_check_is_bounded_by_its_timeout():
    assert spawn(_missing_peer, 2, timeout_s=60) == ["raised", "late"]
