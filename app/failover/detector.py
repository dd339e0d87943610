"""The followers' side of fast crash detection.

Every replica runs one :class:`CrashDetector`. While another replica leads, it waits on that
leader's liveness lock; when the lock is released it looks for a second, independent signal
before doing anything:

1. the leader key still exists with the token *and* the lease it saw (a leader that stepped
   down or resigned has already revoked its lease: nothing to do);
2. the leader's advertised address **refuses** connections (a TCP RST: the port is closed,
   the process is gone). A timeout or an unreachable network proves nothing — a partitioned
   host or a paused process behaves like that — so only a refusal counts;
3. no fast takeover by this replica within ``min_interval`` (a flapping signal must not turn
   into a failover storm; past the limit, crashes go the lease path).

Then it revokes the dead leader's lease. etcd deletes the leader key, the next candidate's
watch fires and it campaigns as always; the new leader raises the fence before acting, so a
wrong guess costs a needless failover, never a double write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from app.errors import DatabaseUnavailable, EtcdUnavailable
from app.leadership.etcd import EtcdClient
from app.leadership.observer import LeaderInfo, LeaderObserver
from app.store.liveness import liveness_key, wait_liveness_released

log = logging.getLogger(__name__)

# The observer announces every leader change (LeaderObserver.leader_changed); the detector
# also looks again after this long without one, so that a change it somehow missed costs at
# most this delay, never a detector stuck on a former leader.
LEADER_RECHECK = 1.0
# Pause when etcd does not yet show the leader the observer names (it is catching up).
LEADER_POLL = 0.1
# Pause after a released lock that turned out not to mean a crash (the leader re-arms).
NOT_A_CRASH_PAUSE = 0.5
# Pause after Postgres or etcd did not answer.
RETRY_PAUSE = 0.5
# A killed process's Postgres session can end before its listening socket closes (seen:
# the port still accepting ~30 ms after the lock was released): an address that accepts is
# probed again after these pauses before the leader is deemed alive.
PROBE_AGAIN = (0.05, 0.15)


@dataclass(frozen=True)
class DetectorConfig:
    """What the detector needs: who we are, where Postgres is, how careful to be."""

    node_id: str
    url: str  # our own advertised URL: never "detect" ourselves
    database_url: str
    fence_name: str
    etcd_timeout: float
    connect_timeout: float  # Postgres connect; also bounds the address probe
    min_interval: float  # at most one fast takeover per this many seconds


@dataclass
class FailoverStats:
    """What the detector decided, by outcome (served in GET /v1/node as ``failover``)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    last_takeover_at: float | None = None  # monotonic

    def count(self, outcome: str) -> None:
        """Count one decision: takeover, leader_alive, key_changed, rate_limited."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def probe_address(url: str) -> tuple[str, int] | None:
    """The (host, port) a leader's advertised ``url`` names, or None when it names none.

    The URL comes from etcd, written by whichever replica leads — or by anything else with
    write access to the election prefix: a malformed one (no host, port 0 or out of range, an
    unclosed IPv6 bracket) is "no evidence", never an error that stops the detector.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    # Port 0 names no listener: probing another port instead could find it "refused".
    if not host or port == 0:
        return None
    return host, port


async def refuses_connections(url: str, timeout: float) -> bool:
    """True only when a TCP connect to ``url``'s host and port is actively refused.

    A refusal comes from the peer's kernel: the host is up and nothing listens on the port.
    A timeout, an unreachable network or a DNS failure say nothing about the process (a
    partition, a paused VM), so they count as "not refused".
    """
    address = probe_address(url)
    if address is None:
        return False
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(*address)
    except ConnectionRefusedError:
        return True
    # ValueError: a host name no resolver takes (e.g. an IDNA label over 63 characters).
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    return False


