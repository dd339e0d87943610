"""The payments queue: every SQL statement that reads or writes ``payments``, in one place.

Ingest (any replica) only inserts, with no fencing token. Leader statements (claim, record,
recover) carry the leader's token on every row they touch; the fence trigger checks it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.states import PaymentStatus
from app.validation import PaymentRequest

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


@dataclass(frozen=True, slots=True)
class Payment:
    """One row of ``payments``."""

    id: int
    idempotency_key: str
    request_fingerprint: str
    amount: int
    currency: str
    reference: str | None
    description: str | None
    metadata: dict[str, str]
    status: PaymentStatus
    attempts: int
    next_attempt_at: datetime
    fence_token: int | None
    provider_charge_id: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Payment:
        """Build from a SQLAlchemy row selected with PAYMENT_COLUMNS."""
        values = dict(row._mapping)
        metadata = values["metadata"]
        values["metadata"] = json.loads(metadata) if isinstance(metadata, str) else metadata
        values["status"] = PaymentStatus(values["status"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The public representation served by the API."""
        return {
            "id": self.id,
            "status": self.status.value,
            "amount": self.amount,
            "currency": self.currency,
            "reference": self.reference,
            "description": self.description,
            "metadata": self.metadata,
            "attempts": self.attempts,
            "provider_charge_id": self.provider_charge_id,
            "fence_token": self.fence_token,
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "links": {"self": f"/v1/payments/{self.id}"},
        }


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
        return Payment.from_row(row), True
    existing = (await conn.execute(SELECT_BY_KEY, {"key": key})).first()
    if existing is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
        raise RuntimeError(f"payment with idempotency key {key!r} conflicted but is missing")
    return Payment.from_row(existing), False


async def get_payment(conn: AsyncConnection, payment_id: int) -> Payment | None:
    """The payment with ``payment_id``, or None."""
    row = (await conn.execute(SELECT_BY_ID, {"id": payment_id})).first()
    return Payment.from_row(row) if row is not None else None


async def list_payments(
    conn: AsyncConnection, *, status: PaymentStatus | None, after: int, limit: int
) -> list[Payment]:
    """Up to ``limit`` payments with id > ``after`` (keyset pagination), optionally by status."""
    rows = await conn.execute(
        LIST_PAYMENTS,
        {"after": after, "status": status.value if status else None, "limit": limit},
    )
    return [Payment.from_row(row) for row in rows]
