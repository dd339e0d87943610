"""The payment as the domain knows it: what a client asks for, the row it becomes, what the
leader claims and what one provider call leads to. No I/O here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import orjson
import pycountry
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from app.domain.states import PaymentStatus

BIGINT_MAX = 2**63 - 1
# The largest amount a provider's JSON consumers hold exactly (IEEE doubles): the stand-in
# provider caps there too. Refused at ingest (422), not discovered at the provider.
AMOUNT_MAX = 2**53 - 1
IDEMPOTENCY_KEY_MAX = 255
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500
METADATA_MAX_BYTES = 4096  # the database allows 8 KiB; we answer 422 well before it


class PaymentRequest(BaseModel):
    """The body of POST /v1/payments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Annotated[StrictInt, Field(gt=0, le=AMOUNT_MAX)]
    currency: StrictStr
    reference: Annotated[StrictStr, Field(max_length=255)] | None = None
    description: Annotated[StrictStr, Field(max_length=1000)] | None = None
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        if len(value) != 3 or not value.isascii() or not value.isalpha():
            raise ValueError("must be a three-letter ISO 4217 code such as EUR")
        if value != value.upper():
            raise ValueError(f"must be upper-case ISO 4217 (did you mean {value.upper()!r}?)")
        if pycountry.currencies.get(alpha_3=value) is None:
            raise ValueError(f"{value!r} is not an ISO 4217 currency code")
        return value

    @field_validator("reference", "description")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold U+0000; say so instead of failing at the INSERT.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain the NUL character (U+0000)")
        return value

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > METADATA_MAX_KEYS:
            raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
        for key, item in value.items():
            if "\x00" in key or "\x00" in item:
                raise ValueError("keys and values must not contain the NUL character (U+0000)")
            if not 1 <= len(key) <= METADATA_KEY_MAX:
                raise ValueError(f"keys must be 1-{METADATA_KEY_MAX} characters")
            if len(item) > METADATA_VALUE_MAX:
                raise ValueError(f"value of {key!r} is longer than {METADATA_VALUE_MAX}")
        if len(json.dumps(value).encode()) > METADATA_MAX_BYTES:
            raise ValueError(f"at most {METADATA_MAX_BYTES} bytes as JSON")
        return value

    def fingerprint(self) -> str:
        """A digest of the normalised request: same digest ⇔ same payment intent."""
        # The same dict as model_dump(mode="json") (every field is JSON-native already),
        # built directly: this runs on every ingest request. The text must never change:
        # stored fingerprints of earlier requests are compared with it.
        fields = {
            "amount": self.amount,
            "currency": self.currency,
            "reference": self.reference,
            "description": self.description,
            "metadata": self.metadata,
        }
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


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
    provider_key: str
    provider_key_issued_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """What is sent for a payment (the same bytes on every attempt).

    ``provider_key`` is the Idempotency-Key the provider sees: generated at ingest and unique
    to the payment for all time, never the client's own key (which can repeat across
    deployments sharing a provider account)."""

    provider_key: str
    amount: int
    currency: str
    reference: str | None
    payment_id: int

    def body(self) -> bytes:
        """The JSON body; ``payment_id`` rides in metadata so the ledger links back to us."""
        return orjson.dumps(
            {
                "amount": self.amount,
                "currency": self.currency,
                "metadata": {"payment_id": str(self.payment_id)},
                "reference": self.reference,
            },
            option=orjson.OPT_SORT_KEYS,
        )


@dataclass(frozen=True, slots=True)
class SentTerms:
    """What identifies a payment to the provider and what it asks it to charge: the same on
    every attempt, and what a charge found or answered must match."""

    id: int
    provider_key: str
    amount: int
    currency: str
    reference: str | None

    def request(self) -> ChargeRequest:
        """The provider request: identical on every attempt of this payment."""
        return ChargeRequest(
            provider_key=self.provider_key,
            amount=self.amount,
            currency=self.currency,
            reference=self.reference,
            payment_id=self.id,
        )


@dataclass(frozen=True, slots=True)
class Claimed(SentTerms):
    """A payment this leader has stamped in_flight."""

    idempotency_key: str  # the client's key: for log lines, never sent to the provider
    provider_key_issued_at: datetime
    attempts: int
    created_at: datetime
    # The W3C traceparent of the ingest span that created the payment (revision 0005), for
    # the leader's spans to continue; None when tracing was off at ingest.
    trace_parent: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one provider call led to, waiting to be recorded."""

    payment_id: int
    attempt: int
    status: PaymentStatus
    attempt_outcome: str
    charge_id: str | None
    error: str | None
    http_status: int | None
    delay: float
    started: datetime
    finished: datetime


@dataclass(frozen=True, slots=True)
class ReconcileCandidate(SentTerms):
    """A needs_reconciliation payment, as reconciliation looks it up in the provider's ledger
    and checks what it finds there."""
