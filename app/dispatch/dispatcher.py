"""The leader's work: drain the queue through the provider, exactly once in effect.

Runs only inside a leadership term (``app.dispatch.leader`` runs it for each term). Every write is
stamped with the term's token and runs ``paydispatch_assert_fence`` in its transaction (the
hot claim and record are one statement each, ``app.store.claims``), so Postgres refuses it
once a newer leader has raised the fence — whatever this process believes.

Timing rule: claiming and calling the provider are *acting as leader* and need remaining
validity (their timeouts are cut to it). Recording the result of a call already made is not:
it is attempted even after validity ran out, because the fence decides — it lands if no newer
leader exists, and is rejected (and counted) if one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from app.dispatch import reconcile
from app.dispatch.provider import ProviderClient
from app.domain.concurrency import SlowStart
from app.domain.outcome import Charge, storable_text
from app.domain.payment import Claimed, Outcome
from app.domain.retry import RetryPolicy
from app.domain.states import PaymentStatus
from app.errors import (
    ChargeMismatch,
    DatabaseUnavailable,
    LeadershipLost,
    RetryableProviderError,
    StaleLeader,
    TerminalProviderError,
    UnknownOutcome,
)
from app.leadership.term import Term
from app.obs.metrics import Metrics
from app.obs.tracing import AttemptTrace, Tracing
from app.settings import Settings
from app.store import payments
from app.store.claims import LeaderLane, claim_in
from app.store.engine import Connection, Engine, translate
from app.store.fence import FencedWriter
from app.store.listen import listen_forever

log = logging.getLogger(__name__)

# Seconds between retries of a write or a claim while Postgres does not answer.
OUTAGE_RETRY = 0.5
# Longest a leaving leader spends on its final records and releases (its successor waits for
# the lease meanwhile); during a Postgres outage, when they most likely fail, less.
FINAL_WRITES = 2.0
OUTAGE_FINAL_WRITES = 0.5
# Recording is batched like River's completer, but rate-limited rather than delayed: a batch
# is written at most once per RECORD_FLUSH seconds (or as soon as RECORD_BATCH outcomes
# wait). Under load that is one statement per handful of calls; an outcome that arrives
# after a quiet spell — the first of a new term, a lone payment — is written at once.
RECORD_BATCH = 100
RECORD_FLUSH = 0.05
# A claim that came back short means the queue is (nearly) empty: the next one waits for a
# wake-up, and wake-ups (one NOTIFY per ingested payment) are coalesced to at most one claim
# per CLAIM_GAP seconds. The first claim after a quiet spell goes at once (idle latency).
CLAIM_GAP = 0.01
# A claimed batch's calls start CALL_WAVE at a time, one event-loop turn apart: the
# replica's ingest shares this loop, and a request waits, at each of its awaits, for every
# step made ready before it. A new leader's catch-up batch started all at once held each
# ingest step behind dozens of calls' connection set-ups.
CALL_WAVE = 8
# Shortest wait for the ramp to open room for a claim (rounding must not make it spin).
RAMP_WAKE_MIN = 0.005
# Expired provider keys are never claimed (the claim filters them); moving them to
# needs_reconciliation is bookkeeping, done this often rather than on every claim, and first
# PARK_FIRST seconds into a term: not between a new leader and its first charge.
PARK_INTERVAL = 5.0
PARK_FIRST = 1.0
# Seconds between checks for rows in flight under our token that no call of ours holds.
UNTRACKED_EVERY = 30.0
# Longest a reconcile pass may take; the next pass resumes where it stopped.
SWEEP_BUDGET = 30.0


@dataclass
class DispatchStats:
    """Counters shown by GET /v1/node (and, later, exported as metrics)."""

    claimed: int = 0
    succeeded: int = 0
    declined: int = 0
    failed: int = 0
    retries: int = 0
    needs_reconciliation: int = 0
    reconciled: int = 0
    recovered: int = 0
    batches: int = 0
    stale_writes_rejected: int = 0  # writes the Postgres fence refused (a newer leader)
    outcomes: dict[str, int] = field(default_factory=dict)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The retry policy the settings describe (the dispatcher's, and the admin retry's)."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_delay=settings.retry_base_delay,
        max_delay=settings.retry_max_delay,
        retention=timedelta(hours=settings.idempotency_retention_hours),
    )


class Dispatcher:
    """One term's queue drain. Create per term; ``run()`` until stopping or cancelled."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        provider: ProviderClient,
        leadership: Term,
        stats: DispatchStats,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.provider = provider
        self.leadership = leadership
        self.stats = stats
        self.metrics = metrics
        self.tracing = tracing  # None: tracing is off, and no span is made
        self.token = leadership.token
        # Monotonic time of the last completed claim round: DispatchLeader ends a term
        # whose dispatcher stops making progress.
        self.last_progress = time.monotonic()
        self.started = False  # run() began: from then on it closes its own connections
        self.fenced = FencedWriter(
            engine, fence_name=settings.fence_name, token=self.token, on_stale=self._fenced_out
        )
        lane = functools.partial(
            LeaderLane,
            engine,
            fence_name=settings.fence_name,
            token=self.token,
            on_stale=self._fenced_out,
        )
        # One connection per task that writes: the claim loop's and the recorder's.
        self._claim_lane: LeaderLane = lane()
        self._record_lane: LeaderLane = lane()
        self._lanes = (self._claim_lane, self._record_lane)
        self._connecting: asyncio.Task[None] | None = None
        self._parked_at = time.monotonic() - PARK_INTERVAL + PARK_FIRST  # monotonic
        self._claimed_at = -CLAIM_GAP
        self._outcome_counters: dict[str, Any] = {}  # metric children, one per outcome
        self._latency = metrics.provider_latency
        # The term's in-flight limit: a slow start (why: app.domain.concurrency), started
        # again at the term's first claim (claim_first).
        self._ramp = SlowStart(
            initial=settings.dispatch_initial_concurrency,
            ceiling=settings.dispatch_concurrency,
            ramp=settings.dispatch_ramp_seconds,
            started=time.monotonic(),
        )
        self.retry = retry_policy(settings)
        self._wake = asyncio.Event()
        self._outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        # The recorder's batch in hand (taken off the queue, not yet written): written again
        # by _final_writes if the recorder is cancelled holding it (recording is idempotent).
        self._recording: list[Outcome] = []
        self._recorder_idle = asyncio.Event()
        self._batch_ready = asyncio.Event()  # set when the recorder need not wait longer
        self._recorded_at = -RECORD_FLUSH  # loop time of the last batch write
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._claimed: set[int] = set()  # in flight under our token, not yet recorded
        self._lost: LeadershipLost | None = None  # set by a call that found the term over
        self._outage_since: float | None = None  # monotonic start of a Postgres outage
        self._claim_unsure = False  # a claim failed: it may have committed unseen
        self._first_claimed = False
        self._first_recorded = False
        self._first: list[Claimed] = []  # claimed in the take-over transaction (claim_first)
        self._untracked_checked = time.monotonic()
        self._sweep_after = 0  # where the next reconcile pass resumes

    # --- the term -------------------------------------------------------------------------

    async def claim_first(self, conn: Connection) -> None:
        """Claim the term's first batch on ``conn``, inside the take-over transaction after
        the fence raise and the recovery (those re-queued payments are due at once): ``run``
        calls the provider for it the moment it starts, with no claim round trip in between.
        If that transaction does not commit, ``forget_first`` must follow."""
        # The slow start counts from the term's first claim: a take-over retried through
        # a Postgres outage (building the very backlog the ramp is for) must not use it up.
        self._ramp = dataclasses.replace(self._ramp, started=time.monotonic())
        limit = min(self.settings.dispatch_batch_size, self._in_flight_limit())
        self._first = await claim_in(
            conn,
            fence_name=self.settings.fence_name,
            token=self.token,
            limit=limit,
            horizon=self.retry.horizon.total_seconds(),
        )
        # As after any claim: a full batch means more may wait (claim again at once).
        self._claimed_at = -CLAIM_GAP if len(self._first) == limit else time.monotonic()

    def forget_first(self) -> None:
        """The take-over transaction failed: the first batch is not ours to call. Its commit
        may have happened unseen, so the first claim round also re-queues what is in flight
        under our token without a call of ours (as after any claim whose answer was lost)."""
        self._first = []
        self._claim_unsure = True
        self._claimed_at = -CLAIM_GAP

    def start_connecting(self) -> None:
        """Begin readying the claim and record lanes now (best effort): each takes its
        connection from the leader's pool and runs its statement once on no rows (a claim of
        0, an empty record), so the first real ones find a warm session (statement prepared,
        fence function compiled, catalogs cached: a cold first claim or record took 40-60 ms
        here during a failover, a warm one a few). DispatchLeader calls this before its
        take-over transaction, which it overlaps; ``run`` waits for it before its first
        claim; ``close`` stops it. Nothing is written: the statements change no row."""
        self._connecting = asyncio.create_task(self._ready_lanes(), name="dispatcher-connect")

    async def _ready_lanes(self) -> None:
        horizon = self.retry.horizon.total_seconds()
        timeout = self.settings.db_timeout
        # A failure is left for the first real statement to meet (and report) again.
        await asyncio.gather(
            self._claim_lane.claim(limit=0, horizon=horizon, timeout=timeout),
            self._record_lane.record(node=self.settings.node_id, outcomes=(), timeout=timeout),
            return_exceptions=True,
        )

    async def close(self) -> None:
        """Stop readying the lanes, put back a first batch that was never called, and give
        both connections back (``run`` does on its way out; this is for a term that ended
        between its take-over and ``run``). Idempotent. Cancelled meanwhile, it still
        holds no connection when it ends."""
        self.metrics.concurrency_limit.set(0)  # not leading: no payment may be in flight
        try:
            connecting, self._connecting = self._connecting, None
            if connecting is not None:
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
            first, self._first = self._first, []
            if first:
                # Claimed under our token in the take-over, never sent: back to the queue
                # now rather than at the next leader's recovery (fenced, like any release).
                self._claimed.update(payment.id for payment in first)
                await self._final_writes()
            for lane in self._lanes:
                with contextlib.suppress(Exception):
                    await lane.close()
        finally:
            for lane in self._lanes:
                lane.abort()

    async def run(self) -> None:
        """Claim → call → record until asked to stop (DispatchLeader has raised the fence
        and taken back what older leaders left in flight). Stale → StaleLeader."""
        self.started = True
        # The stall clock starts with the dispatch, not with the take-over before it.
        self.last_progress = time.monotonic()
        # Bound before the helpers start: they inherit the context, so their lines carry it.
        structlog.contextvars.bind_contextvars(token=self.token)
        helpers = [
            asyncio.create_task(self._record_loop(), name="dispatch-recorder"),
            asyncio.create_task(self._listen(), name="dispatch-listener"),
            asyncio.create_task(self._reconcile_loop(), name="dispatch-reconcile"),
        ]
        try:
            first, self._first = self._first, []
            if first:
                self._counted(first)
                await self._start_batch(first)
            if self._connecting is not None:
                await self._connecting  # normally done during the take-over; never raises
            await self._claim_loop(helpers)
            await self._drain_gracefully()
        finally:
            # Shielded: the elector cancels this task when it steps down, possibly while we
            # are already unwinding; the final (fenced) writes must still be attempted.
            # _leave is bounded by its own timeouts.
            leaving = asyncio.ensure_future(self._leave(helpers))
            try:
                await asyncio.shield(leaving)
            except asyncio.CancelledError:
                await leaving
                raise

    async def _leave(self, helpers: Sequence[asyncio.Task[None]]) -> None:
        for call in self._calls.values():
            call.cancel()  # abandoned: their results would be fenced out anyway
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*self._calls.values(), *helpers, return_exceptions=True)
        try:
            await self._final_writes()
        finally:
            await self.close()

    async def _claim_loop(self, helpers: Sequence[asyncio.Task[None]]) -> None:
        settings = self.settings
        batch_size = settings.dispatch_batch_size
        while not self.leadership.stopping.is_set():
            if self._lost is not None:
                raise self._lost
            for helper in helpers:
                if helper.done():
                    helper.result()  # a recorder error (StaleLeader...) ends the term
            # Cleared before claiming, so a NOTIFY or a recorded batch that lands while we
            # claim still wakes the wait below.
            self._wake.clear()
            limit = self._in_flight_limit()
            low_water = self._low_water(limit)
            free = limit - len(self._claimed)
            if free >= low_water or (free > 0 and not self._claimed):
                want = min(free, batch_size)
                gap = self._claimed_at + CLAIM_GAP - time.monotonic()
                if gap > 0:
                    await asyncio.sleep(gap)  # coalesce a burst of wake-ups into one claim
                    if self.leadership.stopping.is_set():
                        break
                try:
                    batch = await self._claim(want)
                except (DatabaseUnavailable, TimeoutError) as exc:
                    # Keep the lease through a short Postgres outage: no progress is
                    # recorded, so DispatchLeader ends the term if it lasts past the stall
                    # limit (a leader cut off from Postgres must let another one lead).
                    # The claim may have committed with its answer lost: check next time.
                    self._claim_unsure = True
                    self._outage(exc)
                    await asyncio.sleep(OUTAGE_RETRY)
                    continue
                self._back()
                await self._start_batch(batch)
                if len(batch) == want:
                    self._claimed_at = -CLAIM_GAP
                    continue  # more may be waiting: claim again without sleeping
                self._claimed_at = time.monotonic()

            waiters = [
                asyncio.ensure_future(self._wake.wait()),
                asyncio.ensure_future(self.leadership.stopping.wait()),
            ]
            await asyncio.wait(
                [*waiters, *helpers],
                timeout=self._claim_wait(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in waiters:
                waiter.cancel()

    def _in_flight_limit(self) -> int:
        limit = self._ramp.limit(time.monotonic())
        self.metrics.concurrency_limit.set(limit)
        return limit

    def _low_water(self, limit: int) -> int:
        """Fewest free places worth a claim: top up in sizeable batches, since refilling
        one free place at a time would cost a claim round trip per payment."""
        return max(1, min(self.settings.dispatch_batch_size, limit) // 4)

    def _claim_wait(self) -> float:
        """How long the claim loop may wait for a wake-up: the poll interval, or less when
        only the ramp holds the next claim back (it opens room on its own, and nothing else
        would wake the loop for that). A loop that had room and found the queue empty
        waits for a NOTIFY or the poll, as ever: no polling while the ramp runs."""
        wait = self.settings.dispatch_poll_interval
        now = time.monotonic()
        limit = self._ramp.limit(now)
        needed = len(self._claimed) + self._low_water(limit)
        if needed > limit:
            # inf (never) past the ceiling: then records and the poll wake the loop.
            wait = min(wait, max(RAMP_WAKE_MIN, self._ramp.reaches(needed) - now))
        return wait

    async def _start_batch(self, batch: list[Claimed]) -> None:
        """Call the provider for a claimed batch, a wave at a time."""
        self.last_progress = time.monotonic()
        if not self._first_claimed:
            self._first_claimed = True
            # How long a handover or failover kept charging stopped on our side.
            log.info(
                "token %s: first claim %.0f ms after election (%d due)",
                self.token,
                self._ms_since_election(),
                len(batch),
            )
        # All of the batch counts as claimed before the first wave: a term that ends
        # between waves releases the payments it never called on its way out.
        self._claimed.update(payment.id for payment in batch)
        for started, payment in enumerate(batch):
            if started % CALL_WAVE == 0:
                if started:
                    await asyncio.sleep(0)
                # A term handed over meanwhile starts no more calls (the first batch may
                # reach here after a resign).
                if self.leadership.stopping.is_set():
                    break
            self._start_call(payment)

    def _start_call(self, payment: Claimed) -> None:
        # The call takes itself out of _calls when it ends (no done callback per call: one
        # loop turn less per payment); a task cancelled before it ran stays until _leave.
        self._calls[payment.id] = asyncio.create_task(self._call(payment))

    async def _drain_gracefully(self) -> None:
        """Resigning: no new claims; give calls in flight a bounded time, record them."""
        if self._calls:
            grace = max(0.0, min(self.settings.shutdown_grace * 0.8, self.leadership.remaining()))
            await asyncio.wait(list(self._calls.values()), timeout=grace)
        # The recorder writes what is left at once (no call can add to it any more); what
        # it has not written when the bound passes is written by _final_writes.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(1.0, self.leadership.remaining()))):
                while True:
                    await self._recorder_idle.wait()
                    if self._outcomes.empty():
                        break
                    await asyncio.sleep(0)  # the recorder has yet to take what was queued

    # --- claiming and calling -------------------------------------------------------------

    async def _claim(self, limit: int) -> list[Claimed]:
        horizon = self.retry.horizon.total_seconds()
        now = time.monotonic()
        # After a failed claim (it may have committed unseen), and now and then anyway: a row
        # in flight under our token that no call of ours holds must not wait for the next
        # leader to be recovered. Same task as the claims, so none is under way meanwhile.
        check_untracked = self._claim_unsure or now - self._untracked_checked > UNTRACKED_EVERY
        park = now - self._parked_at >= PARK_INTERVAL
        orphans: list[int] = []
        parked: list[int] = []
        if check_untracked or park:
            timeout = self.leadership.call_timeout(self.settings.db_timeout)
            async with self.fenced.transaction(timeout) as conn:
                if check_untracked:
                    orphans = await payments.release_untracked(
                        conn, token=self.token, known=self._claimed
                    )
                if park:
                    parked = await payments.park_expired(conn, token=self.token, horizon=horizon)
            if check_untracked:
                self._claim_unsure = False
                self._untracked_checked = time.monotonic()
            if park:
                self._parked_at = time.monotonic()
        if orphans:
            log.warning(
                "token %s: re-queued %d payments claimed by a transaction whose answer was lost",
                self.token,
                len(orphans),
            )
        self._parked(parked)
        timeout = self.leadership.call_timeout(self.settings.db_timeout)
        claimed = await self._claim_lane.claim(limit=limit, horizon=horizon, timeout=timeout)
        self._counted(claimed)
        return claimed

    def _counted(self, claimed: list[Claimed]) -> None:
        if claimed:
            self.stats.claimed += len(claimed)
            self.stats.batches += 1
            self.metrics.batch_sizes.observe(len(claimed))

    def _parked(self, parked: list[int]) -> None:
        if parked:
            self.stats.needs_reconciliation += len(parked)
            log.warning(
                "token %s: %d payments too old to re-send safely were parked for a ledger "
                "lookup: %s",
                self.token,
                len(parked),
                parked[:20],
            )

    async def _call(self, payment: Claimed) -> None:
        """One provider call. Every way out ends in an outcome queued for recording, or in
        the end of the term (whose way out releases what is still claimed)."""
        try:
            await self._call_once(payment)
        finally:
            self._calls.pop(payment.id, None)
            if not self._calls and self.leadership.stopping.is_set():
                self._batch_ready.set()  # the last call of a stopping term: record now

    async def _call_once(self, payment: Claimed) -> None:
        # Each call is its own task, so this binding is local to the payment's log lines.
        structlog.contextvars.bind_contextvars(
            payment_id=payment.id, idempotency_key=payment.idempotency_key
        )
        tracing = self.tracing
        if tracing is None:
            outcome = await self._attempt(payment, None)
        else:
            # Parented to the request that created the payment, wherever that ran.
            with tracing.attempt(
                payment_id=payment.id,
                trace_parent=payment.trace_parent,
                token=self.token,
                attempt=payment.attempts,
            ) as trace:
                outcome = await self._attempt(payment, trace)
                trace.settled(outcome)
        if outcome is not None:
            self._outcomes.put_nowait(outcome)
            if self._outcomes.qsize() + 1 >= RECORD_BATCH:
                self._batch_ready.set()

    async def _attempt(self, payment: Claimed, trace: AttemptTrace | None) -> Outcome | None:
        """Call the provider and classify what happened; None if the term ended first."""
        started = datetime.now(UTC)
        try:
            timeout = self.leadership.call_timeout(self.settings.provider_timeout)
            sent = time.perf_counter()
            try:
                if trace is None:
                    charge = await self.provider.charge(payment.request(), timeout=timeout)
                else:
                    charge = await self._traced_charge(payment, timeout, trace)
            finally:
                self._latency.observe(time.perf_counter() - sent)
        except LeadershipLost as exc:
            # Validity ran out before the call: nothing was sent. The term is over; make
            # sure the claim loop ends it too (the way out releases this payment).
            self._lost = exc
            self._wake.set()
            return None
        except ChargeMismatch as exc:
            return self._outcome(
                payment,
                PaymentStatus.NEEDS_RECONCILIATION,
                "mismatch",
                None,
                str(exc),
                exc.status,
                started,
            )
        except (RetryableProviderError, UnknownOutcome) as exc:
            return self._retry_or_park(payment, exc, started)
        except TerminalProviderError as exc:
            return self._outcome(
                payment, PaymentStatus.FAILED, "failed", None, str(exc), exc.status, started
            )
        except Exception as exc:  # a bug or a surprise: the charge may have been made
            log.exception("provider call for payment %s ended unexpectedly", payment.id)
            unknown = UnknownOutcome(f"the call ended unexpectedly: {type(exc).__name__}: {exc}")
            return self._retry_or_park(payment, unknown, started)
        return self._from_charge(payment, charge, started)

    async def _traced_charge(self, payment: Claimed, timeout: float, trace: AttemptTrace) -> Charge:
        """The provider call inside its client span; the span's traceparent goes along."""
        with trace.provider_call(self.provider.charges_url) as call:
            charge = await self.provider.charge(
                payment.request(), timeout=timeout, traceparent=call.traceparent
            )
            call.answered(charge.http_status)
            return charge

    def _from_charge(self, payment: Claimed, charge: Charge, started: datetime) -> Outcome:
        if charge.status == "declined":
            return self._outcome(
                payment,
                PaymentStatus.DECLINED,
                "declined",
                charge.charge_id,
                f"declined: {charge.decline_code or 'no reason given'}",
                charge.http_status,
                started,
            )
        return self._outcome(
            payment,
            PaymentStatus.SUCCEEDED,
            "succeeded",
            charge.charge_id,
            None,
            charge.http_status,
            started,
        )

    def _retry_or_park(
        self, payment: Claimed, exc: RetryableProviderError | UnknownOutcome, started: datetime
    ) -> Outcome:
        kind = "unknown" if isinstance(exc, UnknownOutcome) else "retry"
        now = datetime.now(UTC)
        if self.retry.should_park(payment.attempts, payment.provider_key_issued_at, now):
            # Re-sending past the budget, or near the key's expiry at the provider, could
            # charge twice; look it up instead.
            return self._outcome(
                payment,
                PaymentStatus.NEEDS_RECONCILIATION,
                kind,
                None,
                f"{exc} (after {payment.attempts} attempts)",
                exc.status,
                started,
            )
        delay = self.retry.delay(payment.attempts)
        if isinstance(exc, RetryableProviderError) and exc.retry_after is not None:
            # The provider said when; honour it, within our own cap.
            delay = max(delay, min(exc.retry_after, self.settings.retry_max_delay))
        return self._outcome(
            payment, PaymentStatus.PENDING, kind, None, str(exc), exc.status, started, delay=delay
        )

    def _outcome(
        self,
        payment: Claimed,
        status: PaymentStatus,
        attempt_outcome: str,
        charge_id: str | None,
        error: str | None,
        http_status: int | None,
        started: datetime,
        *,
        delay: float = 0.0,
    ) -> Outcome:
        return Outcome(
            payment.id,
            payment.attempts,
            status,
            attempt_outcome,
            charge_id,
            storable_text(error)[:500] if error else None,
            http_status,
            delay,
            started,
            datetime.now(UTC),
        )

    # --- recording ------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._outcomes.empty():
                self._recorder_idle.set()
            first = await self._outcomes.get()
            self._recorder_idle.clear()
            batch = self._recording = [first]
            # Outcomes wait in the queue until the batch is due: one wake-up per batch (the
            # flush time, a full batch, or the last call of a stopping term), not one per
            # outcome.
            left = self._recorded_at + RECORD_FLUSH - loop.time()
            if left > 0 and not self._batch_due():
                self._batch_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._batch_ready.wait()
            while len(batch) < RECORD_BATCH and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            self._recorded_at = loop.time()
            while True:
                try:
                    await self._record(batch)
                    self._recording = []
                except (DatabaseUnavailable, TimeoutError) as exc:
                    # The same batch again once Postgres answers (recording is idempotent:
                    # only rows still in flight under our token change, attempts once).
                    self._outage(exc)
                    await asyncio.sleep(OUTAGE_RETRY)
                    continue
                self._back()
                # Recording is progress too: with every slot busy no claim runs, and a leader
                # whose writes all fail must still reach its stall limit.
                self.last_progress = time.monotonic()
                break

    def _batch_due(self) -> bool:
        """The recorder need not wait for the flush time: a full batch waits (counting the
        one it holds), or the term is stopping and no call is left to add to it."""
        return self._outcomes.qsize() + 1 >= RECORD_BATCH or (
            not self._calls and self.leadership.stopping.is_set()
        )

    async def _flush_outcomes(self) -> None:
        """Write what the (cancelled) recorder held and what is still queued."""
        batch, self._recording = self._recording, []
        while not self._outcomes.empty():
            batch.append(self._outcomes.get_nowait())
        if batch:
            await self._record(batch)

    async def _record(self, batch: list[Outcome]) -> None:
        await self._record_lane.record(
            node=self.settings.node_id, outcomes=batch, timeout=self.settings.db_timeout
        )
        for outcome in batch:
            self._claimed.discard(outcome.payment_id)
            self._count(outcome)
        self._wake.set()  # room for more claims
        if not self._first_recorded:
            self._first_recorded = True
            # With the first-claim line: where a handover's or failover's time went.
            log.info(
                "token %s: first outcomes recorded %.0f ms after election (%d)",
                self.token,
                self._ms_since_election(),
                len(batch),
            )

    def _ms_since_election(self) -> float:
        return (self.leadership.clock() - self.leadership.elected_at) * 1000

    def _count(self, outcome: Outcome) -> None:
        counter = self._outcome_counters.get(outcome.attempt_outcome)
        if counter is None:  # labels() takes a lock and builds a key: once per outcome
            counter = self.metrics.provider_calls.labels(outcome.attempt_outcome)
            self._outcome_counters[outcome.attempt_outcome] = counter
        counter.inc()
        stats = self.stats
        stats.outcomes[outcome.attempt_outcome] = stats.outcomes.get(outcome.attempt_outcome, 0) + 1
        if outcome.status is PaymentStatus.SUCCEEDED:
            stats.succeeded += 1
        elif outcome.status is PaymentStatus.DECLINED:
            stats.declined += 1
        elif outcome.status is PaymentStatus.FAILED:
            stats.failed += 1
        elif outcome.status is PaymentStatus.PENDING:
            stats.retries += 1
        else:
            stats.needs_reconciliation += 1

    async def _final_writes(self) -> None:
        """On the way out: record what finished and release what did not. Both are fenced:
        after a takeover they are rejected, which is counted and logged, never applied."""
        log.info(
            "token %s: leaving; recording %d finished calls, releasing %d claimed payments",
            self.token,
            self._outcomes.qsize(),
            len(self._claimed),
        )
        # In a Postgres outage the writes most likely fail too: try them briefly rather than
        # hold the lease (and so a stalled term's successor) for the full bound. A lane that
        # lost its session spends up to the checkout ping's 0.5 s on a new one, so then they
        # are as good as skipped: the next leader recovers them under the same provider keys.
        bound = OUTAGE_FINAL_WRITES if self._outage_since is not None else FINAL_WRITES
        try:
            async with asyncio.timeout(min(self.settings.db_timeout, bound)):
                await self._flush_outcomes()
                if self._claimed:
                    async with self.fenced.transaction(None) as conn:
                        await payments.release(conn, token=self.token, ids=self._claimed)
        except StaleLeader:
            pass  # counted and logged in _fenced_out
        except (DatabaseUnavailable, TimeoutError) as exc:
            log.warning(
                "token %s: could not record/release on the way out (the next leader "
                "recovers them): %s",
                self.token,
                exc,
            )

    # --- reconciliation ------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            try:
                await self._reconcile_once()
            except (StaleLeader, LeadershipLost):
                raise  # the term is over
            except (DatabaseUnavailable, TimeoutError) as exc:
                self._outage(exc)  # the next sweep tries again
            except Exception as exc:
                # The sweep reads outside a fenced transaction, so driver errors arrive raw;
                # none of them may end the term (that is for the fence and the lease).
                if isinstance(translate(exc), DatabaseUnavailable):
                    self._outage(exc)
                else:
                    log.exception("token %s: reconcile sweep failed; retrying", self.token)
            else:
                self._back()  # it read and wrote: Postgres answers (else only claims, records)

    async def _reconcile_once(self) -> None:
        swept = await reconcile.sweep(
            self.engine,
            self.provider,
            lookup_timeout=lambda: self.leadership.call_timeout(self.settings.provider_timeout),
            settle=self._settle_reconciled,
            after=self._sweep_after,
            budget=SWEEP_BUDGET,
        )
        self._sweep_after = swept.resume_after

    async def _settle_reconciled(self, settlement: reconcile.Settlement) -> bool:
        """The leader's way of writing a settlement: a fenced write stamped with our token."""
        timeout = self.leadership.call_timeout(self.settings.db_timeout)
        async with self.fenced.transaction(timeout) as conn:
            settled = await payments.settle_reconciled(
                conn,
                token=self.token,
                payment_id=settlement.payment_id,
                status=settlement.status,
                charge_id=settlement.charge_id,
            )
        # Counted as each one lands, so a sweep the fence cuts short still counts its work.
        if settled:
            self.stats.reconciled += 1
        return settled

    # --- plumbing -------------------------------------------------------------------------

    def _outage(self, exc: BaseException) -> None:
        """Postgres did not answer: say so once per outage, not once per retry."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "token %s: Postgres unavailable (%s); keeping the lease and retrying",
                self.token,
                exc,
            )

    def _back(self) -> None:
        if self._outage_since is not None:
            log.info(
                "token %s: Postgres answers again after %.1fs",
                self.token,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def _fenced_out(self, exc: StaleLeader) -> None:
        """A write of this term was refused by the fence: count it, say so."""
        self.stats.stale_writes_rejected += 1
        log.warning("write with token %s rejected by the fence: %s", self.token, exc)

    async def _listen(self) -> None:
        """Wake the claim loop on every insert notification; polling covers the gaps."""
        await listen_forever(
            self.settings.database_url,
            self.settings.notify_channel,
            self._wake.set,
            connect_timeout=self.settings.db_timeout,
            node_id=self.settings.node_id,
        )
