"""The leader's hot path: claim a batch and record a batch, one round trip each.

Why not a fenced transaction of ``app.store.payments`` (then still on SQLAlchemy): there a
fenced claim cost six round trips (pool ping, BEGIN, ``paydispatch_assert_fence``, the park
sweep, the claim, COMMIT) and so did every record (two statements), plus the ORM's
per-statement work. On this machine a
round trip is a handful of system calls, which dominate CPU per payment. Here each batch is
ONE statement on a raw asyncpg connection (prepared once by asyncpg's statement cache, then
Bind/Execute/Sync in one message), run as its own implicit transaction:

- the fence assertion is part of the statement (``paydispatch_assert_fence`` read by the
  final SELECT, so it runs even when nothing is claimed), and the row triggers check the
  token on every row written, both under the fence row's share lock until commit: a stale
  leader's statement fails as a whole (SQLSTATE PDF01 → StaleLeader), exactly as before;
- claim and record keep their guards: only due, unexpired, pending rows are claimed
  (``FOR UPDATE SKIP LOCKED``); only rows still in flight under this token, at the attempt
  the outcome belongs to, are recorded; attempt rows are appended once (a retried batch is
  harmless).

The park sweep (expired provider keys → needs_reconciliation) is not on this path: the claim
never takes an expired key anyway, so parking them is bookkeeping that runs every few
seconds (``app.store.payments.park_expired``), not once per claim.

Each lane is one connection used by one task at a time (the claim loop has one, the recorder
another), checked out of the leader's pool for the whole term — no reset query per statement —
and given back at its end: the next term on this replica starts on an open session whose
statements are already prepared (a connection set-up costs 40-60 ms here during a failover).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from app.domain.payment import Claimed, Outcome
from app.errors import LeadershipLost, StaleLeader
from app.store import payments
from app.store.engine import Connection, Engine, discard, is_open, translate

_CLAIM = """
WITH batch AS (
    SELECT id FROM payments
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND provider_key_issued_at >= now() - make_interval(secs => $4::float8)
    ORDER BY next_attempt_at, id
    LIMIT $3::int
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE payments AS p
    SET status = 'in_flight', fence_token = $2::bigint, attempts = p.attempts + 1,
        updated_at = now()
    FROM batch
    WHERE p.id = batch.id
    RETURNING p.id, p.idempotency_key, p.provider_key, p.provider_key_issued_at, p.amount,
              p.currency, p.reference, p.attempts, p.created_at, p.trace_parent
)
SELECT claimed.* FROM (SELECT paydispatch_assert_fence($1::text, $2::bigint)) AS fence(token)
LEFT JOIN claimed ON true
"""

_RECORD = """
WITH updated AS (
    UPDATE payments AS p
    SET status = v.status,
        provider_charge_id = COALESCE(v.charge_id, p.provider_charge_id),
        last_error = v.error,
        next_attempt_at = CASE WHEN v.status = 'pending'
                               THEN now() + make_interval(secs => v.delay)
                               ELSE p.next_attempt_at END,
        completed_at = CASE WHEN v.status IN ('succeeded', 'declined', 'failed')
                            THEN now() ELSE NULL END,
        fence_token = $2::bigint,
        updated_at = now()
    FROM unnest($4::bigint[], $5::integer[], $6::text[], $7::text[], $8::text[],
                $9::float8[])
         AS v(id, attempt, status, charge_id, error, delay)
    -- The attempt must be the row's current one: a batch retried after its commit was lost
    -- must not overwrite the outcome of a later call of the same payment.
    WHERE p.id = v.id AND p.status = 'in_flight' AND p.fence_token = $2::bigint
      AND p.attempts = v.attempt
    RETURNING p.id
),
attempts AS (
    INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at,
                                  finished_at, outcome, provider_status, error)
    SELECT v.id, v.attempt, $2::bigint, $3::text, v.started, v.finished, v.outcome, v.http,
           v.error
    FROM unnest($4::bigint[], $5::integer[], $10::timestamptz[], $11::timestamptz[],
                $12::text[], $13::integer[], $8::text[])
         AS v(id, attempt, started, finished, outcome, http, error)
    ON CONFLICT (payment_id, attempt) DO NOTHING
    RETURNING payment_id
)
SELECT fence.token, (SELECT count(*) FROM updated) AS updated,
       (SELECT count(*) FROM attempts) AS appended
