"""Leader election on etcd, following etcd's own ``concurrency.Election.Campaign`` recipe.

Each candidate holds a lease and a key ``<prefix><lease id>`` created only if absent; the key
with the lowest create revision leads. A waiting candidate watches the key just before its own
(from the revision it read, so no deletion is missed). The winner re-checks that its key still
exists with its create revision, which becomes its **fencing token**, and publishes a
:class:`~app.leadership.term.Term` to its subscriber (the leader's work). Anything unexpected →
step down: cancel and await the work, revoke the lease, campaign again after a jittered pause.

The elector knows nothing of what the work does: raising the Postgres fence, the stall limit
and counting fenced writes belong to the subscriber (``app.dispatch.leader``). The package
docstring (``app/leadership/__init__.py``) states the rules and the timing budget.
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

from app.errors import EtcdUnavailable, LeadershipLost, PaydispatchError
from app.leadership.etcd import EtcdAccessDenied, EtcdClient, EtcdSecurity, KeyValue
from app.leadership.keepalive import KeepAlive, LoopWatchdog
from app.leadership.term import Term

log = logging.getLogger(__name__)

# Pause before re-reading the leader key after its watch broke (etcd restarting, a member
# lost): long enough not to spin, short next to the lease TTL; doubled (up to the max) while
# etcd does not answer, as every failed call also reconnects the shared channel.
WATCH_RETRY = 0.2
WATCH_RETRY_MAX = 1.6

# A helper task that outlives its cancellation by CANCEL_ROUND seconds (longer than a watch's
# own clean-up in etcd) is cancelled again, for at most CANCEL_ROUNDS rounds.
CANCEL_ROUND = 1.5
CANCEL_ROUNDS = 6
# A lease whose revoke failed (etcd away) is revoked again until etcd says it is gone:
# every ORPHAN_RETRY seconds at first, doubling up to ORPHAN_RETRY_MAX (each failed etcd
# call also resets this replica's shared channel, and with it every watch). Left to expire,
# its key (a candidate's, or the last leader's) stays in the election: leases do not expire
# while etcd has no quorum, and a new raft leader re-arms every lease to its election
# timeout + TTL, so after an etcd leader loss every replica's lost session kept a key for
# ~3 s more, and the lowest of them "led" with no one behind it (a soak: charging stopped
# 3.1 s after an etcd member loss, through two such keys).
ORPHAN_RETRY = 0.25
ORPHAN_RETRY_MAX = 2.0

# The subscriber: work run for one term. It must return or raise when term.stopping is set
# (graceful resign or handover) and tolerate cancellation (any other loss). Returning while
# the term is still wanted, or raising, ends the term.
LeaderWork = Callable[[Term], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ElectionConfig:
    """What the elector needs to know: who this replica is and the election's timing."""

    node_id: str
    url: str  # advertised in the candidate key, so operators and peers can find the leader
    prefix: str  # etcd key prefix of this cluster's candidates
    endpoints: tuple[str, ...]  # for the keep-alive thread's own client
    lease_ttl: int
    margin: float  # stop acting this long before the lease could expire
    etcd_timeout: float
    shutdown_grace: float  # how long a graceful stop waits for the work
    # TLS and credentials for etcd; the keep-alive thread's own client needs them too.
    security: EtcdSecurity | None = None


@dataclass
class ElectionStats:
    """Counters an operator (and the tests) read through GET /v1/node."""

    transitions: dict[str, int] = field(default_factory=dict)
    terms: int = 0

    def count(self, reason: str) -> None:
        """Count one leadership transition by reason."""
        self.transitions[reason] = self.transitions.get(reason, 0) + 1


def step_down_reason(exc: BaseException) -> str:
    """The transitions label for a term that ended on ``exc``."""
    if isinstance(exc, PaydispatchError):
        return exc.step_down_reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "unexpected_error"


def _task_name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


