"""Emulated clusters on one machine: P ranks, each in its own Linux network namespace, joined by veth links
whose every direction has a kernel-enforced rate (tc ``tbf``) and, where ``sch_netem`` exists, a delay.

Topologies (``topology=``):

* ``"ring"``: a point-to-point link between neighbours only; every namespace forwards IP, and traffic to a
  non-neighbour takes the shorter way round, crossing the intermediate ranks' links (a PCIe/NVLink ring).
* ``"full_mesh"``: one link per pair of ranks (NVSwitch-like).
* ``"switch"``: one NIC per rank into a bridge in a separate namespace (a rack with a top-of-rack switch);
  the rank's NIC shapes its uplink, the bridge port shapes the downlink.
* ``"two_nodes"``: ranks ``[0, ceil(P/2))`` and the rest on two bridges (fast links, ``rate``) joined by
  one slow shared link (``inter_rate``) in each direction.

Every name is unique (``lm<pid><random>``), so two runs at once never collide; the addresses come from a
private /24 inside 10.0.0.0/8 that overlaps no address or route of the machine (and lives only inside the
namespaces). Teardown deletes the namespaces, which removes their veths and qdiscs with them; it runs on
``__exit__`` (errors included), on SIGTERM/SIGINT (turned into exceptions while the cluster is open) and
at interpreter exit. :meth:`EmulatedCluster.leftovers` lists what is still there, for the tests.

Ranks run inside the namespaces through ``launcher.spawn(netns=...)`` (:meth:`EmulatedCluster.spawn`), with
gloo over TCP: ``MASTER_ADDR`` is rank 0's address and ``GLOO_SOCKET_IFNAME`` the interface that carries
each rank's address. The command line is torchrun-like::

    python -m longmoe.runtime.netem --topology ring --world-size 3 --rate 800mbit -- script.py args

Needs CAP_NET_ADMIN (root); :func:`netns_unavailable_reason` says in one line why not, else ``None``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "TOPOLOGIES",
    "EmulatedCluster",
    "LinkDirection",
    "goodput",
    "read_tx_bytes",
    "wire_rate",
    "netem_delay_available",
    "netns_unavailable_reason",
    "parse_rate",
]

Topology = Literal["ring", "full_mesh", "switch", "two_nodes"]
TOPOLOGIES: tuple[str, ...] = ("ring", "full_mesh", "switch", "two_nodes")

_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}  # tc's spelling: "bps" is bytes per second


def parse_rate(rate: str | float) -> float:
    """A tc rate (``"800mbit"``, ``"1gbit"``, ``"100mbps"`` = bytes/s) or a number of bit/s -> bit/s."""
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(rate))
        if m is None or m.group(2).lower() not in _RATE_UNITS:
            raise ValueError(
                f"rate={rate!r}: expected a number and one of {sorted(_RATE_UNITS)}, e.g. '800mbit'"
            )
        value = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"rate={rate!r}: expected a positive rate")
    return value


def _parse_delay_ms(delay: str | float) -> float:
    if isinstance(delay, (int, float)) and not isinstance(delay, bool):
        value = float(delay)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*", str(delay))
        if m is None:
            raise ValueError(f"delay={delay!r}: expected e.g. '0.1ms', '50us' or a number of milliseconds")
        value = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, None: 1.0}[m.group(2)]
    if value < 0:
        raise ValueError(f"delay={delay!r}: expected >= 0")
    return value


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_unavailable_reason() -> str | None:
    """``None`` when network namespaces, veth pairs and tbf can be made here; else one line saying why."""
    name = f"lmprobe{os.getpid()}{random.randrange(16**6):06x}"
    try:
        proc = _run(["ip", "netns", "add", name], check=False)
    except FileNotFoundError:
        return "network emulation unavailable: the `ip` command (iproute2) is not installed"
    if proc.returncode != 0:
        return (
            f"network emulation unavailable: `ip netns add` failed ({proc.stderr.strip()}); it needs root or "
            "CAP_NET_ADMIN"
        )
    try:
        for cmd in (
            ["ip", "-n", name, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"],
            [
                "tc",
                "-n",
                name,
                "qdisc",
                "add",
                "dev",
                "pa",
                "root",
                "tbf",
                "rate",
                "1gbit",
                "burst",
                "64kb",
                "latency",
                "10ms",
            ],
        ):
            p = _run(cmd, check=False)
            if p.returncode != 0:
                return f"network emulation unavailable: `{' '.join(cmd)}` failed: {p.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", name], check=False)
    return None


_NETEM_OK: bool | None = None


def netem_delay_available() -> bool:
    """Whether this kernel has ``sch_netem`` (link delay); the rate limit (tbf) does not need it."""
    global _NETEM_OK
    if _NETEM_OK is None:
        name = f"lmprobe{os.getpid()}{random.randrange(16**6):06x}"
        if _run(["ip", "netns", "add", name], check=False).returncode != 0:
            _NETEM_OK = False
            return False
        try:
            _run(
                ["ip", "-n", name, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"],
                check=False,
            )
            p = _run(
                ["tc", "-n", name, "qdisc", "add", "dev", "pa", "root", "netem", "delay", "1ms"], check=False
            )
            _NETEM_OK = p.returncode == 0
        finally:
            _run(["ip", "netns", "del", name], check=False)
    return _NETEM_OK


def _pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 inside 10.0.0.0/8 that overlaps no address or route of this machine."""
    used: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        with contextlib.suppress(Exception):
            for token in _run(cmd, check=False).stdout.split():
                with contextlib.suppress(ValueError):
                    if "/" in token or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", token):
                        used.append(ipaddress.ip_network(token, strict=False))
    for _ in range(1000):
        net = ipaddress.ip_network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 inside 10.0.0.0/8 for the emulated cluster (every one tried overlaps)")


