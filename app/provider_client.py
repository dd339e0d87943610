"""Calls to the payment provider, classified into the outcomes the dispatcher acts on.

Every call for a payment sends the payment's own idempotency key and identical parameters,
so any retry — by this leader or the next — is answered with the original result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.errors import RetryableProviderError, TerminalProviderError, UnknownOutcome


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """What is sent for a payment (the same bytes on every attempt)."""

    idempotency_key: str
    amount: int
    currency: str
    reference: str | None
    payment_id: int

    def body(self) -> bytes:
        """The JSON body; ``payment_id`` rides in metadata so the ledger links back to us."""
        return json.dumps(
            {
                "amount": self.amount,
                "currency": self.currency,
                "reference": self.reference,
                "metadata": {"payment_id": str(self.payment_id)},
            },
            sort_keys=True,
        ).encode()


@dataclass(frozen=True, slots=True)
class Charge:
    """A definite result from the provider."""

    charge_id: str
    status: str  # "succeeded" | "declined"
    decline_code: str | None
    http_status: int


class ProviderClient:
    """A thin client over one shared aiohttp session."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def charge(self, request: ChargeRequest, *, timeout: float) -> Charge:
        """POST /v1/charges. Returns a Charge, or raises:

        RetryableProviderError — 409 (same key in progress), 429, 5xx: retry, same key;
        UnknownOutcome — timeout, connection lost, response dropped: retry, same key;
        TerminalProviderError — the provider rejected the request itself (4xx).
        """
        try:
            async with self.session.post(
                f"{self.base_url}/v1/charges",
                data=request.body(),
                headers={
                    "Idempotency-Key": request.idempotency_key,
                    "Content-Type": "application/json",
                },
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError as exc:
            raise UnknownOutcome(f"provider did not answer within {timeout:.2f}s") from exc
        except aiohttp.ClientError as exc:
            raise UnknownOutcome(
                f"provider connection failed: {type(exc).__name__}: {exc}"
            ) from exc
        payload = _decode(raw)
        if status in (200, 201, 402) and isinstance(payload.get("id"), str):
            return Charge(
                charge_id=payload["id"],
                status="declined"
                if status == 402 or payload.get("status") == "declined"
                else "succeeded",
                decline_code=payload.get("decline_code"),
                http_status=status,
            )
        detail = str(
            payload.get("detail") or payload.get("title") or raw[:200].decode(errors="replace")
        )
        if status in (409, 429) or status >= 500:
            raise RetryableProviderError(f"provider answered {status}: {detail}", status=status)
        raise TerminalProviderError(
            f"provider rejected the charge ({status}): {detail}", status=status
        )

    async def find_by_key(self, idempotency_key: str, *, timeout: float) -> Charge | None:
        """Look a charge up in the provider's ledger by idempotency key (reconciliation)."""
        try:
            async with self.session.get(
                f"{self.base_url}/v1/charges",
                params={"idempotency_key": idempotency_key, "limit": "1"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status != 200:
                    raise RetryableProviderError(
                        f"ledger lookup answered {resp.status}", status=resp.status
                    )
                payload = _decode(await resp.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnknownOutcome(f"ledger lookup failed: {exc}") from exc
        for item in payload.get("data", []):
            if item.get("idempotency_key") == idempotency_key:
                return Charge(item["id"], item["status"], item.get("decline_code"), 200)
        return None


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
