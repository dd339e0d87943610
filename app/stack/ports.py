"""Free loopback ports for the processes of the local stack.

Two rules keep the stack's servers from fighting over ports:

* A process-wide registry never hands out the same port twice, so two supervisors in one
  process (etcd members, Postgres, the provider, replicas) cannot pick the same port between
  "found free" and "server bound it". Reserve every port of a cluster in one call
  (:func:`free_ports`) before starting any member.
* Ports come from *below* the kernel's ephemeral range when there is room. The kernel picks
  source ports of outgoing connections from that range, so a server port taken from it can be
  grabbed by some client connection while the server is down (kill/restart tests), and the
  restart on the same port then fails with EADDRINUSE.

Other processes can still take a port between our check and the server's bind; that window is
the same as with ``bind(0)`` and is made unlikely by choosing at random from a wide range.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

# Below this, ports tend to be well-known service ports (and some CI images run services there).
_LOWEST_PORT = 10000
# Use the range below the ephemeral range only if it is big enough to make random picks cheap.
_MIN_POOL = 2000
_MAX_ATTEMPTS = 500

_lock = threading.Lock()
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (Linux default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(host: str, port: int) -> bool:
    """True if nothing holds ``host:port``. No SO_REUSEADDR on purpose: a port with sockets
    still in TIME_WAIT counts as taken, which is the conservative answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _kernel_pick(host: str) -> int:
    """A port chosen by the kernel (fallback when there is no room below the ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on right now and that this
    process has never handed out before."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    low, _high = _ephemeral_range()
    use_low_pool = low - _LOWEST_PORT >= _MIN_POOL
    picked: list[int] = []
    with _lock:
        for _ in range(_MAX_ATTEMPTS):
            if len(picked) == count:
                break
            port = random.randrange(_LOWEST_PORT, low) if use_low_pool else _kernel_pick(host)
            if port in _handed_out or port in picked or not _is_free(host, port):
                continue
            picked.append(port)
        if len(picked) < count:
            raise OSError(f"could not find {count} free TCP ports on {host}")
        _handed_out.update(picked)
    return picked


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
