"""The ingest hot path: insert a payment (or find the one already under its key) on a raw
asyncpg pool, with prepared statements and no ORM work per request.

Why not SQLAlchemy, as it was here before: through it each insert paid for a pool
checkout, a greenlet switch, statement compilation-cache lookups and result-row proxies — on
this machine about as much CPU as the rest of the request. Here one insert is one
Bind/Execute/Sync on a connection whose statement cache already holds the INSERT, and the
pool returns connections without asyncpg's reset query (ingest sets no session state and
opens no transaction: each statement commits alone), so no extra round trip either.

Semantics are the SQLAlchemy version's: ``INSERT ... ON CONFLICT (idempotency_key) DO NOTHING
RETURNING``; on a conflict the existing row is read. The provider key comes from the
column default (migration 0003), exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
import orjson

from app.domain.payment import Payment, PaymentRequest
from app.domain.states import PaymentStatus
from app.store.engine import (
    close_pool,
    driver_dsn,
    holding,
    is_outage,
    open_count,
    open_pool,
)

log = logging.getLogger(__name__)

_COLUMNS = (
    "id, idempotency_key, request_fingerprint, amount, currency, reference, description, "
    "metadata::text, status, attempts, next_attempt_at, fence_token, provider_charge_id, "
    "last_error, created_at, updated_at, completed_at, provider_key, provider_key_issued_at"
)
_INSERT = f"""
INSERT INTO payments (idempotency_key, request_fingerprint, amount, currency, reference,
                      description, metadata, trace_parent)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::text)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING {_COLUMNS}
