"""The ingest answer's fast encoder writes the document the response model describes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from app.domain.payment import Payment
from app.domain.states import PaymentStatus
from app.web.schemas import body_text, payment_body, payment_json


def _payment(**changes: object) -> Payment:
    base: dict[str, object] = {
        "id": 42,
        "idempotency_key": "k-1",
        "request_fingerprint": "fp",
        "amount": 1234,
        "currency": "EUR",
        "reference": 'ref \u00e9\u2603 "quoted"',
        "description": None,
        "metadata": {"cart": "7", "emoji": "\U0001f600"},
        "status": PaymentStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
        "fence_token": None,
        "provider_charge_id": None,
        "last_error": None,
        "created_at": datetime(2026, 11, 30, 6, 0, 0, 123456, tzinfo=UTC),
        "updated_at": datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
        "completed_at": None,
        "provider_key": "pk",
        "provider_key_issued_at": datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
    }
    base.update(changes)
    return Payment(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payment",
    [
        _payment(),
        _payment(
            status=PaymentStatus.SUCCEEDED,
            attempts=3,
            fence_token=7,
            provider_charge_id="ch_1",
            last_error="x" * 500,
            description="d",
            completed_at=datetime(2026, 12, 1, tzinfo=UTC),
        ),
    ],
)
def test_the_fast_payment_encoder_writes_the_models_document(payment: Payment) -> None:
    fast = json.loads(payment_json(payment))
    model = json.loads(body_text(payment_body(payment)))
    assert fast == model
    assert list(fast) == list(model)  # the same field order, too


def test_the_fingerprint_is_the_digest_of_the_models_canonical_dump() -> None:
    """Fingerprints of stored payments were made from model_dump; they must still match."""
    import hashlib

    from app.domain.payment import PaymentRequest

    request = PaymentRequest(
        amount=5, currency="EUR", reference="\u00e9\x01", metadata={"b": "2", "a": "\u2603"}
    )
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert request.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
