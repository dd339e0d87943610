"""The unit tier's contract, enforced: a unit test starts no process and opens no socket.

An audit hook (PEP 578) turns any attempt to spawn a process, connect, bind or resolve a name
into an error while a test of this directory runs. The hook is installed once, on first use,
and stays inert outside these tests, so the integration and chaos tiers are unaffected when
the whole suite runs in one session.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

FORBIDDEN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.exec",
        "os.fork",
        "socket.connect",
        "socket.bind",
        "socket.getaddrinfo",
        "socket.gethostbyname",
    }
)


class _Guard:
    installed = False
    active = False


def _refuse_io(event: str, args: tuple[object, ...]) -> None:
    if _Guard.active and event in FORBIDDEN_EVENTS:
        raise RuntimeError(f"a unit test must not do I/O: {event} {args!r}")


@pytest.fixture(autouse=True)
def no_processes_or_sockets() -> Iterator[None]:
    """Every test here runs with process creation and network access refused."""
    if not _Guard.installed:
        sys.addaudithook(_refuse_io)
        _Guard.installed = True
    _Guard.active = True
    try:
        yield
    finally:
        _Guard.active = False