class CrashDetector:
    """Waits on the current leader's liveness lock; revokes a dead leader's lease."""

    def __init__(
        self,
        config: DetectorConfig,
        client: EtcdClient,
        observer: LeaderObserver,
    ) -> None:
        self.config = config
        self.client = client
        self.observer = observer
        self.stats = FailoverStats()

    def _is_self(self, leader: LeaderInfo) -> bool:
        return leader.node_id == self.config.node_id or leader.url == self.config.url

    async def run(self) -> None:
        """Watch leader after leader until cancelled; errors only pause the loop."""
        while True:
            changed = self.observer.leader_changed()
            leader = self.observer.leader
            if leader is None or self._is_self(leader):
                await asyncio.wait({changed}, timeout=LEADER_RECHECK)
                continue
            try:
                await self._watch(leader)
            except asyncio.CancelledError:
                raise
            except (DatabaseUnavailable, EtcdUnavailable, TimeoutError) as exc:
                # A Postgres restart ends our wait as well as the leader's session: no
                # evidence either way. Start over once things answer.
                log.debug("crash detector paused: %s", exc)
                await asyncio.sleep(RETRY_PAUSE)
            except Exception:
                log.exception("crash detector failed; retrying")
                await asyncio.sleep(RETRY_PAUSE)

    async def _watch(self, leader: LeaderInfo) -> None:
        config = self.config
        kv, _ = await self.client.get(leader.key, timeout=config.etcd_timeout)
        if kv is None or kv.create_revision != leader.token or not kv.lease:
            await asyncio.sleep(LEADER_POLL)  # the observer has not caught up yet
            return
        lease = kv.lease
        key = liveness_key(config.fence_name, leader.token)
        waiting = asyncio.ensure_future(
            wait_liveness_released(
                config.database_url,
                key,
                node_id=config.node_id,
                connect_timeout=config.connect_timeout,
            )
        )
        try:
            while not waiting.done():
                changed = self.observer.leader_changed()
                current = self.observer.leader
                if current is None or current.token != leader.token:
                    return  # another leader now: wait on its lock instead
                await asyncio.wait(
                    {waiting, changed}, timeout=LEADER_RECHECK, return_when=asyncio.FIRST_COMPLETED
                )
            waiting.result()
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
        await self._confirm_and_take_over(leader, lease)

    async def _confirm_and_take_over(self, leader: LeaderInfo, lease: int) -> None:
        config = self.config
        # Signal 1 said: its Postgres session is gone. Is it still the leader we saw?
        kv, _ = await self.client.get(leader.key, timeout=config.etcd_timeout)
        if kv is None or kv.create_revision != leader.token or kv.lease != lease:
            self.stats.count("key_changed")  # it stepped down or resigned by itself
            return
        # Signal 2, independent of Postgres: does its address refuse connections?
        if not await refuses_soon(leader.url, config.connect_timeout):
            self.stats.count("leader_alive")
            log.info(
                "liveness lock of leader %s (token %s) released, but %s still accepts "
                "connections: not a crash (a Postgres restart or a lost leader session); "
                "leaving it to the lease",
                leader.node_id,
                leader.token,
                leader.url,
            )
            await asyncio.sleep(NOT_A_CRASH_PAUSE)
            return
        now = time.monotonic()
        last = self.stats.last_takeover_at
        if last is not None and now - last < config.min_interval:
            self.stats.count("rate_limited")
            log.warning(
                "leader %s (token %s) looks crashed, but this replica took over %.1fs ago "
                "(limit %.0fs): leaving it to the lease",
                leader.node_id,
                leader.token,
                now - last,
                config.min_interval,
            )
            return
        self.stats.last_takeover_at = now
        self.stats.count("takeover")
        await self.client.revoke_lease(lease, timeout=config.etcd_timeout)
        log.warning(
            "leader %s (token %s) crashed: its Postgres liveness lock was released and %s "
            "refuses connections; revoked its lease %x so the next candidate leads now",
            leader.node_id,
            leader.token,
            leader.url,
            lease,
        )


async def refuses_soon(url: str, timeout: float) -> bool:
    """``refuses_connections``, asked again after each of PROBE_AGAIN while it says no."""
    if await refuses_connections(url, timeout):
        return True
    for pause in PROBE_AGAIN:
        await asyncio.sleep(pause)
        if await refuses_connections(url, timeout):
            return True
    return False
