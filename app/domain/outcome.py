"""Provider answers → outcomes. Pure: no I/O, no clock, so every answer class is testable.

The dispatcher acts on three families (see ``app.errors``): a definite ``Charge``
(succeeded or declined), a retryable error (same key, later), and a terminal rejection.
Transport failures (timeout, connection lost) never reach this module: the provider client
turns them into ``UnknownOutcome`` before there is an answer to classify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.errors import RetryableProviderError, TerminalProviderError

# Statuses whose body may carry a charge: 200/201 (made or replayed), 402 (declined).
CHARGE_STATUSES = frozenset({200, 201, 402})


@dataclass(frozen=True, slots=True)
class Charge:
    """A definite result from the provider."""

    charge_id: str
    status: str  # "succeeded" | "declined"
    decline_code: str | None
    http_status: int


def decode_body(raw: bytes) -> dict[str, Any]:
    """The answer's JSON object, or {} for an empty, non-JSON or non-object body.

    A body nested deeper than the JSON decoder's recursion limit counts as non-JSON.
    """
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def classify_charge_answer(status: int, raw: bytes) -> Charge:
    """What an answer to ``POST /v1/charges`` means. Returns the Charge, or raises:

    RetryableProviderError — 409 (same key in progress), 429, 5xx: retry, same key;
    TerminalProviderError — any other answer without a usable charge.
    """
    payload = decode_body(raw)
    if status in CHARGE_STATUSES and isinstance(payload.get("id"), str):
        declined = status == 402 or payload.get("status") == "declined"
        return Charge(
            charge_id=payload["id"],
            status="declined" if declined else "succeeded",
            decline_code=payload.get("decline_code"),
            http_status=status,
        )
    detail = str(
        payload.get("detail") or payload.get("title") or raw[:200].decode(errors="replace")
    )
    if status in (409, 429) or status >= 500:
        raise RetryableProviderError(f"provider answered {status}: {detail}", status=status)
    raise TerminalProviderError(f"provider rejected the charge ({status}): {detail}", status=status)


def charge_from_ledger(payload: dict[str, Any], idempotency_key: str) -> Charge | None:
    """The charge filed under ``idempotency_key`` in a ledger page, or None."""
    for item in payload.get("data", []):
        if item.get("idempotency_key") == idempotency_key:
            return Charge(item["id"], item["status"], item.get("decline_code"), 200)
    return None
