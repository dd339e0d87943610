"""Leader election on etcd, following etcd's own ``concurrency.Election.Campaign`` recipe.

Each candidate holds a lease and a key ``<prefix><lease id>`` created only if absent; the key
with the lowest create revision leads. A waiting candidate watches the key just before its own
(from the revision it read, so no deletion is missed). The winner re-checks in a transaction
that its key still exists with its create revision, which becomes its **fencing token**, raises
the Postgres fence to it and only then starts the leader's work. Anything unexpected → step
down: cancel and await the work, revoke the lease, campaign again after a jittered pause.

See docs in README.md ("Leadership") for the timing budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import EtcdUnavailable, LeadershipLost, StaleLeader
from app.leadership.etcd import EtcdClient, KeyValue
from app.leadership.keepalive import KeepAlive, LoopWatchdog
from app.settings import Settings
from app.store.fence import raise_fence

log = logging.getLogger(__name__)

# Work run while leading. It must return or raise when leadership.stopping is set (graceful
# resign) and tolerate cancellation (any other loss).
LeaderWork = Callable[["Leadership"], Coroutine[Any, Any, None]]


@dataclass
class Leadership:
    """This replica's term as leader. Trust it only while ``remaining() > 0``."""

    token: int
    key: str
    lease_id: int
    node_id: str
    keepalive: KeepAlive
    ttl: int
    margin: float
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    elected_at: float = field(default_factory=time.monotonic)
    # The leader's work calls progress() every round; a term whose work stops making progress
    # (a driver wedged in a clean-up after Postgres went away) is ended, not kept forever.
    last_progress: float = field(default_factory=time.monotonic)

    def progress(self) -> None:
        """Record that the leader's work completed a round."""
        self.last_progress = time.monotonic()

    @property
    def deadline(self) -> float:
        """Monotonic instant after which this leader must not act: last confirmed refresh
        *sent* + TTL - safety margin."""
        return self.keepalive.last_ok_sent + self.ttl - self.margin

    def remaining(self) -> float:
        """Seconds of validity left (≤ 0: no longer leader)."""
        return self.deadline - time.monotonic()

    def ensure_valid(self) -> None:
        """Raise LeadershipLost unless this leader may still act."""
        if self.keepalive.lost_reason is not None:
            raise LeadershipLost(self.keepalive.lost_reason)
        left = self.remaining()
        if left <= 0:
            raise LeadershipLost(
                f"validity deadline passed {-left:.3f}s ago with no confirmed lease renewal"
            )

    def call_timeout(self, cap: float) -> float:
        """A timeout for one call made as leader: at most ``cap``, always shorter than the
        remaining validity. Raises LeadershipLost when no time is left."""
        self.ensure_valid()
        return max(0.001, min(cap, self.remaining() - 0.01))


@dataclass
class ElectionStats:
    """Counters an operator (and the tests) read through GET /v1/node."""

    transitions: dict[str, int] = field(default_factory=dict)
    stale_writes_rejected: int = 0
    terms: int = 0

    def count(self, reason: str) -> None:
        """Count one leadership transition by reason."""
        self.transitions[reason] = self.transitions.get(reason, 0) + 1


