"""The payments queue: every SQL statement on ``payments``, ``payment_attempts`` and
``admin_actions``, in one place, behind typed functions.

Callers pass a ``Connection`` (``app.store.engine``) and get domain types back; the statements
themselves are private (``$n`` parameters, as asyncpg takes them), and rows become dataclasses
by column name, never by position.

Ingest (any replica, ``app.store.ingest``) only inserts, with no fencing token. Leader
statements (park, recover, release, settle; the hot claim and record are in
``app.store.claims``) carry the leader's token on every row they touch and run inside a
fenced transaction
(``app.store.fence.FencedWriter``); the fence trigger checks the token.
Operator statements are stamped with the fence's current token.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from app.domain.payment import Payment, ReconcileCandidate
from app.domain.states import PaymentStatus
from app.store.engine import Connection, Row

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_PAYMENT_COLUMNS = (
    "id, idempotency_key, request_fingerprint, amount, currency, reference, description, "
    "metadata, status, attempts, next_attempt_at, fence_token, provider_charge_id, "
    "last_error, created_at, updated_at, completed_at, provider_key, provider_key_issued_at"
)

_PAYMENT_FIELDS = tuple(name.strip() for name in _PAYMENT_COLUMNS.split(","))

_SELECT_BY_ID = f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = $1"
_LIST_PAYMENTS = f"""
SELECT {_PAYMENT_COLUMNS} FROM payments
WHERE id > $1 AND (CAST($2 AS text) IS NULL OR status = CAST($2 AS text))
ORDER BY id
LIMIT $3
"""


async def get_payment(conn: Connection, payment_id: int) -> Payment | None:
    """The payment with ``payment_id``, or None."""
    row = await conn.fetchrow(_SELECT_BY_ID, payment_id)
    return _payment(row) if row is not None else None


async def list_payments(
    conn: Connection, *, status: PaymentStatus | None, after: int, limit: int
) -> list[Payment]:
    """Up to ``limit`` payments with id > ``after`` (keyset pagination), optionally by status."""
    rows = await conn.fetch(_LIST_PAYMENTS, after, status.value if status else None, limit)
    return [_payment(row) for row in rows]


# --- leader statements: every one stamps or checks the leader's token ---------------------
# Run them inside FencedWriter.transaction (app.store.fence): it opens with the fence
# assertion, so a stale leader's statement fails before it touches a row.

# A pending payment whose provider key is older than the horizon is never sent again: the
# provider may have forgotten the key, and a send would be a new charge. It is parked for a
# ledger lookup instead (no attempt row: nothing was sent).
_PARK_EXPIRED = """
UPDATE payments
SET status = 'needs_reconciliation', fence_token = $1, updated_at = now(),
    last_error = 'not re-sent: its provider key is older than the provider keeps keys; '
                 || 'looked up in the ledger instead'
WHERE status = 'pending' AND provider_key_issued_at < now() - make_interval(secs => $2)
RETURNING id
"""

# Takeover recovery: whatever an older leader left in flight goes back to the queue now,
# with an 'abandoned' attempt row so the audit trail shows the interrupted call. Public for
# claims.prime, which prepares it on the leader's warm sessions.
RECOVER = """
WITH requeued AS (
    UPDATE payments
    SET status = 'pending', next_attempt_at = now(), fence_token = $1,
        updated_at = now(),
        last_error = 'in flight when leadership changed; re-sent with the same key'
    WHERE status = 'in_flight' AND fence_token < $1
    RETURNING id, attempts
)
INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at,
                              finished_at, outcome, error)
SELECT id, attempts, $1, $2, now(), now(), 'abandoned',
       'leader changed while this call was in flight'
FROM requeued WHERE attempts >= 1
ON CONFLICT (payment_id, attempt) DO NOTHING
RETURNING payment_id
"""

# A leader giving up (step-down or resign) puts back what it claimed but did not finish.
_RELEASE = """
UPDATE payments
SET status = 'pending', next_attempt_at = now(), fence_token = $1, updated_at = now(),
    last_error = 'released by a leader stepping down; re-sent with the same key'
WHERE status = 'in_flight' AND fence_token = $1 AND id = ANY(CAST($2 AS bigint[]))
"""

# A claim whose COMMIT landed but whose answer was lost leaves rows in flight under our own
# token that this leader never called: they go back to the queue (takeover recovery only
# takes rows of older tokens).
_RELEASE_UNTRACKED = """
UPDATE payments
SET status = 'pending', next_attempt_at = now(), fence_token = $1, updated_at = now(),
    last_error = 'claimed by a transaction whose answer was lost; never sent, re-queued'
WHERE status = 'in_flight' AND fence_token = $1
  AND NOT (id = ANY(CAST($2 AS bigint[])))
