"""Provider answers → outcomes. Pure: no I/O, no clock, so every answer class is testable.

The rule (DESIGN.md, "Payment states"): a payment is made final only on an answer that
proves its outcome.

- A charge is recorded only if the answer is a well-formed charge object (non-empty id,
  status ``succeeded`` or ``declined``) **and** it is this payment's: same amount, currency,
  provider key and payment id (:func:`mismatch`). A well-formed charge that is someone
  else's raises :class:`~app.errors.ChargeMismatch` — never a success.
- 409 (same key still processing), 429 and 5xx are retryable with the same key.
- Only an explicit "this request is invalid" — 400 or 422 with the provider's reason in a
  JSON body — is terminal (``failed``).
- Everything else is an unknown outcome: a 2xx without a usable charge, a redirect (never
  followed), 401/403/404/408 from a proxy or rotated credentials, an unparseable body.
  The payment is retried with the same key, which the provider answers with the original
  result, or reconciled by looking the key up.

Transport failures (timeout, connection lost) never reach this module: the provider client
turns them into ``UnknownOutcome`` before there is an answer to classify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.domain.payment import ChargeRequest
from app.errors import (
    ChargeMismatch,
    RetryableProviderError,
    TerminalProviderError,
    UnknownOutcome,
    UnprovenCharge,
)

CHARGE_STATUSES = frozenset({"succeeded", "declined"})
INVALID_REQUEST = frozenset({400, 422})
MAX_ID_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Charge:
    """A definite result from the provider, as it described the charge."""

    charge_id: str
    status: str  # "succeeded" | "declined"
    decline_code: str | None
    http_status: int
    amount: object = None  # as the provider sent them: compared, never trusted
    currency: object = None
    provider_key: object = None
    payment_id: object = None


def decode_body(raw: bytes) -> dict[str, Any]:
    """The answer's JSON object, or {} for an empty, non-JSON or non-object body.

    A body nested deeper than the JSON decoder's recursion limit counts as non-JSON.
    """
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def storable_text(text: str) -> str:
    """``text`` as Postgres text can hold it: no NUL, no unpaired surrogate (a provider's
    words are stored in last_error; one bad byte must not fail a whole batch of writes)."""
    return (
        text.replace("\x00", "\N{REPLACEMENT CHARACTER}").encode("utf-8", "replace").decode("utf-8")
    )


def _is_charge_id(value: object) -> bool:
    """A charge id we can store and quote: a short, printable, encodable string."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and storable_text(value) == value
    )


def parse_charge(payload: dict[str, Any], http_status: int) -> Charge | None:
    """A charge object as a Charge, or None when it is not a well-formed charge."""
    charge_id = payload.get("id")
    status = payload.get("status")
    if http_status == 402 and status is None:
        status = "declined"
    if not _is_charge_id(charge_id):
        return None
    assert isinstance(charge_id, str)
    if status not in CHARGE_STATUSES or (http_status == 402 and status != "declined"):
        return None
    decline_code = payload.get("decline_code")
    metadata = payload.get("metadata")
    return Charge(
        charge_id=charge_id,
        status=str(status),
        decline_code=storable_text(decline_code)[:100] if isinstance(decline_code, str) else None,
        http_status=http_status,
        amount=payload.get("amount"),
        currency=payload.get("currency"),
        provider_key=payload.get("idempotency_key"),
        payment_id=metadata.get("payment_id") if isinstance(metadata, dict) else None,
    )


def mismatch(charge: Charge, request: ChargeRequest) -> str | None:
    """Why ``charge`` is not the charge of ``request``'s payment, or None when it is.

    Every field is compared exactly as sent: a missing field is a mismatch too, since a
    charge that does not say what it charged proves nothing about this payment.
    """
    # (name, found, expected); checked on every charge, so no dicts are built for it.
    fields = (
        ("amount", charge.amount, request.amount),
        ("currency", charge.currency, request.currency),
        ("idempotency key", charge.provider_key, request.provider_key),
        ("payment id", charge.payment_id, str(request.payment_id)),
    )
    differ = [
        f"{name} {found!r} (expected {want!r})"
        for name, found, want in fields
        if type(found) is not type(want) or found != want
    ]
    if not differ:
        return None
    return f"charge {charge.charge_id} does not match the payment: " + ", ".join(differ)


def classify_charge_answer(
    status: int, raw: bytes, request: ChargeRequest, *, retry_after: str | None = None
) -> Charge:
    """What an answer to ``POST /v1/charges`` for ``request`` means.

    Returns this payment's Charge, or raises RetryableProviderError (409/429/5xx, with the
    provider's Retry-After in seconds when it gave one), TerminalProviderError (400/422 with
    a reason), ChargeMismatch (a well-formed charge that is not this payment's) or
    UnknownOutcome (anything else).
    """
    payload = decode_body(raw)
    if status in (200, 201, 402):
        charge = parse_charge(payload, status)
        if charge is None:
            raise UnknownOutcome(
                f"provider answered {status} without a usable charge: {_detail(payload, raw)}",
                status=status,
            )
        reason = mismatch(charge, request)
        if reason is not None:
            raise ChargeMismatch(reason, status=status)
        return charge
    if status in (409, 429) or 500 <= status <= 599:
        raise RetryableProviderError(
            f"provider answered {status}: {_detail(payload, raw)}",
            status=status,
            retry_after=parse_retry_after(retry_after),
        )
    if status in INVALID_REQUEST and _reason(payload):
        raise TerminalProviderError(
            f"provider rejected the charge as invalid ({status}): {_reason(payload)}",
            status=status,
        )
    raise UnknownOutcome(
        f"provider answered {status}, which proves nothing about the charge: "
        f"{_detail(payload, raw)}",
        status=status,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form), or None when absent or unusable."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        return None  # an HTTP date, or nonsense: fall back to our own backoff
    return float(text)


def charge_from_ledger(payload: dict[str, Any], provider_key: str) -> Charge | None:
    """The charge filed under ``provider_key`` in a ledger page, or None when the page has
    none. A page that is not a ledger page raises UnknownOutcome (nothing can be concluded)."""
    items = payload.get("data")
    if not isinstance(items, list):
        raise UnknownOutcome("the provider's ledger answered without a list of charges")
    if any(not isinstance(i, dict) or i.get("idempotency_key") != provider_key for i in items):
        # Asked for one key, answered with others: the filter was not applied, so a missing
        # charge under our key would prove nothing.
        raise UnknownOutcome(
            f"the provider's ledger answered a lookup of key {provider_key} with other charges"
        )
    for item in items:
        if isinstance(item, dict) and item.get("idempotency_key") == provider_key:
            charge = parse_charge(item, 200)
            if charge is not None:
                return charge
            status = item.get("status")
            if _is_charge_id(item.get("id")) and status not in CHARGE_STATUSES:
                raise UnprovenCharge(
                    f"the provider's charge {item['id']} under key {provider_key} has status "
                    f"{status!r}, which proves neither a success nor a decline"
                )
            raise UnknownOutcome(
                f"the provider's ledger lists a malformed charge under key {provider_key}"
            )
    return None


def _reason(payload: dict[str, Any]) -> str:
    """The provider's own words for a rejection ('' when it gave none)."""
    for field in ("detail", "title", "message", "error"):
        value = payload.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()[:300]
    errors = payload.get("errors")
    if isinstance(errors, list) and errors:
        return json.dumps(errors)[:300]
    return ""


def _detail(payload: dict[str, Any], raw: bytes) -> str:
    return _reason(payload) or raw[:200].decode(errors="replace") or "(empty body)"