@dataclass(frozen=True, slots=True)
class LinkDirection:
    """One shaped direction of one link: traffic leaving ``dev`` in namespace ``netns``.

    ``src``/``dst`` name the endpoints (``"r0"``, ``"r1"``, ``"switch"``, ``"node0"``)."""

    src: str
    dst: str
    netns: str
    dev: str
    rate_bps: float
    delay_ms: float

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


@dataclass(kw_only=True)
class EmulatedCluster:
    """A cluster of ``world_size`` ranks in network namespaces; use as a context manager.

    Attributes set on entry: ``namespaces`` (one per rank), ``addresses`` (rank -> IPv4 address),
    ``ifnames`` (rank -> the interface carrying that address, for ``GLOO_SOCKET_IFNAME``), ``links``
    (every shaped direction) and ``extra_namespaces`` (switch namespaces)."""

    world_size: int
    """Number of ranks (>= 2)."""
    topology: Topology = "ring"
    """``"ring"``, ``"full_mesh"``, ``"switch"`` or ``"two_nodes"``."""
    rate: str | float = "800mbit"
    """Rate of every link direction (tc syntax or bit/s); the inter-node link of ``two_nodes`` excepted."""
    delay: str | float = 0.0
    """One-way delay per link direction (needs ``sch_netem``; ``"0.1ms"``, or milliseconds)."""
    inter_rate: str | float | None = None
    """``two_nodes``: rate of the shared link between the nodes, each direction (default ``rate / 4``)."""
    rates: dict[tuple[str, str], str | float] = field(default_factory=dict)
    """Per-direction overrides keyed by ``(src, dst)`` endpoint names, e.g. ``{("r0", "r1"): "200mbit"}``."""
    seed: int | None = None
    """Seeds the name suffix and subnet choice (default: random)."""

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 2:
            raise ValueError(f"EmulatedCluster(world_size={self.world_size!r}): expected an int >= 2")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"EmulatedCluster(topology={self.topology!r}): expected one of {TOPOLOGIES}")
        if self.world_size > 250:
            raise ValueError(f"EmulatedCluster(world_size={self.world_size}): at most 250 ranks in one /24")
        self.rate_bps = parse_rate(self.rate)
        self.delay_ms = _parse_delay_ms(self.delay)
        self.inter_rate_bps = self.rate_bps / 4 if self.inter_rate is None else parse_rate(self.inter_rate)
        for key, value in self.rates.items():
            parse_rate(value)
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(
                    f"EmulatedCluster(rates={self.rates!r}): keys must be (src, dst) endpoint names"
                )
        rng = random.Random(self.seed)
        self.token = f"lm{os.getpid()}{rng.randrange(16**5):05x}"
        self._rng = rng
        self.namespaces: list[str] = [f"{self.token}r{r}" for r in range(self.world_size)]
        self.extra_namespaces: list[str] = []
        self.addresses: list[str] = []
        self.ifnames: list[str] = []
        self.links: list[LinkDirection] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self._open = False
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> EmulatedCluster:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if self.delay_ms > 0 and not netem_delay_available():
            raise RuntimeError(
                f"EmulatedCluster(delay={self.delay!r}): this kernel has no sch_netem qdisc, so link delay cannot "
                "be emulated; use delay=0 (the rate limit, tbf, works without it)"
            )
        self._open = True
        atexit.register(self.teardown)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):  # becomes an exception, so __exit__ tears down
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, OSError):
                self._old_handlers[sig] = signal.signal(sig, on_term)
        # SIGINT already raises KeyboardInterrupt unless someone replaced the default handler.
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)

    def teardown(self) -> None:
        """Delete every namespace of this cluster (their veths, bridges and qdiscs go with them). Idempotent."""
        for ns in self.namespaces + self.extra_namespaces:
            if os.path.exists(f"/run/netns/{ns}"):
                _run(["ip", "netns", "del", ns], check=False)
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                atexit.unregister(self.teardown)
            for sig, handler in self._old_handlers.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    signal.signal(sig, handler)
            self._old_handlers.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this cluster that still exist (empty after teardown). Veths and qdiscs live only
        inside them, so none can outlive them; veth peers in the caller's namespace are never made."""
        listing = _run(["ip", "netns", "list"], check=False).stdout
        names = {line.split()[0] for line in listing.splitlines() if line.strip()}
        return sorted(n for n in names if n.startswith(self.token))

    # ------------------------------------------------------------------------------------------- building
    def _ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "dev", "lo", "up"])
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ):
            _run(["ip", "netns", "exec", name, "sysctl", "-qw", key])

    def _rate_for(self, src: str, dst: str, default: float) -> float:
        value = self.rates.get((src, dst))
        return default if value is None else parse_rate(value)

    def _shape(self, netns: str, dev: str, src: str, dst: str, rate_bps: float) -> None:
        """tbf (and netem delay) on the egress of ``dev``: the ``src -> dst`` direction of a link."""
        rate_bps = self._rate_for(src, dst, rate_bps)
        # Bucket: 1 ms of traffic (at least 2 full-size frames), so the rate holds at ms granularity; the
        # queue may hold 20 ms, enough for TCP's in-flight data without drops at these rates.
        burst = max(4 * 1514, int(rate_bps / 8 * 1e-3))
        tbf = ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "20ms"]
        if self.delay_ms > 0:
            _run(
                [
                    "tc",
                    "-n",
                    netns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "handle",
                    "1:",
                    "netem",
                    "delay",
                    f"{self.delay_ms * 1000:.0f}us",
                    "limit",
                    "100000",
                ]
            )
            _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf])
        else:
            _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "handle", "10:", *tbf])
        self.links.append(LinkDirection(src, dst, netns, dev, rate_bps, self.delay_ms))

    def _veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        _run(
            [
                "ip",
                "-n",
                ns_a,
                "link",
                "add",
                "name",
                dev_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
            ]
        )
        _run(["ip", "-n", ns_a, "link", "set", "dev", dev_a, "up"])
        _run(["ip", "-n", ns_b, "link", "set", "dev", dev_b, "up"])

    def _build(self) -> None:
        P = self.world_size
        self.subnet = _pick_subnet(self._rng)
        hosts = list(self.subnet.hosts())
        self.addresses = [str(hosts[r]) for r in range(P)]
        for ns in self.namespaces:
            self._ns(ns)
        ns, addr = self.namespaces, self.addresses
        if self.topology in ("ring", "full_mesh"):
            if self.topology == "ring":
                pairs = [(0, 1)] if P == 2 else [(r, (r + 1) % P) for r in range(P)]
            else:
                pairs = [(a, b) for a in range(P) for b in range(a + 1, P)]
            dev: dict[tuple[int, int], str] = {}
            for a, b in pairs:
                dev[a, b], dev[b, a] = f"to{b}", f"to{a}"
                self._veth(ns[a], dev[a, b], ns[b], dev[b, a])
                self._shape(ns[a], dev[a, b], f"r{a}", f"r{b}", self.rate_bps)
                self._shape(ns[b], dev[b, a], f"r{b}", f"r{a}", self.rate_bps)
            for r in range(P):
                first = next(d for (x, _), d in dev.items() if x == r)
                self.ifnames.append(first)
                _run(["ip", "-n", ns[r], "addr", "add", f"{addr[r]}/32", "dev", first])
            for r in range(P):
                for d in range(P):
                    if d == r:
                        continue
                    if (r, d) in dev:
                        _run(
                            [
                                "ip",
                                "-n",
                                ns[r],
                                "route",
                                "add",
                                f"{addr[d]}/32",
                                "dev",
                                dev[r, d],
                                "src",
                                addr[r],
                            ]
                        )
                        continue
                    # ring only: the shorter way round (ties: forward), through the neighbour on that side
                    k = (d - r) % P
                    hop = (r + 1) % P if k <= P // 2 else (r - 1) % P
                    _run(
                        [
                            "ip",
                            "-n",
                            ns[r],
                            "route",
                            "add",
                            f"{addr[d]}/32",
                            "via",
                            addr[hop],
                            "dev",
                            dev[r, hop],
                            "src",
                            addr[r],
                            "onlink",
                        ]
                    )
            return
        # switch / two_nodes: a bridge namespace
        sw = f"{self.token}sw"
        self.extra_namespaces.append(sw)
        self._ns(sw)
        nodes = 1 if self.topology == "switch" else 2
        per_node = -(-P // nodes)
        for n in range(nodes):
            _run(["ip", "-n", sw, "link", "add", "name", f"br{n}", "type", "bridge"])
            _run(["ip", "-n", sw, "link", "set", "dev", f"br{n}", "up"])
        here = "switch" if nodes == 1 else None
        for r in range(P):
            n = r // per_node
            port = f"p{r}"
            self._veth(ns[r], "nic", sw, port)
            _run(["ip", "-n", sw, "link", "set", "dev", port, "master", f"br{n}"])
            _run(["ip", "-n", ns[r], "addr", "add", f"{addr[r]}/{self.subnet.prefixlen}", "dev", "nic"])
            self.ifnames.append("nic")
            other = here or f"node{n}"
            self._shape(ns[r], "nic", f"r{r}", other, self.rate_bps)
            self._shape(sw, port, other, f"r{r}", self.rate_bps)
        if nodes == 2:
            self._veth(sw, "x0", sw, "x1")
            _run(["ip", "-n", sw, "link", "set", "dev", "x0", "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", "dev", "x1", "master", "br1"])
            self._shape(sw, "x0", "node0", "node1", self.inter_rate_bps)
            self._shape(sw, "x1", "node1", "node0", self.inter_rate_bps)

    # ------------------------------------------------------------------------------------------ counters
    def tx_counters(self) -> dict[str, dict[str, int]]:
        """Kernel counters of every shaped direction (``tc -s qdisc`` on its egress root qdisc):
        ``{"r0->r1": {"bytes": ..., "packets": ..., "drops": ...}, ...}``."""
        return {link.name: _egress_counters(link.dev, link.netns) for link in self.links}

    # ------------------------------------------------------------------------------------------ launching
    def rank_env(self) -> list[dict[str, str]]:
        """Per-rank environment inside the namespaces: gloo's interface, the shaped egress devices of the
        rank's namespace (``LONGMOE_NETEM_LINKS``, JSON ``{dev: "r0->r1"}``, for :func:`read_tx_bytes`) and
        a fingerprint of the configured links (``LONGMOE_TOPOLOGY_FINGERPRINT``: measured profiles are
        cached per topology)."""
        fingerprint = json.dumps(
            [self.topology, self.world_size, self.rate_bps, self.inter_rate_bps, self.delay_ms,
             sorted((f"{a}->{b}", str(v)) for (a, b), v in self.rates.items())]
        )  # fmt: skip
        out = []
        for r in range(self.world_size):
            mine = {link.dev: link.name for link in self.links if link.netns == self.namespaces[r]}
            out.append(
                {
                    "GLOO_SOCKET_IFNAME": self.ifnames[r],
                    "TP_SOCKET_IFNAME": self.ifnames[r],
                    "LONGMOE_NETEM_LINKS": json.dumps(mine),
                    "LONGMOE_TOPOLOGY_FINGERPRINT": fingerprint,
                }
            )
        return out

    def spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``launcher.spawn(fn, world_size, *args, **kwargs)`` with rank ``r`` in namespace ``r``."""
        from longmoe.runtime.launcher import spawn

        if not self._open:
            raise RuntimeError(
                "EmulatedCluster.spawn(): the cluster is not open; use it as a context manager"
            )
        return spawn(
            fn,
            self.world_size,
            *args,
            netns=self.namespaces,
            master_addr=self.addresses[0],
            rank_env=self.rank_env(),
            **kwargs,
        )

    def describe(self) -> str:
        rates = ", ".join(f"{link.name} {link.rate_bps / 1e6:g} Mbit/s" for link in self.links)
        return (
            f"{self.topology} of {self.world_size} ranks on {self.subnet} ({', '.join(self.addresses)}); "
            f"delay {self.delay_ms:g} ms; {rates}"
        )


_MSS, _FRAME = 1448, 66
"""TCP payload per segment and per-segment headers (Ethernet, IPv4, TCP with timestamps) at MTU 1500."""


def goodput(rate_bps: float) -> float:
    """Payload bytes per second of a TCP stream on a link of ``rate_bps`` (bit/s on the wire) at MTU 1500:
    each 1448-byte segment carries 66 bytes of headers. :func:`wire_rate` is the inverse."""
    return rate_bps / 8 * _MSS / (_MSS + _FRAME)


def wire_rate(payload_bytes_per_s: float) -> float:
    """The link rate (bit/s on the wire) that carries ``payload_bytes_per_s`` of TCP payload."""
    return payload_bytes_per_s * 8 * (_MSS + _FRAME) / _MSS


def _egress_counters(dev: str, netns: str | None = None) -> dict[str, int]:
    """Bytes, packets and drops of ``dev``'s egress root qdisc (``tc -s``), in ``netns`` or this one."""
    where = ["-n", netns] if netns else []
    text = _run(["tc", *where, "-s", "-j", "qdisc", "show", "dev", dev]).stdout
    q = next(q for q in json.loads(text) if q.get("root"))
    return {"bytes": int(q["bytes"]), "packets": int(q["packets"]), "drops": int(q["drops"])}


def read_tx_bytes() -> dict[str, int]:
    """Inside a rank of an :class:`EmulatedCluster`: the bytes the kernel sent so far on each of this
    rank's shaped egress links (``tc -s``), by link name ("r0->r1", "r0->switch"); ``{}`` elsewhere."""
    links = json.loads(os.environ.get("LONGMOE_NETEM_LINKS", "{}"))
    return {name: _egress_counters(dev)["bytes"] for dev, name in links.items()}


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longmoe.runtime.netem",
        description="Run a script on an emulated cluster, one rank per network namespace (torchrun-like).",
    )
    parser.add_argument("--topology", choices=TOPOLOGIES, default="ring")
    parser.add_argument("--world-size", "--nproc-per-node", type=int, required=True, dest="world_size")
    parser.add_argument("--rate", default="800mbit", help="per-direction link rate, tc syntax")
    parser.add_argument("--delay", default="0", help="per-direction delay (needs sch_netem)")
    parser.add_argument("--inter-rate", default=None, help="two_nodes: the rate between the nodes")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before every rank is killed")
    parser.add_argument("script", help="the training script (then its arguments, after --)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = [a for a in ns.script_args if a != "--"] if ns.script_args[:1] == ["--"] else ns.script_args
    reason = netns_unavailable_reason()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    with EmulatedCluster(
        world_size=ns.world_size, topology=ns.topology, rate=ns.rate, delay=ns.delay, inter_rate=ns.inter_rate
    ) as cluster:
        print(f"[netem] {cluster.describe()}", file=sys.stderr)
        procs: list[subprocess.Popen] = []
        try:
            for r in range(ns.world_size):
                env = dict(os.environ)
                env.update(
                    RANK=str(r),
                    WORLD_SIZE=str(ns.world_size),
                    LOCAL_RANK=str(r),
                    LOCAL_WORLD_SIZE=str(ns.world_size),
                    GROUP_RANK="0",
                    MASTER_ADDR=cluster.addresses[0],
                    MASTER_PORT=str(ns.master_port),
                    **cluster.rank_env()[r],
                )
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", cluster.namespaces[r], sys.executable, ns.script, *args],
                        env=env,
                    )
                )
            deadline = time.monotonic() + ns.timeout
            code = 0
            while any(p.poll() is None for p in procs):
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    code = failed[0] if failed else 124
                    break
                time.sleep(0.1)
            for p in procs:
                if p.returncode not in (None, 0) and code == 0:
                    code = p.returncode
            counters = cluster.tx_counters()
            print(
                "[netem] bytes per link direction (tc -s): "
                + ", ".join(f"{k} {v['bytes']}" for k, v in counters.items()),
                file=sys.stderr,
            )
            return code
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(3)
                if p.poll() is None:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    sys.exit(main())
