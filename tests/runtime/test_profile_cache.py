"""The on-disk profile cache: storage (round trip, atomic writes, corrupt and foreign entries, where it
lives, off switch) and its use by measure_topology / profile_compute across processes."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from longmoe.runtime import spawn
from longmoe.runtime.profile_cache import ProfileCache, cache_dir, machine_fingerprint


def test_round_trip_and_keys(tmp_path):
    c = ProfileCache(tmp_path)
    key = {"shape": [1, 2, 3], "dtype": "torch.float32"}
    assert c.get("kernel_calls", key) is None
    c.put("kernel_calls", key, {"t": 1.5})
    assert c.get("kernel_calls", key) == {"t": 1.5}
    assert c.get("kernel_calls", {**key, "dtype": "torch.bfloat16"}) is None  # another key: a miss
    assert c.get("topology", key) is None  # another kind
    assert len(list(tmp_path.glob("kernel_calls/*.json"))) == 1
    c.clear()
    assert c.get("kernel_calls", key) is None


def test_corrupt_and_foreign_entries_are_misses(tmp_path):
    c = ProfileCache(tmp_path)
    key = {"a": 1}
    c.put("topology", key, {"v": 1})
    (path,) = tmp_path.glob("topology/*.json")
    path.write_text('{"format": 1, "key": {"a"')  # torn write
    assert c.get("topology", key) is None and not path.exists()
    path.write_text(json.dumps({"format": 1, "key": {"a": 2}, "value": {"v": 9}}))  # same file, other key
    assert c.get("topology", key) is None
    path.write_text(json.dumps({"format": 99, "key": key, "value": {"v": 9}}))
    assert c.get("topology", key) is None


def test_bad_arguments(tmp_path):
    c = ProfileCache(tmp_path)
    with pytest.raises(ValueError, match=r"kind='../x' is not a plain name"):
        c.put("../x", {}, {})
    with pytest.raises(TypeError, match=r"\['obj'\] are not JSON-serialisable"):
        c.get("topology", {"ok": 1, "obj": object()})


def test_where_it_lives(monkeypatch, tmp_path):
    for var in ("LONGMOE_CACHE_DIR", "XDG_CACHE_HOME", "LONGMOE_PROFILE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "longmoe"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "longmoe"
    monkeypatch.setenv("LONGMOE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("LONGMOE_PROFILE_CACHE", "off")
    assert cache_dir() is None and not ProfileCache().enabled
    ProfileCache().put("topology", {"a": 1}, {"v": 1})  # a no-op
    assert ProfileCache().get("topology", {"a": 1}) is None and not (tmp_path / "mine").exists()


def _writer(directory, i):
    c = ProfileCache(directory)
    for j in range(20):
        c.put("topology", {"k": 1}, {"writer": i, "j": j, "pad": "x" * 50_000})


def test_concurrent_writers_never_tear_an_entry(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i)) for i in range(4)]
    for p in procs:
        p.start()
    c, seen = ProfileCache(tmp_path), 0
    while any(p.is_alive() for p in procs):
        v = c.get("topology", {"k": 1})
        if v is not None:
            assert set(v) == {"writer", "j", "pad"} and len(v["pad"]) == 50_000
            seen += 1
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert c.get("topology", {"k": 1})["j"] == 19
    assert not list(tmp_path.glob("topology/.tmp-*"))


def test_fingerprint_on_cpu_does_not_touch_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("touched CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_name", boom)
    fp = machine_fingerprint("cpu")
    assert fp["torch"] == torch.__version__ and fp["device"] == "cpu" and fp["host"]
    assert "device_name" not in fp


def _profile_twice(rank, world, cache):
    import os

    from longmoe.parallel import AttentionShape, measure_topology, profile_compute
    from longmoe.parallel import measure as m

    os.environ["LONGMOE_CACHE_DIR"] = cache
    shape = AttentionShape(world_size=world, batch=1, seqlen_local=64, heads_q=4, heads_kv=2, head_dim=32,
                           dtype=torch.float32)  # fmt: skip
    topo = measure_topology(nbytes=1 << 16, repeats=1)
    prof = profile_compute(shape)
    m._MEASURED.clear()  # as a new process would start: nothing in memory
    m._PROFILES.clear()
    topo2 = measure_topology(nbytes=1 << 16, repeats=1)
    prof2 = profile_compute(shape)
    return (
        topo.notes["from_cache"],
        topo2.notes["from_cache"],
        topo2.link_bandwidth == topo.link_bandwidth,
        (
            prof2.calls == prof.calls
            and prof2.alltoall == prof.alltoall
            and prof2.merge_per_row == prof.merge_per_row
        ),
    )


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_measurements_are_reused_from_disk(tmp_path):
    """The second lookup (memory cleared, as in a new process) gets every rank the first one's numbers."""
    res = spawn(_profile_twice, 2, str(tmp_path), timeout_s=100)
    assert res == [(False, True, True, True)] * 2, res
    assert (
        len(list(tmp_path.glob("topology/*.json"))) == 1
        and len(list(tmp_path.glob("kernel_calls/*.json"))) == 1
    )