RETURNING id
"""

_RECONCILE_CANDIDATES = """
SELECT id, provider_key, amount, currency, reference FROM payments
WHERE status = 'needs_reconciliation' AND id > $1
ORDER BY id
LIMIT $2
"""

_OLDEST_UNRECONCILED = """
SELECT extract(epoch FROM now() - min(updated_at)) AS age FROM payments
WHERE status = 'needs_reconciliation'
"""

# Ids grow with time, so the lowest id per status is the oldest payment: each subquery is one
# step down payments_status_id_idx, whatever the queue's size (least() skips NULLs).
_OLDEST_UNSETTLED = """
SELECT extract(epoch FROM now() - least(
    (SELECT created_at FROM payments WHERE status = 'pending' ORDER BY id LIMIT 1),
    (SELECT created_at FROM payments WHERE status = 'in_flight' ORDER BY id LIMIT 1)
)) AS age
"""

_SETTLE_RECONCILED = """
UPDATE payments
SET status = $2, provider_charge_id = $3, completed_at = now(),
    last_error = NULL, fence_token = $4, updated_at = now()
WHERE id = $1 AND status = 'needs_reconciliation'
RETURNING id
"""

_COUNT_BY_STATUS = "SELECT status, count(*) AS n FROM payments GROUP BY status"


async def park_expired(conn: Connection, *, token: int, horizon: float) -> list[int]:
    """Move every pending payment whose provider key was issued more than ``horizon``
    seconds ago to needs_reconciliation (it is looked up, never re-sent); their ids."""
    rows = await conn.fetch(_PARK_EXPIRED, token, horizon)
    return [int(row["id"]) for row in rows]


async def release_untracked(conn: Connection, *, token: int, known: Collection[int]) -> list[int]:
    """Re-queue payments in flight under ``token`` that are not in ``known`` (the ones this
    leader is calling): claimed by a transaction whose answer never arrived. Their ids."""
    rows = await conn.fetch(_RELEASE_UNTRACKED, token, sorted(known))
    return [int(row["id"]) for row in rows]


async def recover(conn: Connection, *, token: int, node: str) -> list[int]:
    """Re-queue every payment an older leader (token below ``token``) left in flight, now,
    with an 'abandoned' attempt row for each interrupted call; the ids of those payments."""
    rows = await conn.fetch(RECOVER, token, node)
    return [int(row["payment_id"]) for row in rows]


async def release(conn: Connection, *, token: int, ids: Collection[int]) -> None:
    """Put back the payments of ``ids`` this leader (``token``) claimed but did not finish."""
    await conn.execute(_RELEASE, token, sorted(ids))


async def reconcile_candidates(
    conn: Connection, *, after: int, limit: int
) -> list[ReconcileCandidate]:
    """Up to ``limit`` needs_reconciliation payments with an id above ``after``, by id: a
    sweep pages through all of them with the last id as the cursor, so rows nobody can
    settle never hide the ones behind them."""
    rows = await conn.fetch(_RECONCILE_CANDIDATES, after, limit)
    return [_row_as(ReconcileCandidate, row) for row in rows]


async def oldest_unreconciled_age(conn: Connection) -> float | None:
    """Seconds since the longest-waiting needs_reconciliation payment last changed."""
    age = await conn.fetchval(_OLDEST_UNRECONCILED)
    return float(age) if age is not None else None


async def oldest_unsettled_age(conn: Connection) -> float | None:
    """Seconds since the oldest payment still pending or in flight was accepted (None: the
    queue is empty)."""
    age = await conn.fetchval(_OLDEST_UNSETTLED)
    return float(age) if age is not None else None


async def settle_reconciled(
    conn: Connection, *, token: int, payment_id: int, status: PaymentStatus, charge_id: str
) -> bool:
    """The leader settles a needs_reconciliation payment from the provider's ledger.

    False when the payment is no longer waiting for reconciliation (settled meanwhile).
    """
    row = await conn.fetchrow(_SETTLE_RECONCILED, payment_id, status.value, charge_id, token)
    return row is not None


async def count_by_status(conn: Connection) -> dict[PaymentStatus, int]:
    """How many payments are in each state (every state, zero included)."""
    rows = await conn.fetch(_COUNT_BY_STATUS)
    found = {str(row["status"]): int(row["n"]) for row in rows}
    return {status: found.get(status.value, 0) for status in PaymentStatus}


# --- operator actions (admin API): stamped with the fence's current token --------------------
# An operator is not a leader, but the fence trigger wants every update to say which term it
# belongs to; the current fence token is the honest answer (the action happens "now").

# How old a payment's provider key is and how long since anything was sent under it, both
# by the database's clock (one clock for every replica, the one the claim uses too).
_KEY_AGE = """
SELECT p.updated_at,
       p.provider_key_issued_at < now() - make_interval(secs => $2) AS too_old,
       extract(epoch FROM now() - greatest(
           p.updated_at,
           (SELECT max(a.finished_at) FROM payment_attempts a WHERE a.payment_id = p.id)
       ))::float8 AS quiet_for
