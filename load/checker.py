"""The exactly-once checker: the provider's ledger against the payments table.

Used by the chaos tests, the demo and the load scenarios. It reads; it never fixes anything.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import asyncpg

TERMINAL = ("succeeded", "declined", "failed")


@dataclass
class Verdict:
    """Counts that prove (or disprove) exactly-once; ``ok`` only when every bad count is 0."""

    accepted: int = 0  # payments in Postgres (every acknowledged one must be among them)
    charged: int = 0  # ledger charges that succeeded
    declined: int = 0  # ledger charges that were declined
    duplicates: int = 0  # extra ledger charges for one payment (same key or same payment id)
    lost: int = 0  # acknowledged but missing, or terminal-less and never charged
    mismatched: int = 0  # Postgres outcome differs from the ledger
    stuck: int = 0  # not in a terminal state
    unexpected: int = 0  # ledger charges that belong to no payment
    by_status: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Exactly once: nothing duplicated, lost, mismatched, stuck or unexpected."""
        return not (
            self.duplicates or self.lost or self.mismatched or self.stuck or self.unexpected
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with the verdict spelled out."""
        return {**asdict(self), "exactly_once": self.ok}

    def note(self, kind: str, example: str) -> None:
        """Keep a few examples per problem kind for the report."""
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < 5:
            bucket.append(example)


async def read_ledger(provider_url: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every charge in the provider's ledger, oldest first (follows pagination)."""
    charges: list[dict[str, Any]] = []
    after: Any = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        while True:
            params = {"limit": "1000"}
            if after is not None:
                params["after"] = str(after)
            async with http.get(f"{provider_url.rstrip('/')}/v1/charges", params=params) as r:
                r.raise_for_status()
                page = await r.json()
            charges += page["data"]
            if not page["has_more"]:
                return charges
            after = page["next_after"]


async def read_payments(database_url: str) -> list[dict[str, Any]]:
    """Every payment's keys, status, charge id, amount and currency."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, idempotency_key, provider_key, status, provider_charge_id, amount, currency"
            " FROM payments ORDER BY id"
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def check_exactly_once(
    database_url: str, provider_url: str, acknowledged: Iterable[str] = ()
) -> Verdict:
    """Compare the ledger with the payments table (and the keys clients got a 2xx for)."""
    payments, ledger = await asyncio.gather(read_payments(database_url), read_ledger(provider_url))
    return compare(payments, ledger, acknowledged)


def compare(
    payments: list[dict[str, Any]], ledger: list[dict[str, Any]], acknowledged: Iterable[str] = ()
) -> Verdict:
    """The pure comparison behind check_exactly_once (easy to reason about and to test)."""
    verdict = Verdict(accepted=len(payments))
    # The provider knows a payment by the key paydispatch sent (its provider key); rows from
    # before provider keys existed were sent under the client's key.
    by_key = {_sent_key(p): p for p in payments}
    by_client_key = {p["idempotency_key"]: p for p in payments}
    by_id = {str(p["id"]): p for p in payments}
    verdict.by_status = dict(Counter(p["status"] for p in payments))

    charges_for: dict[str, list[dict[str, Any]]] = {}
    for charge in ledger:
        payment = by_key.get(str(charge.get("idempotency_key")))
        if payment is None:
            # A charge under a foreign key that names one of our payments is a duplicate
            # charge made with the wrong key — the very bug idempotency keys prevent.
            payment_id = (charge.get("metadata") or {}).get("payment_id")
            payment = by_id.get(str(payment_id)) if payment_id is not None else None
        if payment is None:
            verdict.unexpected += 1
            verdict.note("unexpected", str(charge.get("id")))
            continue
        charges_for.setdefault(_sent_key(payment), []).append(charge)
        if charge.get("status") == "declined":
            verdict.declined += 1
        else:
            verdict.charged += 1

    for key in acknowledged:
        if key not in by_client_key:
            verdict.lost += 1
            verdict.note("lost", f"acknowledged key {key} has no payment row")

    for payment in payments:
        charges = charges_for.get(_sent_key(payment), [])
        status = payment["status"]
        if len(charges) > 1:
            verdict.duplicates += len(charges) - 1
            verdict.note("duplicates", f"payment {payment['id']}: {len(charges)} charges")
        if status not in TERMINAL:
            verdict.stuck += 1
            verdict.note("stuck", f"payment {payment['id']} is {status}")
            if not charges:
                verdict.lost += 1
                verdict.note("lost", f"payment {payment['id']} never reached the provider")
            continue
        if status == "failed":
            if charges:
                verdict.mismatched += 1
                verdict.note("mismatched", f"payment {payment['id']} failed but was charged")
            continue
        if not charges:
            verdict.mismatched += 1
            verdict.note("mismatched", f"payment {payment['id']} is {status} with no charge")
            continue
        charge = charges[0]
        if _terms_differ(payment, charge):
            verdict.mismatched += 1
            verdict.note(
                "mismatched",
                f"payment {payment['id']}: {payment.get('amount')} {payment.get('currency')}"
                f" charged as {charge.get('amount')} {charge.get('currency')}",
            )
            continue
        if charge.get("status") != status or charge.get("id") != payment["provider_charge_id"]:
            verdict.mismatched += 1
            verdict.note(
                "mismatched",
                f"payment {payment['id']}: db {status}/{payment['provider_charge_id']}"
                f" vs ledger {charge.get('status')}/{charge.get('id')}",
            )
    return verdict


def _sent_key(payment: dict[str, Any]) -> str:
    """The key the provider was sent for ``payment``."""
    return str(payment.get("provider_key") or payment["idempotency_key"])


def _terms_differ(payment: dict[str, Any], charge: dict[str, Any]) -> bool:
    """True when the charge is for another amount or currency than the payment (fields a
    row or charge does not carry are not compared)."""
    return any(
        field in payment and field in charge and payment[field] != charge[field]
        for field in ("amount", "currency")
    )


async def wait_until_settled(database_url: str, timeout: float, interval: float = 0.2) -> bool:
    """Poll until every payment is terminal (or ``timeout`` passes): nothing pending, in
    flight or waiting for reconciliation."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(database_url, timeout=2)
            try:
                open_count = await conn.fetchval(
                    "SELECT count(*) FROM payments"
                    " WHERE status NOT IN ('succeeded', 'declined', 'failed')"
                )
            finally:
                await conn.close()
            if open_count == 0:
                return True
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass  # Postgres may be restarting in a chaos run
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


def dumps(verdict: Verdict) -> str:
    """One-line JSON of a verdict (for logs and the closing line of a run)."""
    return json.dumps(verdict.to_json(), sort_keys=True)