class Elector:
    """Campaigns, leads (running ``work``), steps down and campaigns again until resigned."""

    def __init__(
        self,
        settings: Settings,
        client: EtcdClient,
        engine: AsyncEngine,
        work: LeaderWork,
        watchdog: LoopWatchdog,
    ) -> None:
        self.settings = settings
        self.client = client
        self.engine = engine
        self.work = work
        self.watchdog = watchdog
        self.leadership: Leadership | None = None
        self.stats = ElectionStats()
        self._resigning = asyncio.Event()  # for good: SIGTERM/SIGINT
        self._term_end = asyncio.Event()  # this term ends gracefully: resign or handover
        self._work_task: asyncio.Task[None] | None = None
        self._started_at = datetime.now(UTC).isoformat()

    @property
    def is_leader(self) -> bool:
        """True while this replica holds a valid term."""
        return self.leadership is not None and self.leadership.remaining() > 0

    async def run(self) -> None:
        """Campaign and lead in a loop until ``resign()``; never returns early on errors."""
        while not self._resigning.is_set():
            try:
                await self._term()
            except asyncio.CancelledError:
                raise
            except (LeadershipLost, StaleLeader, EtcdUnavailable, TimeoutError) as exc:
                log.warning(
                    "node %s out of the running: %s: %s",
                    self.settings.node_id,
                    type(exc).__name__,
                    exc,
                )
            except Exception:  # unclassified: step down all the same, loudly
                log.exception(
                    "node %s out of the running after an unexpected error", self.settings.node_id
                )
            if self._resigning.is_set():
                break
            self._term_end.clear()
            # Jitter so that replicas that lost together do not campaign in lockstep.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(random.uniform(0.05, 0.25)):
                    await self._resigning.wait()

    async def _term(self) -> None:
        """One session: lease → candidate key → wait → verify → fence → lead."""
        settings = self.settings
        lost = asyncio.Event()
        lost_reason: list[str] = []

        def on_lost(reason: str) -> None:
            lost_reason.append(reason)
            lost.set()

        granted_at = time.monotonic()
        lease_id = await self.client.grant_lease(settings.lease_ttl, timeout=settings.etcd_timeout)
        keepalive = KeepAlive(
            settings.etcd_endpoints,
            lease_id,
            settings.lease_ttl,
            granted_at=granted_at,
            watchdog=self.watchdog,
            on_lost=on_lost,
        )
        keepalive.start()
        try:
            key = f"{settings.election_prefix}{lease_id:016x}"
            value = json.dumps(
                {
                    "node_id": settings.node_id,
                    "url": settings.public_url,
                    "started_at": self._started_at,
                }
            ).encode()
            _, kv, _ = await self.client.create_if_absent(
                key, value, lease_id, timeout=settings.etcd_timeout
            )
            if kv is None:
                raise LeadershipLost(f"candidate key {key} could not be created or read")
            token = kv.create_revision
            log.info("node %s campaigning (candidate revision %s)", settings.node_id, token)
            await self._race(lost, lost_reason, self._wait_for_predecessors(token))
            if self._term_end.is_set():
                return

            leadership = Leadership(
                token=token,
                key=key,
                lease_id=lease_id,
                node_id=settings.node_id,
                keepalive=keepalive,
                ttl=settings.lease_ttl,
                margin=settings.lease_safety_margin,
            )
            if not await self.client.key_exists_with_create_revision(
                key, token, timeout=leadership.call_timeout(settings.etcd_timeout)
            ):
                raise LeadershipLost(f"candidate key {key} vanished before the term began")
            await raise_fence(
                self.engine,
                name=settings.fence_name,
                token=token,
                holder=settings.node_id,
                timeout=leadership.call_timeout(settings.db_timeout),
            )
            leadership.ensure_valid()
            await self._lead(leadership, lost, lost_reason)
        finally:
            await self._end_session(keepalive, lease_id)

    async def _lead(
        self, leadership: Leadership, lost: asyncio.Event, lost_reason: list[str]
    ) -> None:
        """Run the leader's work until it ends, the lease is lost or validity runs out."""
        self.leadership = leadership
        self.stats.terms += 1
        self.stats.count("elected")
        log.info("node %s elected leader with token %s", leadership.node_id, leadership.token)
        self._work_task = asyncio.create_task(self.work(leadership), name="leader-work")
        try:
            await self._race(lost, lost_reason, self._watch_deadline(leadership), self._work_task)
            if not self._term_end.is_set():
                raise LeadershipLost("the leader's work ended by itself")
        except (LeadershipLost, StaleLeader, EtcdUnavailable, TimeoutError) as exc:
            reason = (
                "fenced"
                if isinstance(exc, StaleLeader)
                else "etcd_unavailable"
                if isinstance(exc, EtcdUnavailable)
                else "lost"
                if isinstance(exc, LeadershipLost)
                else "timeout"
            )
            self.stats.count(reason)
            log.warning(
                "node %s stepping down (token %s): %s", leadership.node_id, leadership.token, exc
            )
            raise
        except Exception:
            self.stats.count("unexpected_error")
            log.exception(
                "node %s stepping down (token %s) after an unexpected error",
                leadership.node_id,
                leadership.token,
            )
            raise
        finally:
            await self._stop_work(leadership)

    async def _race(
        self, lost: asyncio.Event, lost_reason: list[str], *aws: Awaitable[None]
    ) -> None:
        """Return when the first of ``aws`` finishes (re-raising its error) or on resign;
        raise LeadershipLost if the lease is lost first. The work task is left to
        _stop_work, which stops it gracefully or not."""
        tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(aw) for aw in aws]
        lost_task = asyncio.ensure_future(lost.wait())
        resign_task = asyncio.ensure_future(self._term_end.wait())
        try:
            done, _ = await asyncio.wait(
                [*tasks, lost_task, resign_task], return_when=asyncio.FIRST_COMPLETED
            )
            if lost_task in done:
                raise LeadershipLost(lost_reason[0] if lost_reason else "lease lost")
            for task in tasks:
                if task in done:
                    task.result()
        finally:
            helpers = [t for t in (*tasks, lost_task, resign_task) if t is not self._work_task]
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _watch_deadline(self, leadership: Leadership) -> None:
        """Raise LeadershipLost the moment validity runs out (also after a blocked loop), or
        when the leader's work has made no progress for longer than any of its bounded calls
        could take."""
        settings = self.settings
        stall_limit = 3 * settings.db_timeout + settings.provider_timeout + 2
        while True:
            leadership.ensure_valid()
            stalled = time.monotonic() - leadership.last_progress
            if stalled > stall_limit:
                raise LeadershipLost(
                    f"the leader's work made no progress for {stalled:.1f}s; stepping down so "
                    "that a healthy replica takes over"
                )
            await asyncio.sleep(min(0.05, max(0.001, leadership.remaining())))

    async def _stop_work(self, leadership: Leadership) -> None:
        """Graceful if resigning (bounded wait), otherwise cancel at once; always awaited."""
        task = self._work_task
        self._work_task = None
        self.leadership = None
        if task is None:
            return
        if self._term_end.is_set() and not task.done():
            leadership.stopping.set()
            grace = min(self.settings.shutdown_grace, max(0.0, leadership.remaining()))
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), grace)
        # Bounded: a task wedged in a driver's clean-up must not hold the step-down (and so
        # the next campaign) hostage; it is cancelled again each round until it ends.
        for _ in range(10):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()
                return
        log.error(
            "node %s: the leader's work did not stop within 10 s of being cancelled",
            self.settings.node_id,
        )

    async def _end_session(self, keepalive: KeepAlive, lease_id: int) -> None:
        """Revoke the lease — our key goes and a follower proceeds now — then stop the
        keep-alive thread (closing its channel can take a moment; the handover must not
        wait for it)."""
        try:
            await self.client.revoke_lease(lease_id, timeout=self.settings.etcd_timeout)
        except (EtcdUnavailable, TimeoutError) as exc:
            log.warning("could not revoke lease %x (it will expire): %s", lease_id, exc)
        finally:
            await keepalive.stop()

    async def _wait_for_predecessors(self, my_revision: int) -> None:
        """Block until no candidate key older than ours remains (etcd's waitDeletes)."""
        prefix = self.settings.election_prefix
        while True:
            kvs, revision = await self.client.get_prefix_sorted_by_create(
                prefix, timeout=self.settings.etcd_timeout
            )
            older = [kv for kv in kvs if kv.create_revision < my_revision]
            if not older:
                return
            await self._wait_deleted(older[-1], revision)

    async def _wait_deleted(self, kv: KeyValue, revision: int) -> None:
        """Watch ``kv.key`` from ``revision + 1`` until it is deleted."""
        async for event in self.client.watch(kv.key, start_revision=revision + 1):
            if event.type == "delete":
                return

    async def resign(self) -> None:
        """Stop acting, let the work finish within the grace period, revoke the lease."""
        if self._resigning.is_set():
            return
        token = self.leadership.token if self.leadership else None
        self._resigning.set()
        self._term_end.set()
        if token is not None:
            self.stats.count("resigned")
            log.info("node %s resigning leadership (token %s)", self.settings.node_id, token)

    def handover(self) -> int | None:
        """End this term gracefully (as on SIGTERM) but stay in the running: a follower takes
        over at once and this replica campaigns again behind it. Returns the token handed
        over, or None when this replica does not lead."""
        leadership = self.leadership
        if leadership is None or self._term_end.is_set():
            return None
        self.stats.count("handover")
        log.info(
            "node %s handing leadership over (token %s)", self.settings.node_id, leadership.token
        )
        self._term_end.set()
        return leadership.token