"""
_SELECT_BY_KEY = f"SELECT {_COLUMNS} FROM payments WHERE idempotency_key = $1"
_STATUSES = {status.value: status for status in PaymentStatus}
# Seconds between checks that the warm connections are all open.
WARM_EVERY = 1.0
# Seconds between looks at Postgres while requests wait out an outage (one look for all of
# them: a connection attempt to a stopped server is refused at once and costs little). The
# first look waits this long too, so that a failure the look cannot see (Postgres accepts
# connections but the insert still fails) is not retried in a tight loop.
OUTAGE_PROBE_EVERY = 0.05
# Once an outage has lasted OUTAGE_HOLD times the wait, new requests are answered at once
# until it ends. Not after one wait: a restart of ~2 s against the default wait of 1.5 s
# would then turn the requests of its last half second into errors (a load balancer's
# retries, on replicas that all see the same outage, would be answered at once too).
OUTAGE_HOLD = 2
# Tries of one insert within its wait: an outage that ends and begins again is waited out
# again, a failure that a working Postgres keeps giving is not retried for long.
OUTAGE_TRIES = 3


class IngestStore:
    """A replica's ingest connections. ``open()`` before use, ``close()`` at shutdown.

    ``warm`` connections (at most ``size``) are opened in the background from ``open()`` on,
    kept open however long they idle, and topped up once a second after a Postgres restart
    or a failed connection took some away. Why: a connection set-up costs a Postgres
    process start plus client work (~4 ms of CPU, 6 ms here on a quiet box). Opened on
    demand, they open exactly when a replica's concurrency jumps, which is during a
    failover: the load of a replica that left, retried requests and a busy new leader on
    two shared cores. Each set-up then slowed the requests behind it, which raised the
    concurrency further (measured: up to 15 new Postgres processes in the 150 ms after a
    leader's SIGTERM, in the runs with the slowest fault windows).

    ``outage_wait``: how long a request may wait for Postgres to come back before its error
    is raised (the web layer answers 503). A restart lasts a couple of seconds; answered at
    once, every request in it became a client error (a soak's nine Postgres restarts:
    ~3,400). Waiting is safe because an insert is idempotent by its key: one whose commit
    was lost with the connection is found by the retry, and answered as the replay it then
    is. Only connection failures are waited out (``is_outage``); one probe looks for
    Postgres for all waiting requests; once an outage has lasted OUTAGE_HOLD waits, new
    requests are answered at once until Postgres is back (a long outage must not hold every
    request, on every replica a load balancer retries it on, for the whole wait).
    """

    def __init__(
        self,
        database_url: str,
        *,
        size: int,
        timeout: float,
        server_settings: dict[str, str] | None = None,
        warm: int = 0,
        outage_wait: float = 0.0,
    ) -> None:
        self._dsn = driver_dsn(database_url)
        self._outage_wait = outage_wait
        self._outage_probe: asyncio.Task[None] | None = None
        self._outage_began = 0.0  # monotonic: when the outage under way began
        self._outage_ended = -1e9  # monotonic: when the last probe saw Postgres answer
        self._back = asyncio.Event()
        self._closing = False
        self._size = size
        self._warm = min(warm, size)
        self._timeout = timeout
        self._server_settings = server_settings or {}
        self._pool: Any = None  # asyncpg.Pool (asyncpg ships no type information)
        self._keeping: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Create the pool and start keeping its warm connections; none is awaited here (a
        replica may start while Postgres is still coming up)."""
        self._pool = await open_pool(
            self._dsn,
            size=self._size,
            timeout=self._timeout,
            server_settings=self._server_settings,
            keep_idle=self._warm > 0,
        )
        if self._warm:
            self._keeping = asyncio.create_task(self._keep_warm(), name="ingest-warm")

    async def close(self) -> None:
        """Stop the top-ups, then close every connection (bounded: a dead server must not
        hold shutdown)."""
        self.stop_waiting()
        keeping, self._keeping = self._keeping, None
        probe, self._outage_probe = self._outage_probe, None
        for task in (keeping, probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pool is not None:
            await close_pool(self._pool)

    def stop_waiting(self) -> None:
        """Shutdown has begun: requests waiting for Postgres give up now (the web layer
        answers them 503, which a load balancer retries elsewhere), and none waits again."""
        self._closing = True
        self._back.set()

    @property
    def waiting_for_postgres(self) -> bool:
        """True while an outage is being waited out (a probe looks for Postgres)."""
        return self._outage_probe is not None

    def open_connections(self) -> int:
        """Connections the pool holds open right now (0 before ``open``)."""
        return open_count(self._pool)

    async def _keep_warm(self) -> None:
        while True:
            if self.open_connections() < self._warm:
                await self._fill()
            await asyncio.sleep(WARM_EVERY)

    async def _fill(self) -> None:
        """Hold ``warm`` connections at once, so the pool opens those it lacks, then give
        them all back (``holding``). A failure (Postgres away) ends the round; the next
        second tries again, and requests open what they need meanwhile."""
        async with holding(self._pool, self._warm, self._acquire):
            pass

    async def _acquire(self, pool: Any) -> Any:
        async with asyncio.timeout(self._timeout):
            return await pool.acquire()

    async def enqueue(
        self,
        key: str,
        request: PaymentRequest,
        fingerprint: str,
        trace_parent: str | None = None,
    ) -> tuple[Payment, bool]:
        """Insert a pending payment under ``key``, or find the one already there.

        ``trace_parent`` is the ingest span's W3C context (tracing on), stored for the
        leader's spans; a replayed request leaves the first one's in place.

        Returns (payment, created). Concurrent identical requests are settled by the unique
        constraint: ON CONFLICT waits for the first inserter, then the SELECT sees its row.
        After a connection failure the insert is tried again once Postgres answers, for up
        to ``outage_wait`` seconds from the call; a retry (its pool wait and both
        statements) must end within the store's timeout after that, so a request that
        waited is answered within its first try + ``outage_wait`` + timeout. Then, and for
        every other failure, the driver's error passes unchanged (the web layer maps an
        unavailable database to 503).
        """
        give_up = time.monotonic() + self._outage_wait
        tries = 1
        while True:
            try:
                return await self._enqueue_once(
                    key,
                    request,
                    fingerprint,
                    trace_parent,
                    finish_by=give_up + self._timeout if tries > 1 else None,
                )
            except Exception as exc:
                if (
                    tries >= OUTAGE_TRIES
                    or not is_outage(exc)
                    or not await self._postgres_back(give_up)
                ):
                    raise
                tries += 1

    async def _enqueue_once(
        self,
        key: str,
        request: PaymentRequest,
        fingerprint: str,
        trace_parent: str | None,
        *,
        finish_by: float | None,
    ) -> tuple[Payment, bool]:
        """One try. A retry gives ``finish_by`` (monotonic): its pool wait and statements get
        what is left of it as their timeouts (asyncpg's own, which cancel a statement
        cleanly), however long the server's command timeout is."""

        def left() -> float | None:
            return None if finish_by is None else max(0.05, finish_by - time.monotonic())

        # No timeouts of our own on a first try: asyncpg implements an acquire timeout with
        # wait_for (a task per request), and the wait is bounded anyway: every statement has
        # command_timeout, every connect attempt the pool's connect timeout. A retry has
        # them: it follows an outage with every waiting request at once, all queueing for
        # the pool, and must not run on for the command timeout after its wait.
        async with self._pool.acquire(timeout=left()) as conn:
            row = await conn.fetchrow(
                _INSERT,
                key,
                fingerprint,
                request.amount,
                request.currency,
                request.reference,
                request.description,
                orjson.dumps(request.metadata).decode(),
                trace_parent,
                timeout=left(),
            )
            if row is not None:
                return _payment(row), True
            existing = await conn.fetchrow(_SELECT_BY_KEY, key, timeout=left())
        if existing is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
            raise RuntimeError(f"payment with idempotency key {key!r} conflicted but is missing")
        return _payment(existing), False

    async def _postgres_back(self, give_up: float) -> bool:
        """Wait until Postgres answers again; False at once when the outage has already
        lasted OUTAGE_HOLD waits or shutdown has begun, and False when ``give_up`` (a
        monotonic instant) passes first."""
        now = time.monotonic()
        if self._closing or now >= give_up:
            return False
        if self._outage_probe is None:
            self._back.clear()
            # Postgres answered less than a wait ago: the same outage goes on (a server
            # that accepts sessions but fails statements must not reset the hold, nor log
            # a new outage on every probe).
            resumed = now - self._outage_ended < self._outage_wait
            if not resumed:
                self._outage_began = now
            self._outage_probe = asyncio.create_task(
                self._probe(announce=not resumed), name="ingest-outage"
            )
        if now - self._outage_began >= OUTAGE_HOLD * self._outage_wait:
            return False
        try:
            async with asyncio.timeout(give_up - now):
                await self._back.wait()
        except TimeoutError:
            return False
        return not self._closing

    async def _probe(self, *, announce: bool) -> None:
        """Every OUTAGE_PROBE_EVERY seconds, open a session of its own (the pool's may be
        ones Postgres ended) until one opens; then wake every waiting request. Ends on a
        failure that is no outage too: the requests then meet it themselves and report it.
        ``announce``: a new outage, logged when it begins and ends."""
        if announce:
            log.warning(
                "Postgres unavailable: ingest requests wait for it (up to %.1fs each)",
                self._outage_wait,
            )
        conn: Any = None
        try:
            while conn is None:
                await asyncio.sleep(OUTAGE_PROBE_EVERY)
                try:
                    conn = await asyncpg.connect(
                        self._dsn, timeout=self._timeout, server_settings=self._server_settings
                    )
                except Exception as exc:
                    if is_outage(exc) or isinstance(exc, TimeoutError):
                        continue
                    log.warning("Postgres answers again, with an error: %s", exc)
                    return
            if announce:
                log.info(
                    "Postgres answers again after %.2fs",
                    time.monotonic() - self._outage_began,
                )
        finally:
            # Waiters first: closing the probe's session must not hold them.
            self._outage_probe = None
            self._outage_ended = time.monotonic()
            self._back.set()
        with contextlib.suppress(Exception):  # it opened: that was the answer
            await conn.close(timeout=self._timeout)


def _payment(row: Any) -> Payment:
    """A row selected with _COLUMNS as a Payment (by position: the column list is above)."""
    return Payment(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        orjson.loads(row[7]),
        _STATUSES[row[8]],
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        row[15],
        row[16],
        row[17],
        row[18],
    )