FROM payments p WHERE p.id = $1
"""

# With :new_key the payment is sent under a fresh provider key from now on: only after a
# ledger lookup proved the old key was never charged (the provider may have forgotten it).
# :seen is the updated_at the operator's decision was based on: anything since voids it.
_ADMIN_REQUEUE = """
UPDATE payments
SET status = 'pending', next_attempt_at = now(), updated_at = now(),
    last_error = 'retry requested by an operator',
    provider_key = COALESCE(CAST($4 AS text), provider_key),
    provider_key_issued_at = CASE WHEN CAST($4 AS text) IS NULL
                                  THEN provider_key_issued_at ELSE now() END,
    fence_token = (SELECT token FROM leader_fence WHERE name = $2)
WHERE id = $1 AND status IN ('pending', 'needs_reconciliation')
  AND provider_key = $3 AND updated_at = $5
RETURNING status
"""

_ADMIN_SETTLE = """
UPDATE payments
SET status = $2, provider_charge_id = $3, completed_at = now(),
    updated_at = now(), last_error = 'settled by an operator from the provider ledger',
    fence_token = (SELECT token FROM leader_fence WHERE name = $4)
WHERE id = $1 AND status = 'needs_reconciliation'
RETURNING status
"""

_AUDIT = """
INSERT INTO admin_actions (actor, node_id, action, payment_id, outcome, detail)
VALUES ($1, $2, $3, $4, $5, CAST($6 AS jsonb))
"""


@dataclass(frozen=True, slots=True)
class KeyAge:
    """How a payment's provider key stands, by the database's clock."""

    updated_at: datetime  # the row's version the answer belongs to
    too_old: bool  # issued longer ago than the horizon: the provider may have forgotten it
    quiet_for: float  # seconds since the row changed or an attempt under the key ended


async def key_age(conn: Connection, *, payment_id: int, horizon: float) -> KeyAge | None:
    """How old ``payment_id``'s provider key is and how long it has been quiet; None when
    there is no such payment."""
    row = await conn.fetchrow(_KEY_AGE, payment_id, horizon)
    if row is None:
        return None
    return KeyAge(row["updated_at"], bool(row["too_old"]), float(row["quiet_for"]))


async def admin_requeue(
    conn: Connection,
    *,
    payment_id: int,
    fence_name: str,
    old_key: str,
    seen: datetime,
    new_key: str | None = None,
) -> bool:
    """An operator puts a pending or needs_reconciliation payment back in the queue, due now,
    under its provider key ``old_key`` — or under ``new_key`` from now on, when a ledger
    lookup proved ``old_key`` was never charged.

    False when the payment changed since the operator's decision (``seen``, its updated_at):
    claimed, settled, re-keyed or sent meanwhile.
    """
    row = await conn.fetchrow(_ADMIN_REQUEUE, payment_id, fence_name, old_key, new_key, seen)
    return row is not None


async def admin_settle(
    conn: Connection,
    *,
    payment_id: int,
    status: PaymentStatus,
    charge_id: str,
    fence_name: str,
) -> bool:
    """An operator settles a needs_reconciliation payment from the provider's ledger.

    False when the payment is no longer waiting for reconciliation (settled meanwhile).
    """
    row = await conn.fetchrow(_ADMIN_SETTLE, payment_id, status.value, charge_id, fence_name)
    return row is not None


async def audit(
    conn: Connection,
    *,
    actor: str,
    node: str,
    action: str,
    outcome: str,
    payment_id: int | None,
    detail: Mapping[str, Any],
) -> None:
    """Append one operator action to ``admin_actions`` (who, where, what, how it ended)."""
    await conn.execute(_AUDIT, actor, node, action, payment_id, outcome, json.dumps(detail))


# --- rows → domain types -------------------------------------------------------------------

_Row = TypeVar("_Row", bound="DataclassInstance")


def _row_as(cls: type[_Row], row: Row) -> _Row:
    """A row as the dataclass ``cls``, field by column name (extra columns are ignored)."""
    return cls(**{f.name: row[f.name] for f in fields(cls)})


def _payment(row: Row) -> Payment:
    """A row selected with _PAYMENT_COLUMNS as a Payment."""
    values = {name: row[name] for name in _PAYMENT_FIELDS}
    metadata = values["metadata"]
    values["metadata"] = json.loads(metadata) if isinstance(metadata, str) else metadata
    values["status"] = PaymentStatus(values["status"])
    return Payment(**values)
