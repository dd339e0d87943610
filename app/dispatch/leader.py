"""The leader's side of a term: the elector's subscriber.

For each term the elector publishes, this raises the Postgres fence to the term's token
before anything else (so no older leader can write from then on) and, in the same
transaction, puts back in the queue what older leaders left in flight. Then it runs the
dispatcher, and ends the term when the dispatcher stops making progress: a driver wedged in
a clean-up after Postgres went away must not hold the lease while nothing is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from app.dispatch.dispatcher import OUTAGE_RETRY, Dispatcher, DispatchStats
from app.dispatch.provider import ProviderClient
from app.errors import DatabaseUnavailable, LeadershipLost
from app.leadership.term import Term
from app.obs.metrics import Metrics
from app.obs.tracing import Tracing
from app.settings import Settings
from app.store import claims, payments
from app.store.engine import Engine
from app.store.fence import raised_fence

log = logging.getLogger(__name__)

# How long leaving a term may wait for the dispatcher's final (fenced, bounded) writes.
LEAVE_BOUND = 10.0

# Work run beside the dispatcher while a term acts (the liveness beacon of app.failover):
# started once the fence is raised, cancelled and awaited when the term ends. It must not
# end the term by returning or raising; if it does, that is logged and ignored.
Companion = Callable[[Term], Coroutine[Any, Any, None]]


# The leader's own pool: the take-over transaction, the claim and record lanes (each held for
# the term), the fenced bookkeeping transactions and the reconciler, and one to spare.
LEADER_POOL_SIZE = 6
# Opened at start-up and kept open (the pool never closes idle ones): a new term's take-over
# and both lanes start on open sessions instead of waiting for connection set-ups.
LEADER_WARM_CONNECTIONS = 3
# Between terms, seconds between looks at those sessions. A Postgres restart ends them all;
# without this the next term opened and prepared its sessions inside the handover, which
# took SIGTERM handovers after a restart from ~0.1 s to 0.25 s. A look costs nothing when
# all are open (asyncpg sees a session Postgres ended: its socket closes); a warm round, which
# replaces and primes, runs only when one is missing ...
REWARM_EVERY = 1.0
# ... or, to ping them (and keep idle-timeout middleboxes from dropping them), this often.
# A term that starts during a round waits for it (up to WARM_WAIT): pinging every second,
# one term in ten waited, up to the whole WARM_WAIT (rounds took 4.5 ms median, 101 ms worst
# at 250 payments/s).
PING_EVERY = 10.0
# Longest a new term waits for a warm round under way (it holds the sessions the take-over
# and the lanes want; a round takes milliseconds, one that replaces sessions a few tens).
WARM_WAIT = 0.1


def stall_limit(settings: Settings) -> float:
    """Seconds without a completed dispatcher round after which the term is given up:
    longer than the slowest round of bounded calls (claim, call, record) could take."""
    return 3 * settings.db_timeout + settings.provider_timeout + 2


class DispatchLeader:
    """Runs the dispatcher for each term it is given (``await leader(term)``)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        provider: ProviderClient,
        stats: DispatchStats,
        metrics: Metrics,
        companions: Sequence[Companion] = (),
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.companions = tuple(companions)
        self.engine = engine
        self.provider = provider
        self.stats = stats
        self.metrics = metrics
        # Terms under way: normally 0 or 1, but a term the elector gave up waiting for may
        # still be ending while the next one runs.
        self._terms = 0
        self._warm_idle = asyncio.Event()
        self._warm_idle.set()
        self._led = False  # a term ran since the last warm round
        self._keeping_warm = True
        self._prime = functools.partial(claims.prime, fence_name=settings.fence_name)

    async def warm(self) -> None:
        """Have LEADER_WARM_CONNECTIONS sessions of the leader's pool open, with the term's
        statements prepared on each (``claims.prime``), before an election needs them: at
        start-up, and again on any session a Postgres restart replaced. Best effort."""
        await self.engine.warm(LEADER_WARM_CONNECTIONS, prime=self._prime)

    async def keep_warm(self) -> None:
        """Between terms, ``warm()`` when a warm session is missing (looked at every
        REWARM_EVERY seconds), after a term, and PING_EVERY seconds after the last round,
        until cancelled or ``stop_keeping_warm``. During a term the lanes hold their own
        sessions and replace them as they need."""
        last_round = time.monotonic()
        while self._keeping_warm:
            await asyncio.sleep(REWARM_EVERY)
            if self._terms or not self._keeping_warm:
                continue
            missing = self.engine.open_connections() < LEADER_WARM_CONNECTIONS
            # After a term, too: its bookkeeping may have left unprimed sessions on top.
            due = missing or self._led or time.monotonic() - last_round >= PING_EVERY
            if not due:
                continue
            self._led = False
            self._warm_idle.clear()
            try:
                await self.warm()
            finally:
                self._warm_idle.set()
                last_round = time.monotonic()

    async def stop_keeping_warm(self) -> None:
        """No more warm rounds (shutdown): the sessions are for a term this replica will not
        lead."""
        self._keeping_warm = False

    async def __call__(self, term: Term) -> None:
        """Lead for ``term``: take over (fence, recovery), then dispatch until the term ends
        or the work stalls."""
        self._terms += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WARM_WAIT):
                    await self._warm_idle.wait()
            await self._lead(term)
        finally:
            self._terms -= 1
            self._led = True

    async def _lead(self, term: Term) -> None:
        settings = self.settings
        dispatcher = Dispatcher(
            settings, self.engine, self.provider, term, self.stats, self.metrics, self.tracing
        )
        # The dispatcher's connections open while the take-over transaction runs.
        dispatcher.start_connecting()
        try:
            await self._take_over(term, dispatcher)
            term.ensure_valid()
            term.begin_acting()
            companions = [
                asyncio.create_task(_companion(run, term), name="leader-companion")
                for run in self.companions
            ]
            try:
                await run_watched(
                    dispatcher.run(), lambda: dispatcher.last_progress, stall_limit(settings)
                )
            finally:
                for task in companions:
                    task.cancel()
                await asyncio.gather(*companions, return_exceptions=True)
        finally:
            # Once run() began it closes its connections itself, after its final writes
            # (closing them here could cut those writes short).
            if not dispatcher.started:
                await dispatcher.close()

    async def _take_over(self, term: Term, dispatcher: Dispatcher) -> None:
        """Fence older leaders out before anything else and, in the same transaction, put
        back in the queue whatever they left in flight (re-sent under the same provider
        keys) and claim the dispatcher's first batch, so charging resumes the moment it
        commits. While Postgres does not answer, keep the lease and retry (a restart
        is over in seconds; churning through terms would not bring it back sooner), but only
        for the stall limit: a leader cut off from Postgres must let a replica that can
        reach it lead."""
        settings = self.settings
        give_up = time.monotonic() + stall_limit(settings)
        warned = False
        while True:
            try:
                async with raised_fence(
                    self.engine,
                    name=settings.fence_name,
                    token=term.token,
                    holder=settings.node_id,
                    timeout=term.call_timeout(settings.db_timeout),
                ) as conn:
                    recovered = await payments.recover(
                        conn, token=term.token, node=settings.node_id
                    )
                    await dispatcher.claim_first(conn)
                if recovered:
                    self.stats.recovered += len(recovered)
                    log.info(
                        "token %s: re-queued %d payments left in flight by an older leader",
                        term.token,
                        len(recovered),
                    )
                return
            except (DatabaseUnavailable, TimeoutError) as exc:
                dispatcher.forget_first()  # the transaction may or may not have committed
                if time.monotonic() >= give_up:
                    raise DatabaseUnavailable(
                        f"could not raise the fence to token {term.token} within "
                        f"{stall_limit(settings):.0f}s: {exc}"
                    ) from exc
                if not warned:
                    warned = True
                    log.warning(
                        "token %s: Postgres unavailable while raising the fence (%s); "
                        "keeping the lease and retrying",
                        term.token,
                        exc,
                    )
                await asyncio.sleep(OUTAGE_RETRY)


async def _companion(run: Companion, term: Term) -> None:
    try:
        await run(term)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("token %s: work beside the dispatcher failed (the term goes on)", term.token)


async def run_watched(
    work: Coroutine[Any, Any, object], last_progress: Callable[[], float], limit: float
) -> None:
    """Run ``work``; raise LeadershipLost once ``last_progress()`` (a monotonic instant) is
    more than ``limit`` seconds old. Either way ``work`` is cancelled and awaited, within a
    bound: its own final writes have timeouts, but a wedged driver clean-up must not keep
    the term (and its lease) alive."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_watch_progress(last_progress, limit))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            finished.result()
    finally:
        watch.cancel()
        task.cancel()
        _, pending = await asyncio.wait({task, watch}, timeout=LEAVE_BOUND)
        if pending:
            log.error("the leader's work did not stop within %ss of being cancelled", LEAVE_BOUND)


async def _watch_progress(last_progress: Callable[[], float], limit: float) -> None:
    while True:
        stalled = time.monotonic() - last_progress()
        if stalled > limit:
            raise LeadershipLost(
                f"the leader's work made no progress for {stalled:.1f}s; stepping down so "
                "that a healthy replica takes over"
            )
        await asyncio.sleep(min(0.5, limit / 10))