FROM (SELECT paydispatch_assert_fence($1::text, $2::bigint)) AS fence(token)
"""


class LeaderLane:
    """One connection of a leader term, for one task's statements (claim or record).

    Takes its connection from the leader's pool on first use; after any failure the
    connection is closed and the next call takes another (a Postgres restart, a timeout that
    left a statement running). Errors come out typed, as from ``FencedWriter.transaction``:
    StaleLeader (``on_stale`` is told first), DatabaseUnavailable, TimeoutError; anything
    unclassified passes unchanged.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        fence_name: str,
        token: int,
        on_stale: Callable[[StaleLeader], None] | None = None,
    ) -> None:
        self._engine = engine
        self.fence_name = fence_name
        self.token = token
        self.on_stale = on_stale
        self._conn: Any = None  # asyncpg.Connection (asyncpg ships no type information)
        # One statement at a time on the connection: a lane's warm-up may still run when its
        # task's first statement comes (asyncpg refuses a second operation meanwhile).
        self._busy = asyncio.Lock()

    async def claim(self, *, limit: int, horizon: float, timeout: float) -> list[Claimed]:
        """Stamp up to ``limit`` due pending payments in_flight under our token (oldest due
        first, locked rows skipped, keys older than ``horizon`` seconds never) and return
        them; fails as a whole when the fence holds a newer token."""
        rows = await self._fetch(
            timeout, _CLAIM, self.fence_name, self.token, limit, float(horizon)
        )
        return _claimed(rows)

    async def record(self, *, node: str, outcomes: Sequence[Outcome], timeout: float) -> None:
        """Record a batch of call outcomes and one attempt row each, in one statement.

        Only payments still in flight under our token at the outcome's attempt change;
        attempt rows are appended once (a repeated attempt number is ignored, so a retried
        batch is harmless).
        """
        await self._fetch(
            timeout, _RECORD, *_record_args(self.fence_name, self.token, node, outcomes)
        )

    async def close(self) -> None:
        """Give the connection back to the leader's pool for the next term (bounded: a dead
        server must not hold the term's exit)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._engine.checkin(conn)
            except BaseException:
                discard(conn)
                raise

    def abort(self) -> None:
        """Close the connection now, without waiting (a cancelled close must not keep a
        place in the pool: six are all a leader has)."""
        self._drop()

    async def _fetch(self, timeout: float, query: str, *args: object) -> list[Any]:
        # The timeout covers the wait for the lane too; a wait that ends there leaves the
        # connection alone (the statement under way is another call's).
        async with asyncio.timeout(timeout), self._busy:
            return await self._run(query, *args)

    async def _run(self, query: str, *args: object) -> list[Any]:
        try:
            conn = await self._connection()
            rows: list[Any] = await conn.fetch(query, *args)
            return rows
        except (LeadershipLost, asyncio.CancelledError, TimeoutError):
            # Cancelled or timed out (the statement may still run), or the term is over:
            # never reuse the connection.
            self._drop()
            raise
        except Exception as exc:
            typed = translate(exc)
            if isinstance(typed, StaleLeader) and self.on_stale is not None:
                self.on_stale(typed)
            if typed is None or not isinstance(typed, StaleLeader):
                self._drop()
            if typed is None:
                raise
            raise typed from exc

    async def _connection(self) -> Any:
        if self._conn is None or not is_open(self._conn):
            self._drop()  # ended by Postgres (a restart, an operator): take another
            self._conn = await self._engine.checkout()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            discard(conn)


async def prime(raw: Any, *, fence_name: str) -> None:
    """Prepare the lanes' statements on ``raw``, a new session of the leader's pool, before
    any term needs it (``DispatchLeader.warm``): each runs once on no rows under the fence's
    current token, so nothing is written and no leader is disturbed (the assertion's share
    lock lasts one statement).

    A session keeps the statements of whatever role it last played in a term — take-over
    (which claims with the lane's statement), claim lane or record lane — and the pool hands
    the roles out in any order, so a handover used to meet a statement new to its session:
    the Parse of the claim took 17 ms and the introspection of the record's array types
    19-31 ms inside handovers at 250 payments/s (Postgres statement log of a kept run).
    Prepared here, both are in every warm session's statement cache before any election,
    with the take-over's recovery statement (the fence raise would write; it is short).
    A session that has all three already is left as it is (one query).
    """
    # Asked of Postgres, not remembered: the session may be a new one with an old one's pid
    # (a restarted Postgres hands pids out again from the same start).
    prepared = await raw.fetchval(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement = ANY($1::text[])",
        _PRIMED,
    )
    if prepared == len(_PRIMED):
        return
    token = await raw.fetchval("SELECT token FROM leader_fence WHERE name = $1", fence_name)
    if token is None:
        return  # no fence to assert (a misconfigured name): the replica refuses to start
    await raw.fetch(_CLAIM, fence_name, token, 0, 0.0)
    await raw.fetch(_RECORD, *_record_args(fence_name, token, "", ()))
    # The take-over's recovery too, for token 0: the schema keeps every fence token at 0 or
    # above (a CHECK on the fence, the triggers on the rows), so none is below it and
    # nothing is re-queued.
    await payments.recover(Connection(raw), token=0, node="")


# What ``prime`` prepares, as asyncpg names them in the session (the query text itself).
_PRIMED = [_CLAIM, _RECORD, payments.RECOVER]


async def claim_in(
    conn: Connection, *, fence_name: str, token: int, limit: int, horizon: float
) -> list[Claimed]:
    """The lane's claim, on ``conn`` inside the caller's transaction: a new leader claims its
    first batch in its take-over transaction, so its first calls start the moment that
    commits (no claim round trip after it). The fence must already be ours there."""
    return _claimed(await conn.fetch(_CLAIM, fence_name, token, limit, float(horizon)))


def _record_args(
    fence_name: str, token: int, node: str, outcomes: Sequence[Outcome]
) -> tuple[object, ...]:
    """_RECORD's parameters, $1 to $13, for ``outcomes`` (one array per column)."""
    return (
        fence_name,
        token,
        node,
        [o.payment_id for o in outcomes],
        [o.attempt for o in outcomes],
        [o.status.value for o in outcomes],
        [o.charge_id for o in outcomes],
        [o.error for o in outcomes],
        [o.delay for o in outcomes],
        [o.started for o in outcomes],
        [o.finished for o in outcomes],
        [o.attempt_outcome for o in outcomes],
        [o.http_status for o in outcomes],
    )


def _claimed(rows: Sequence[Any]) -> list[Claimed]:
    return [
        Claimed(
            id=row[0],
            idempotency_key=row[1],
            provider_key=row[2],
            provider_key_issued_at=row[3],
            amount=row[4],
            currency=row[5],
            reference=row[6],
            attempts=row[7],
            created_at=row[8],
            trace_parent=row[9],
        )
        for row in rows
        if row[0] is not None  # the fence row alone: nothing was due
    ]
