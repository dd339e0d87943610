"""A private network for the partitioned local stack: one Linux network namespace per process,
all on one bridge, each with its own address, and blackhole routes to cut links.

Layout of one run (``<run>`` is 6 hex digits, the run marker carried by every name)::

    root namespace: bridge pb<run>, address <subnet>.1 (the runner: load, checks, probes)
    pd-<run>-<node>: eth0 <subnet>.<2+i>/24, lo up; veth pv<run><ii> on the bridge

Namespaces get no default route, only their /24, and the root namespace does not forward
(nothing here turns ``ip_forward`` on): traffic can reach the run's own addresses and
loopback, never any other address. The runner's bridge address is never cut, so the
observer always sees every node.

A cut is a blackhole route in the sender's namespace (``ip -n NS route add blackhole
ADDR/32``): packets from NS to ADDR are dropped. TCP needs both directions, so a one-way cut
already breaks new and established connections (the replies cannot leave); what stays
one-way is which side learns it first (the cut side's own sends fail with EINVAL at once,
the far side only sees silence). No iptables/nft or netem here: blackholes are the tool.

Crash safety: before anything is created, ``/run/paydispatch-netns/<run>.json`` records the
owner's pid and process start time. :func:`reap_stale` removes every namespace, link and
marker whose owner is gone (killing processes left inside its namespaces first);
:class:`Network` calls it before creating its own.

Everything here blocks (``subprocess.run`` of ``ip``): async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.stack import StackError

log = logging.getLogger(__name__)

MARKER_DIR = Path("/run/paydispatch-netns")
NETNS_PREFIX = "pd-"
# Link names are limited to 15 characters: p + kind + 6 hex run id (+ 2 digits for veths).
_LINK = re.compile(r"^p[bv]([0-9a-f]{6})\d{0,2}$")
_NETNS = re.compile(r"^pd-([0-9a-f]{6})-[\w.-]+$")
# Runs take a /24 out of this /16 (a private range; checked against the host's routes).
SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")
_IP_TIMEOUT = 15.0


class NetnsError(StackError):
    """A network namespace operation failed (the message names the command and ip's words)."""


def _ip(*args: str, netns: str | None = None, stdin: str | None = None) -> str:
    """Run ``ip [-n NETNS] ARGS``; NetnsError with ip's own message when it fails."""
    command = ["ip", *(("-n", netns) if netns else ()), *args]
    try:
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetnsError(f"`{' '.join(command)}` could not run: {error}") from error
    if result.returncode != 0:
        shown = " ".join(command) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise NetnsError(f"`{shown}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Several ip commands in one process (``ip -batch -``): creating a run's namespaces takes
    a few processes, not a hundred."""
    text = "\n".join(lines) + "\n"
    _ip("-batch", "-", netns=netns, stdin=text)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (creates and
    deletes one throwaway namespace to find out)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("link", "set", "lo", "up", netns=probe)
    except NetnsError as error:
        return f"cannot create a network namespace: {error}"
    finally:
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", probe)
    return None


# --- run markers and the reaper -------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with
    the pid it names one process for all time, a recycled pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(run: str) -> bool:
    """True while the process that created ``run`` still runs."""
    try:
        marker = json.loads((MARKER_DIR / f"{run}.json").read_text())
        pid, started = int(marker["pid"]), str(marker["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no marker: it is written before anything is created, so stale
    return _start_time(pid) == started


def _runs_present() -> dict[str, list[str]]:
    """Every run id found in namespace names, link names and markers → its namespaces."""
    runs: dict[str, list[str]] = {}
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if match := _NETNS.match(name):
            runs.setdefault(match.group(1), []).append(name)
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1 and (match := _LINK.match(parts[1].strip().split("@")[0])):
            runs.setdefault(match.group(1), [])
    if MARKER_DIR.is_dir():
        for marker in MARKER_DIR.glob("*.json"):
            runs.setdefault(marker.stem, [])
    return runs


def _remove_run(run: str, namespaces: Sequence[str]) -> None:
    """Kill what still runs inside the run's namespaces, delete them, its links, its marker."""
    for netns in namespaces:
        with contextlib.suppress(NetnsError):
            for pid in _ip("netns", "pids", netns).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
    for netns in namespaces:
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", netns)
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        match = _LINK.match(name)
        if match and match.group(1) == run:
            with contextlib.suppress(NetnsError):
                _ip("link", "del", name)
    with contextlib.suppress(OSError):
        (MARKER_DIR / f"{run}.json").unlink()


def reap_stale() -> list[str]:
    """Remove every run whose owner process is gone; returns the run ids removed."""
    reaped = []
    for run, namespaces in _runs_present().items():
        if not _owner_alive(run):
            log.warning("removing stale network namespaces of run %s: %s", run, namespaces)
            _remove_run(run, namespaces)
            reaped.append(run)
    return reaped


def leftovers() -> list[str]:
    """Names of every namespace and link of any run (for tests: none after a clean stop)."""
    found = [
        line.split()[0]
        for line in _ip("netns", "list").splitlines()
        if line.strip() and _NETNS.match(line.split()[0])
    ]
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if _LINK.match(name):
            found.append(name)
    return found


# --- one run's network ----------------------------------------------------------------------


@dataclass(frozen=True)
class NetNode:
    """One node of the network: a namespace holding one process, with its own address."""

    name: str  # logical name: etcd0, postgres, provider, replica-1, haproxy
    netns: str
    address: str


def _taken() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address in or a route to."""
    taken: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        with contextlib.suppress(ValueError, IndexError):
            taken.append(ipaddress.IPv4Interface(line.split()[3]).network)
    for line in _ip("-4", "route", "show").splitlines():
        word = line.split()[0] if line.strip() else ""
        with contextlib.suppress(ValueError):
            if word not in ("default", "blackhole"):
                taken.append(ipaddress.IPv4Network(word, strict=False))
    return taken


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUPERNET that no address or route of this machine overlaps."""
    taken = _taken()
    candidates = list(SUPERNET.subnets(new_prefix=24))
    start = secrets.randbelow(len(candidates))
    for subnet in candidates[start:] + candidates[:start]:
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise NetnsError(f"no free /24 left in {SUPERNET} for the partitioned stack")


class Network:
    """One run's bridge and namespaces, and the blackhole routes that cut links between them.

    ``plan`` names and addresses are fixed at construction (so processes can be configured
    before anything exists); :meth:`create` makes them, :meth:`remove` deletes them."""

    def __init__(self, nodes: Sequence[str]) -> None:
        if len(set(nodes)) != len(nodes) or not nodes:
            raise ValueError(f"node names must be distinct and non-empty, got {list(nodes)}")
        if len(nodes) > 99:
            raise ValueError("at most 99 nodes per network")
        self.run = secrets.token_hex(3)
        self.subnet = _pick_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self.bridge = f"pb{self.run}"
        self.nodes = {
            name: NetNode(name, f"{NETNS_PREFIX}{self.run}-{name}", str(hosts[1 + i]))
            for i, name in enumerate(nodes)
        }
        self._veths = {name: f"pv{self.run}{i:02d}" for i, name in enumerate(nodes)}
        self._blocked: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # cuts come from the nemesis thread and from heal_all
        self.created = False

    def node(self, name: str) -> NetNode:
        """The node called ``name`` (KeyError names the known ones)."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this network ({', '.join(self.nodes)})") from None

    def contains(self, address: str) -> bool:
        """True if ``address`` is one of this run's own addresses (a node or the runner)."""
        return address == self.gateway or any(n.address == address for n in self.nodes.values())

    def create(self) -> Network:
        """Create the bridge, the namespaces and their links; on failure remove what exists."""
        reap_stale()
        # Planned at construction: another run may have taken the same /24 since.
        if any(self.subnet.overlaps(other) for other in _taken()):
            raise NetnsError(
                f"{self.subnet} was taken by another network since this one was planned; "
                "plan a new Network"
            )
        start_time = _start_time(os.getpid())
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        (MARKER_DIR / f"{self.run}.json").write_text(
            json.dumps({"pid": os.getpid(), "start_time": start_time, "created": time.time()})
        )
        alias = f"paydispatch run {self.run} pid {os.getpid()}"
        try:
            root = [
                f"link add {self.bridge} type bridge",
                f"link set {self.bridge} alias '{alias}'",
                f"addr add {self.gateway}/{self.subnet.prefixlen} dev {self.bridge}",
                f"link set {self.bridge} up",
            ]
            for name, node in self.nodes.items():
                veth, peer = self._veths[name], f"pp{self._veths[name][2:]}"
                root += [
                    f"netns add {node.netns}",
                    f"link add {veth} type veth peer name {peer}",
                    f"link set {veth} alias '{alias}'",
                    f"link set {peer} netns {node.netns}",
                    f"link set {veth} master {self.bridge}",
                    f"link set {veth} up",
                ]
            _batch(root)
            for name, node in self.nodes.items():
                peer = f"pp{self._veths[name][2:]}"
                _batch(
                    [
                        "link set lo up",
                        f"link set {peer} name eth0",
                        f"addr add {node.address}/{self.subnet.prefixlen} dev eth0",
                        "link set eth0 up",
                    ],
                    netns=node.netns,
                )
        except BaseException:
            self.remove()
            raise
        self.created = True
        return self

    def remove(self) -> None:
        """Delete the namespaces (processes in them must be stopped first; any left are
        killed), the links and the marker. Safe to call twice."""
        _remove_run(self.run, [node.netns for node in self.nodes.values()])
        with self._lock:
            self._blocked.clear()
        self.created = False

    # --- cuts -----------------------------------------------------------------------------

    def block(self, src: str, dst: str) -> None:
        """Drop packets from ``src`` to ``dst`` (a blackhole route in src's namespace).
        Counted: two overlapping partitions that both block a link need two unblocks."""
        source, target = self.node(src), self.node(dst)
        with self._lock:
            if self._blocked[(src, dst)] == 0:
                _ip("route", "add", "blackhole", f"{target.address}/32", netns=source.netns)
            self._blocked[(src, dst)] += 1

    def unblock(self, src: str, dst: str) -> None:
        """Undo one :meth:`block` of ``src`` → ``dst``."""
        source, target = self.node(src), self.node(dst)
        with self._lock:
            if self._blocked[(src, dst)] <= 0:
                return
            self._blocked[(src, dst)] -= 1
            if self._blocked[(src, dst)] == 0:
                del self._blocked[(src, dst)]
                _ip("route", "del", "blackhole", f"{target.address}/32", netns=source.netns)

    def blocked(self) -> list[tuple[str, str]]:
        """Every directed link cut right now."""
        with self._lock:
            return sorted(self._blocked)

    def heal_all(self) -> None:
        """Remove every blackhole route this network added."""
        with self._lock:
            links = list(self._blocked)
            self._blocked.clear()
        for src, dst in links:
            with contextlib.suppress(NetnsError):
                _ip(
                    "route",
                    "del",
                    "blackhole",
                    f"{self.node(dst).address}/32",
                    netns=self.node(src).netns,
                )

    def exec_prefix(self, name: str) -> list[str]:
        """The command prefix that runs a program inside ``name``'s namespace. ``ip netns
        exec`` execs the program, so the pid the caller holds is the program's own."""
        return ["ip", "netns", "exec", self.node(name).netns]
