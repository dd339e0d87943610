"""Reconciliation: settle a needs_reconciliation payment from the provider's ledger.

A payment lands in needs_reconciliation when its outcome stayed unknown past the attempt
budget or the provider's key retention. Nothing is re-sent here: the charge filed under the
payment's idempotency key is looked up, and the payment is settled from it. Both the leader's
periodic sweep and the operator's admin endpoint go through ``reconcile_one``; they differ
only in how the settlement is written (a fenced leader write, or an operator write stamped
with the fence's current token), which each passes in as ``settle``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.dispatch.provider import ProviderClient
from app.domain.outcome import Charge
from app.domain.payment import ReconcileCandidate
from app.domain.states import PaymentStatus
from app.errors import RetryableProviderError, UnknownOutcome
from app.store import payments
from app.store.engine import Engine

log = logging.getLogger(__name__)

SWEEP_BATCH = 50  # candidates looked at per sweep, the longest untouched first


@dataclass(frozen=True, slots=True)
class Settlement:
    """The terminal state the provider's ledger proves for one payment."""

    payment_id: int
    status: PaymentStatus
    charge_id: str


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What reconciling one payment found and did."""

    settlement: Settlement | None  # None: the ledger holds no charge under the key
    applied: bool  # False: no charge, or the payment moved on before the write


# Writes a settlement; False when the payment was no longer waiting for reconciliation.
Settle = Callable[[Settlement], Awaitable[bool]]


class UnprovenCharge(UnknownOutcome):
    """The ledger files a charge under the key, but its status proves neither a success nor a
    decline; the payment stays waiting for reconciliation."""


# The only ledger statuses that settle a payment.
_SETTLING = {"succeeded": PaymentStatus.SUCCEEDED, "declined": PaymentStatus.DECLINED}


def settlement_for(payment_id: int, charge: Charge) -> Settlement:
    """How a charge found in the ledger settles its payment: declined → declined, succeeded →
    succeeded; any other status raises UnprovenCharge (an unknown outcome, never a guess).

    The one place where a ledger entry becomes a terminal state, for both callers: a check
    that the charge really belongs to the payment (amount, currency, key) belongs here.
    """
    status = _SETTLING.get(charge.status)
    if status is None:
        raise UnprovenCharge(
            f"the provider's charge {charge.charge_id} has status {charge.status!r}, which "
            "proves neither a success nor a decline"
        )
    return Settlement(payment_id, status, charge.charge_id)


async def reconcile_one(
    provider: ProviderClient, candidate: ReconcileCandidate, *, timeout: float, settle: Settle
) -> Reconciled:
    """Look ``candidate``'s charge up by idempotency key and, if there is one, ``settle`` it.

    Raises RetryableProviderError or UnknownOutcome when the ledger cannot be read (nothing
    is written then); whatever ``settle`` raises passes through.
    """
    charge = await provider.find_by_key(candidate.idempotency_key, timeout=timeout)
    if charge is None:
        return Reconciled(None, applied=False)  # never charged: an operator decides
    settlement = settlement_for(candidate.id, charge)
    return Reconciled(settlement, applied=await settle(settlement))


async def sweep(
    engine: Engine,
    provider: ProviderClient,
    *,
    lookup_timeout: Callable[[], float],
    settle: Settle,
    limit: int = SWEEP_BATCH,
) -> int:
    """One pass of the leader's sweep over the oldest ``limit`` candidates; how many it settled.

    A candidate with no charge at the provider is left for an operator. The first failed
    lookup ends the pass (logged): the provider is likely down for the rest too, and the
    next pass tries again. ``lookup_timeout`` is asked before every lookup, so the leader
    can bound each one by its remaining validity (and raise when none is left).
    """
    async with engine.connect() as conn:
        candidates = await payments.reconcile_candidates(conn, limit=limit)
    settled = 0
    for candidate in candidates:
        try:
            done = await reconcile_one(provider, candidate, timeout=lookup_timeout(), settle=settle)
        except (RetryableProviderError, UnknownOutcome) as exc:
            log.warning("reconcile of payment %s deferred: %s", candidate.id, exc)
            break
        settled += done.applied
    return settled
