"""The payments queue: every SQL statement that reads or writes ``payments``, in one place.

Ingest (any replica) only inserts, with no fencing token. Leader statements (claim, record,
recover) carry the leader's token on every row they touch; the fence trigger checks it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.domain.payment import Payment, PaymentRequest
from app.domain.states import PaymentStatus

PAYMENT_COLUMNS = (
    "id, idempotency_key, request_fingerprint, amount, currency, reference, description, "
    "metadata, status, attempts, next_attempt_at, fence_token, provider_charge_id, "
    "last_error, created_at, updated_at, completed_at"
)

INSERT_PAYMENT = text(
    f"""
    INSERT INTO payments (idempotency_key, request_fingerprint, amount, currency, reference,
                          description, metadata)
    VALUES (:key, :fingerprint, :amount, :currency, :reference, :description,
            CAST(:metadata AS jsonb))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING {PAYMENT_COLUMNS}
    """
)
SELECT_BY_KEY = text(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE idempotency_key = :key")
SELECT_BY_ID = text(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = :id")
LIST_PAYMENTS = text(
    f"""
    SELECT {PAYMENT_COLUMNS} FROM payments
    WHERE id > :after AND (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
    ORDER BY id
    LIMIT :limit
    """
)


async def enqueue(conn: AsyncConnection, key: str, request: PaymentRequest) -> tuple[Payment, bool]:
    """Insert a pending payment under ``key``, or find the one already there.

    Returns (payment, created). Concurrent identical requests are settled by the unique
    constraint: ON CONFLICT waits for the first inserter, then the SELECT sees its row.
    """
    result = await conn.execute(
        INSERT_PAYMENT,
        {
            "key": key,
            "fingerprint": request.fingerprint(),
            "amount": request.amount,
            "currency": request.currency,
            "reference": request.reference,
            "description": request.description,
            "metadata": json.dumps(request.metadata),
        },
    )
    row = result.first()
    if row is not None:
        return _payment(row), True
    existing = (await conn.execute(SELECT_BY_KEY, {"key": key})).first()
    if existing is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
        raise RuntimeError(f"payment with idempotency key {key!r} conflicted but is missing")
    return _payment(existing), False


async def get_payment(conn: AsyncConnection, payment_id: int) -> Payment | None:
    """The payment with ``payment_id``, or None."""
    row = (await conn.execute(SELECT_BY_ID, {"id": payment_id})).first()
    return _payment(row) if row is not None else None


async def list_payments(
    conn: AsyncConnection, *, status: PaymentStatus | None, after: int, limit: int
) -> list[Payment]:
    """Up to ``limit`` payments with id > ``after`` (keyset pagination), optionally by status."""
    rows = await conn.execute(
        LIST_PAYMENTS,
        {"after": after, "status": status.value if status else None, "limit": limit},
    )
    return [_payment(row) for row in rows]


# --- leader statements: every one stamps or checks the leader's token ---------------------

ASSERT_FENCE = text("SELECT paydispatch_assert_fence(:fence, :token)")

CLAIM = text(
    """
    WITH batch AS (
        SELECT id FROM payments
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE payments AS p
    SET status = 'in_flight', fence_token = :token, attempts = p.attempts + 1,
        updated_at = now()
    FROM batch
    WHERE p.id = batch.id
    RETURNING p.id, p.idempotency_key, p.amount, p.currency, p.reference, p.attempts,
              p.created_at
    """
)

# Takeover recovery: whatever an older leader left in flight goes back to the queue now,
# with an 'abandoned' attempt row so the audit trail shows the interrupted call.
RECOVER = text(
    """
    WITH requeued AS (
        UPDATE payments
        SET status = 'pending', next_attempt_at = now(), fence_token = :token,
            updated_at = now(),
            last_error = 'in flight when leadership changed; re-sent with the same key'
        WHERE status = 'in_flight' AND fence_token < :token
        RETURNING id, attempts
    )
    INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at,
                                  finished_at, outcome, error)
    SELECT id, attempts, :token, :node, now(), now(), 'abandoned',
           'leader changed while this call was in flight'
    FROM requeued WHERE attempts >= 1
    ON CONFLICT (payment_id, attempt) DO NOTHING
    RETURNING payment_id
    """
)

# A leader giving up (step-down or resign) puts back what it claimed but did not finish.
RELEASE = text(
    """
    UPDATE payments
    SET status = 'pending', next_attempt_at = now(), fence_token = :token, updated_at = now(),
        last_error = 'released by a leader stepping down; re-sent with the same key'
    WHERE status = 'in_flight' AND fence_token = :token AND id = ANY(CAST(:ids AS bigint[]))
    """
)

RECORD_OUTCOMES = text(
    """
    UPDATE payments AS p
    SET status = v.status,
        provider_charge_id = COALESCE(v.charge_id, p.provider_charge_id),
        last_error = v.error,
        next_attempt_at = CASE WHEN v.status = 'pending'
                               THEN now() + make_interval(secs => v.delay)
                               ELSE p.next_attempt_at END,
        completed_at = CASE WHEN v.status IN ('succeeded', 'declined', 'failed')
                            THEN now() ELSE NULL END,
        fence_token = :token,
        updated_at = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]),
                CAST(:charge_ids AS text[]), CAST(:errors AS text[]),
                CAST(:delays AS float8[])) AS v(id, status, charge_id, error, delay)
    WHERE p.id = v.id AND p.status = 'in_flight' AND p.fence_token = :token
    """
)

RECORD_ATTEMPTS = text(
    """
    INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at,
                                  finished_at, outcome, provider_status, error)
    SELECT v.id, v.attempt, :token, :node, v.started, v.finished, v.outcome, v.http, v.error
    FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
                CAST(:started AS timestamptz[]), CAST(:finished AS timestamptz[]),
                CAST(:outcomes AS text[]), CAST(:https AS integer[]),
                CAST(:errors AS text[])) AS v(id, attempt, started, finished, outcome, http, error)
    ON CONFLICT (payment_id, attempt) DO NOTHING
    """
)

RECONCILE_CANDIDATES = text(
    """
    SELECT id, idempotency_key FROM payments
    WHERE status = 'needs_reconciliation'
    ORDER BY updated_at, id
    LIMIT :limit
    """
)

RECONCILE = text(
    """
    UPDATE payments
    SET status = :status, provider_charge_id = :charge_id, completed_at = now(),
        last_error = :error, fence_token = :token, updated_at = now()
    WHERE id = :id AND status = 'needs_reconciliation'
    """
)

COUNT_BY_STATUS = text("SELECT status, count(*) FROM payments GROUP BY status")


# --- operator actions (admin API): stamped with the fence's current token --------------------
# An operator is not a leader, but the fence trigger wants every update to say which term it
# belongs to; the current fence token is the honest answer (the action happens "now").

ADMIN_RETRY = text(
    """
    UPDATE payments
    SET status = 'pending', next_attempt_at = now(), updated_at = now(),
        last_error = 'retry requested by an operator',
        fence_token = (SELECT token FROM leader_fence WHERE name = :fence)
    WHERE id = :id AND status IN ('pending', 'needs_reconciliation')
    RETURNING status
    """
)

ADMIN_SETTLE = text(
    """
    UPDATE payments
    SET status = :status, provider_charge_id = :charge_id, completed_at = now(),
        updated_at = now(), last_error = 'settled by an operator from the provider ledger',
        fence_token = (SELECT token FROM leader_fence WHERE name = :fence)
    WHERE id = :id AND status = 'needs_reconciliation'
    RETURNING status
    """
)

AUDIT = text(
    """
    INSERT INTO admin_actions (actor, node_id, action, payment_id, outcome, detail)
    VALUES (:actor, :node, :action, :payment_id, :outcome, CAST(:detail AS jsonb))
    """
)


def _payment(row: Any) -> Payment:
    """A row selected with PAYMENT_COLUMNS as a Payment."""
    values = dict(row._mapping)
    metadata = values["metadata"]
    values["metadata"] = json.loads(metadata) if isinstance(metadata, str) else metadata
    values["status"] = PaymentStatus(values["status"])
    return Payment(**values)
