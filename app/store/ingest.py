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
from typing import Any

import orjson

from app.domain.payment import Payment, PaymentRequest
from app.domain.states import PaymentStatus
from app.store.engine import close_pool, driver_dsn, holding, open_count, open_pool

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
    """

    def __init__(
        self,
        database_url: str,
        *,
        size: int,
        timeout: float,
        server_settings: dict[str, str] | None = None,
        warm: int = 0,
    ) -> None:
        self._dsn = driver_dsn(database_url)
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
        keeping, self._keeping = self._keeping, None
        if keeping is not None:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
        if self._pool is not None:
            await close_pool(self._pool)

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
        Driver errors pass unchanged (the web layer maps an unavailable database to 503).
        """
        # No acquire timeout: asyncpg implements it with wait_for (a task per request), and
        # the wait is bounded anyway: every statement has command_timeout, every connect
        # attempt the pool's connect timeout.
        async with self._pool.acquire() as conn:
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
            )
            if row is not None:
                return _payment(row), True
            existing = await conn.fetchrow(_SELECT_BY_KEY, key)
        if existing is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
            raise RuntimeError(f"payment with idempotency key {key!r} conflicted but is missing")
        return _payment(existing), False


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