class Elector:
    """Campaigns, leads (running ``work``), steps down and campaigns again until resigned."""

    def __init__(
        self,
        config: ElectionConfig,
        client: EtcdClient,
        work: LeaderWork,
        watchdog: LoopWatchdog,
    ) -> None:
        self.config = config
        self.client = client
        self.work = work
        self.watchdog = watchdog
        self.term: Term | None = None
        self.stats = ElectionStats()
        self._resigning = asyncio.Event()  # for good: SIGTERM/SIGINT
        self._term_end = asyncio.Event()  # this term ends gracefully: resign or handover
        self._work_task: asyncio.Task[None] | None = None
        self._ignored: set[str] = set()  # lease-less keys already reported
        self._orphans: set[int] = set()  # leases whose revoke failed, not yet revoked
        self._orphan_task: asyncio.Task[None] | None = None
        self._started_at = datetime.now(UTC).isoformat()

    @property
    def acting_term(self) -> Term | None:
        """The current term once its subscriber has taken it up, else None."""
        term = self.term
        return term if term is not None and term.acting else None

    @property
    def is_leader(self) -> bool:
        """True while this replica holds a valid term that its subscriber has taken up."""
        term = self.term
        return term is not None and term.acting and term.remaining() > 0

    async def run(self) -> None:
        """Campaign and lead in a loop until ``resign()``; never returns early on errors."""
        try:
            await self._campaign_until_resigned()
        finally:
            # Leases still unrevoked at shutdown expire by themselves.
            if self._orphan_task is not None:
                await self._cancel_and_wait([self._orphan_task])

    async def _campaign_until_resigned(self) -> None:
        while not self._resigning.is_set():
            try:
                await self._term()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every error ends this session; only unknown ones loudly
                if step_down_reason(exc) == "unexpected_error":
                    log.exception(
                        "node %s out of the running after an unexpected error",
                        self.config.node_id,
                    )
                else:
                    log.warning(
                        "node %s out of the running: %s: %s",
                        self.config.node_id,
                        type(exc).__name__,
                        exc,
                    )
            if self._resigning.is_set():
                break
            self._term_end.clear()
            # Jitter so that replicas that lost together do not campaign in lockstep.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(random.uniform(0.05, 0.25)):
                    await self._resigning.wait()

    async def _term(self) -> None:
        """One session: lease → candidate key → wait → verify → publish the term → lead."""
        config = self.config
        lost = asyncio.Event()
        lost_reason: list[str] = []

        def on_lost(reason: str) -> None:
            lost_reason.append(reason)
            lost.set()

        granted_at = time.monotonic()
        lease_id = await self.client.grant_lease(config.lease_ttl, timeout=config.etcd_timeout)
        keepalive = KeepAlive(
            config.endpoints,
            lease_id,
            config.lease_ttl,
            granted_at=granted_at,
            watchdog=self.watchdog,
            on_lost=on_lost,
            security=config.security,
        )
        keepalive.start()
        try:
            key = f"{config.prefix}{lease_id:016x}"
            value = json.dumps(
                {"node_id": config.node_id, "url": config.url, "started_at": self._started_at}
            ).encode()
            _, kv, _ = await self.client.create_if_absent(
                key, value, lease_id, timeout=config.etcd_timeout
            )
            if kv is None:
                raise LeadershipLost(f"candidate key {key} could not be created or read")
            token = kv.create_revision
            log.info("node %s campaigning (candidate revision %s)", config.node_id, token)
            await self._race(lost, lost_reason, self._wait_for_predecessors(key, token))
            if self._term_end.is_set():
                return

            term = Term(
                token=token,
                key=key,
                lease_id=lease_id,
                node_id=config.node_id,
                lease=keepalive,
                ttl=config.lease_ttl,
                margin=config.margin,
            )
            term.ensure_valid()
            await self._lead(term, lost, lost_reason)
        finally:
            await self._end_session(keepalive, lease_id)

    async def _lead(self, term: Term, lost: asyncio.Event, lost_reason: list[str]) -> None:
        """Publish ``term`` to the work and run it until it ends, the lease is lost or
        validity runs out."""
        self.term = term
        self.stats.terms += 1
        self.stats.count("elected")
        log.info("node %s elected leader with token %s", term.node_id, term.token)
        self._work_task = asyncio.create_task(self.work(term), name="leader-work")
        # Ours, not _race's: its clean-up (cancelling a watch in etcd) may take a while when
        # etcd struggles, and must not hold up stopping the work or handing over.
        own_key = asyncio.create_task(self._watch_own_key(term), name="leader-key-watch")
        try:
            await self._race(
                lost, lost_reason, self._watch_deadline(term), own_key, self._work_task
            )
            if not self._term_end.is_set():
                raise LeadershipLost("the leader's work ended by itself")
        except Exception as exc:
            reason = step_down_reason(exc)
            self.stats.count(reason)
            if reason == "unexpected_error":
                log.exception(
                    "node %s stepping down (token %s) after an unexpected error",
                    term.node_id,
                    term.token,
                )
            else:
                log.warning("node %s stepping down (token %s): %s", term.node_id, term.token, exc)
            raise
        finally:
            own_key.cancel()
            await self._stop_work(term)
            await self._cancel_and_wait([own_key])

    async def _race(
        self, lost: asyncio.Event, lost_reason: list[str], *aws: Awaitable[None]
    ) -> None:
        """Return when the first of ``aws`` finishes (re-raising its error) or on resign;
        raise LeadershipLost if the lease is lost first. What this starts from ``aws`` it
        cancels and awaits (bounded, see _cancel_and_wait); tasks passed in stay their
        owner's (the work task is left to _stop_work, which stops it gracefully or not)."""
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
            started = [t for t, aw in zip(tasks, aws, strict=True) if t is not aw]
            await self._cancel_and_wait([*started, lost_task, resign_task])

    async def _cancel_and_wait(self, tasks: list[asyncio.Future[Any]]) -> None:
        """Cancel ``tasks`` (those not cancelled yet) and wait for them to end, cancelling
        again each round those that outlive it: a library can lose a cancellation
        (``asyncio.wait_for`` on Python 3.11 swallows one that arrives just as what it waits
        for completes), and the task would then wait on for an etcd event that may never
        come, holding up the resign. Bounded like _stop_work: logged, not waited for, after
        CANCEL_ROUNDS rounds."""
        for task in tasks:
            if not (isinstance(task, asyncio.Task) and task.cancelling()):
                task.cancel()
        pending = {task for task in tasks if not task.done()}
        for _ in range(CANCEL_ROUNDS):
            if not pending:
                break
            _, pending = await asyncio.wait(pending, timeout=CANCEL_ROUND)
            for task in pending:
                task.cancel()  # its cancellation was lost (or it is slow): again
        if pending:
            log.error(
                "node %s: %s still running %.0f s after being cancelled",
                self.config.node_id,
                ", ".join(sorted(_task_name(task) for task in pending)),
                CANCEL_ROUNDS * CANCEL_ROUND,
            )
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # seen: no "exception was never retrieved" at exit

    async def _watch_own_key(self, term: Term) -> None:
        """Raise LeadershipLost when the leader key stops being this term's: deleted, or
        overwritten without our lease (an operator's ``etcdctl del`` or ``put``), while the
        lease itself lives on. The next candidate leads at once, and this term must not act
        beside it until the fence stops it. A broken watch says nothing about the key: read
        it, and watch again from that read (backing off while etcd does not answer)."""
        revision = term.token
        pause = WATCH_RETRY
        while True:
            try:
                watch = self.client.watch(term.key, start_revision=revision + 1)
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        revision = event.mod_revision
                        if event.type == "delete" or event.lease != term.lease_id:
                            raise self._key_lost(term, event.type)
            except (EtcdUnavailable, TimeoutError):  # WatchCompacted too: the read resumes
                await asyncio.sleep(pause)
                pause = min(pause * 2, WATCH_RETRY_MAX)
                try:
                    kv, revision = await self.client.get(term.key, timeout=self.config.etcd_timeout)
                except (EtcdUnavailable, TimeoutError):
                    continue  # the lease's own checks end the term if etcd stays away
                pause = WATCH_RETRY
                if kv is None:
                    raise self._key_lost(term, "delete") from None
                if kv.create_revision != term.token or kv.lease != term.lease_id:
                    raise self._key_lost(term, "put") from None

    @staticmethod
    def _key_lost(term: Term, change: str) -> LeadershipLost:
        # Invalid at once for anything still holding the term, as after a lost lease. A
        # delete is also how etcd ends a lease (expired, revoked): the keep-alive may not
        # have noticed yet, so the reason names only what was seen.
        if change == "delete":
            reason = f"the leader key {term.key} was deleted"
        else:
            reason = f"the leader key {term.key} was overwritten without this term's lease"
        term.lose(reason)
        return LeadershipLost(reason)

    async def _watch_deadline(self, term: Term) -> None:
        """Raise LeadershipLost the moment validity runs out (also after a blocked loop)."""
        while True:
            term.ensure_valid()
            await asyncio.sleep(min(0.05, max(0.001, term.remaining())))

    async def _stop_work(self, term: Term) -> None:
        """Graceful if resigning (bounded wait), otherwise cancel at once; always awaited."""
        task = self._work_task
        self._work_task = None
        self.term = None
        if task is None:
            return
        if self._term_end.is_set() and not task.done():
            term.stopping.set()
            # Hand over first, then drain: a follower leads after one etcd round trip
            # instead of after our slowest provider call. What we can no longer record once
            # it has raised the fence, it recovers and re-sends under the same provider key.
            await self._revoke(term.lease_id, "handing over")
            grace = min(self.config.shutdown_grace, max(0.0, term.remaining()))
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
            self.config.node_id,
        )

    async def _end_session(self, keepalive: KeepAlive, lease_id: int) -> None:
        """Revoke the lease — our key goes and a follower proceeds now — then stop the
        keep-alive thread (closing its channel can take a moment; the handover must not
        wait for it)."""
        try:
            await self._revoke(lease_id, "ending the session")
        finally:
            await keepalive.stop()

    async def _revoke(self, lease_id: int, why: str) -> None:
        """Revoke ``lease_id`` (an unknown lease is fine); a failure is logged, and the
        revoke tried again until etcd answers (``_revoke_orphans``), never raised."""
        try:
            await self.client.revoke_lease(lease_id, timeout=self.config.etcd_timeout)
        except EtcdAccessDenied as exc:
            log.warning("could not revoke lease %x %s (it will expire): %s", lease_id, why, exc)
        except (EtcdUnavailable, TimeoutError) as exc:
            log.warning(
                "could not revoke lease %x %s (tried again until etcd answers): %s",
                lease_id,
                why,
                exc,
            )
            self._orphans.add(lease_id)
            if self._orphan_task is None or self._orphan_task.done():
                self._orphan_task = asyncio.create_task(
                    self._revoke_orphans(), name="revoke-orphans"
                )
        else:
            self._orphans.discard(lease_id)

    async def _revoke_orphans(self) -> None:
        """Revoke the leases whose revoke failed, once etcd answers again. Leases do not
        expire while etcd is away, so there is no point at which to give up: this ends when
        all are revoked (an unknown lease counts), and with the elector (``run``); a lease
        then left expires by itself, TTL after etcd is back."""
        pause = ORPHAN_RETRY
        while self._orphans:
            await asyncio.sleep(pause)
            for lease_id in sorted(self._orphans):
                try:
                    await self.client.revoke_lease(lease_id, timeout=self.config.etcd_timeout)
                except EtcdAccessDenied as exc:
                    self._orphans.discard(lease_id)
                    log.warning("could not revoke lease %x (it will expire): %s", lease_id, exc)
                    continue
                except (EtcdUnavailable, TimeoutError):
                    pause = min(pause * 2, ORPHAN_RETRY_MAX)
                    break  # etcd is still away: all of them again next round
                except Exception:
                    self._orphans.discard(lease_id)
                    log.exception("could not revoke lease %x (it will expire)", lease_id)
                    continue
                self._orphans.discard(lease_id)
                pause = ORPHAN_RETRY
                log.info("revoked lease %x now that etcd answers again", lease_id)

    async def _wait_for_predecessors(self, my_key: str, my_revision: int) -> None:
        """Block until no candidate key older than ours remains (etcd's waitDeletes), in a
        read that still holds ours, created at ``my_revision``: that read is the check that
        our key is still the one we created (anything after it, the term's watch on its own
        key sees, from ``my_revision`` on). Raises LeadershipLost when ours is gone."""
        prefix = self.config.prefix
        while True:
            kvs, revision = await self.client.get_prefix_sorted_by_create(
                prefix, timeout=self.config.etcd_timeout
            )
            # A key without a lease cannot be a candidate: candidates create theirs with one,
            # and etcd deletes it with the lease. Anyone who can write to etcd could plant
            # one; waiting on it would block every election for good.
            older = [kv for kv in kvs if kv.create_revision < my_revision and kv.lease]
            for kv in kvs:
                if not kv.lease and kv.key not in self._ignored:
                    self._ignored.add(kv.key)
                    log.warning(
                        "ignoring %s under the election prefix: it has no lease, so it is no "
                        "candidate (delete it: etcdctl del %s)",
                        kv.key,
                        kv.key,
                    )
            if not older:
                if not any(kv.key == my_key and kv.create_revision == my_revision for kv in kvs):
                    raise LeadershipLost(f"candidate key {my_key} vanished before the term began")
                return
            await self._wait_deleted(older[-1], revision)

    async def _wait_deleted(self, kv: KeyValue, revision: int) -> None:
        """Watch ``kv.key`` from ``revision + 1`` until it is deleted or stops being a
        candidate (overwritten without its lease: revoking that lease would no longer delete
        it). The caller reads the prefix again either way."""
        watch = self.client.watch(kv.key, start_revision=revision + 1)
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                if event.type == "delete" or event.lease != kv.lease:
                    return

    async def resign(self) -> None:
        """Stop acting, let the work finish within the grace period, revoke the lease."""
        if self._resigning.is_set():
            return
        token = self.term.token if self.term else None
        self._resigning.set()
        self._term_end.set()
        if token is not None:
            self.stats.count("resigned")
            log.info("node %s resigning leadership (token %s)", self.config.node_id, token)

    def handover(self) -> int | None:
        """End this term gracefully (as on SIGTERM) but stay in the running: a follower takes
        over at once and this replica campaigns again behind it. Returns the token handed
        over, or None when this replica does not lead."""
        term = self.term
        if term is None or self._term_end.is_set():
            return None
        self.stats.count("handover")
        log.info("node %s handing leadership over (token %s)", self.config.node_id, term.token)
        self._term_end.set()
        return term.token
