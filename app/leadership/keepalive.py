"""Lease keep-alive on a thread of its own, gated by the health of the main event loop.

Why a thread: a busy main loop (a thousand provider calls in flight) must not delay a
keep-alive past the lease. Why gated: a *blocked* main loop must not be kept alive as leader
by a healthy thread — the leader's work cannot run, and on resumption it would act on a
lease it never really held. So the thread refreshes only while the main loop has beaten
recently; a blocked loop lets the lease lapse, another replica takes over, and the resumed
loop finds its validity deadline passed and steps down without acting.

The validity deadline is measured from when the last successful refresh was *sent*: etcd
extends the lease from when it receives the request, which is no earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from app.errors import EtcdUnavailable, LeadershipLost
from app.leadership.etcd import EtcdClient, EtcdSecurity

log = logging.getLogger(__name__)


class LoopWatchdog:
    """Beats on the main loop every ``interval`` and measures how late each beat is."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.last_beat = time.monotonic()
        self.lag = 0.0  # seconds the latest beat ran late: the event-loop lag
        self.max_lag = 0.0

    def age(self) -> float:
        """Seconds since the main loop last beat (read from any thread)."""
        return time.monotonic() - self.last_beat

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            expected = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.lag = max(0.0, now - expected)
            self.max_lag = max(self.max_lag, self.lag)
            self.last_beat = now


class KeepAlive:
    """Refreshes one lease every TTL/3 from a dedicated thread with its own event loop.

    ``last_ok_sent`` (monotonic) is when the newest successful refresh was sent; ``lost`` is
    set, on the owner's loop, once the lease is gone or cannot be refreshed in time.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        lease_id: int,
        ttl: int,
        *,
        granted_at: float,
        watchdog: LoopWatchdog,
        on_lost: Callable[[str], None],
        security: EtcdSecurity | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.security = security  # the same TLS and credentials as the elector's own client
        self.lease_id = lease_id
        self.ttl = ttl
        self.last_ok_sent = granted_at
        self.watchdog = watchdog
        self._on_lost = on_lost
        self._owner_loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None  # lives on the keep-alive thread's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"keepalive-{lease_id:x}", daemon=True
        )
        self.lost_reason: str | None = None

    def start(self) -> None:
        """Start refreshing."""
        self._thread.start()

    async def stop(self) -> None:
        """Stop refreshing and wait for the thread (bounded: its calls have timeouts)."""
        self._stop.set()
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._wake.set)
        await asyncio.to_thread(self._thread.join, self.ttl + 2)

    def _thread_main(self) -> None:
        asyncio.run(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        interval = self.ttl / 3
        # The gRPC channel belongs to this thread's loop, so the client is made here.
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        async with EtcdClient(self.endpoints, timeout=interval, security=self.security) as client:
            while not self._stop.is_set():
                due = self.last_ok_sent + interval - time.monotonic()
                if due > 0:
                    # Sleep until the next refresh is due; stop() wakes us early.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), due)
                    continue
                if self.watchdog.age() > self.ttl / 2:
                    # The main loop is blocked: let the lease lapse on purpose (see above).
                    await asyncio.sleep(0.05)
                    continue
                sent = time.monotonic()
                try:
                    remaining = await client.refresh_lease(self.lease_id, timeout=interval)
                except LeadershipLost as exc:
                    self._lose(f"lease {self.lease_id:x} is gone: {exc}")
                    return
                except EtcdUnavailable as exc:
                    # Keep trying: the owner's deadline decides when this stops being safe.
                    log.warning("keep-alive of lease %x failed: %s", self.lease_id, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 0.1)
                    continue
                if remaining > 0:
                    self.last_ok_sent = sent

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        with contextlib.suppress(RuntimeError):  # owner loop already closed
            self._owner_loop.call_soon_threadsafe(self._on_lost, reason)
