"""Reconciliation: settle a needs_reconciliation payment from the provider's ledger.

A payment lands in needs_reconciliation when its outcome stayed unknown past the attempt
budget, when its provider key is too old to be re-sent safely, or when the provider answered
with a charge that was not the payment's. Nothing is re-sent here: the charge filed under the
payment's provider key is looked up, checked against the payment (amount, currency, key,
payment id) exactly as a charge answer is, and only a matching charge settles the payment.

Both the leader's periodic sweep and the operator's admin endpoint go through
``reconcile_one``; they differ only in how the settlement is written (a fenced leader write,
or an operator write stamped with the fence's current token), which each passes in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.dispatch.provider import ProviderClient
from app.domain.outcome import mismatch
from app.domain.payment import ReconcileCandidate
from app.domain.states import PaymentStatus
from app.errors import ProviderError
from app.store import payments
from app.store.engine import Engine

log = logging.getLogger(__name__)

PAGE = 50  # candidates read per query; a sweep pages through all of them


@dataclass(frozen=True, slots=True)
class Settlement:
    """The terminal state the provider's ledger proves for one payment."""

    payment_id: int
    status: PaymentStatus
    charge_id: str


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What reconciling one payment found and did."""

    settlement: Settlement | None  # None: nothing in the ledger settles it (see ``why``)
    applied: bool  # False: not settled, or the payment moved on before the write
    why: str | None = None  # why it was not settled, in an operator's words


# Writes a settlement; False when the payment was no longer waiting for reconciliation.
Settle = Callable[[Settlement], Awaitable[bool]]


async def reconcile_one(
    provider: ProviderClient, candidate: ReconcileCandidate, *, timeout: float, settle: Settle
) -> Reconciled:
    """Look ``candidate``'s charge up by its provider key and, if it is the payment's own,
    ``settle`` it.

    Raises ProviderError when the ledger cannot be read or answers something unusable
    (nothing is written then); whatever ``settle`` raises passes through.
    """
    charge = await provider.find_by_key(candidate.provider_key, timeout=timeout)
    if charge is None:
        return Reconciled(
            None,
            applied=False,
            why=f"the provider has no charge under key {candidate.provider_key}",
        )
    reason = mismatch(charge, candidate.request())
    if reason is not None:
        return Reconciled(None, applied=False, why=reason)
    status = PaymentStatus.DECLINED if charge.status == "declined" else PaymentStatus.SUCCEEDED
    settlement = Settlement(candidate.id, status, charge.charge_id)
    return Reconciled(settlement, applied=await settle(settlement))


@dataclass(frozen=True, slots=True)
class Swept:
    """What one pass of the sweep did, and where the next pass starts."""

    settled: int
    resume_after: int  # the next pass starts after this id (0: from the beginning)


async def sweep(
    engine: Engine,
    provider: ProviderClient,
    *,
    lookup_timeout: Callable[[], float],
    settle: Settle,
    after: int = 0,
    budget: float = 30.0,
    page: int = PAGE,
) -> Swept:
    """One pass of the leader's sweep over the candidates after id ``after``, by id.

    A candidate nothing in the ledger settles is left for an operator; a failed lookup is
    skipped (logged) and retried on a later pass — neither holds up the rows behind it. A
    pass stops after ``budget`` seconds and the next one resumes where it stopped, so a
    slow ledger or a long list never blocks the sweep for long, and every candidate is
    reached in turn. ``lookup_timeout`` is asked before every lookup, so the leader can
    bound each one by its remaining validity (and raise when none is left).
    """
    stop_at = time.monotonic() + budget
    settled = 0
    while True:
        async with engine.connect() as conn:
            candidates = await payments.reconcile_candidates(conn, after=after, limit=page)
        for candidate in candidates:
            if time.monotonic() >= stop_at:
                return Swept(settled, resume_after=after)
            try:
                done = await reconcile_one(
                    provider, candidate, timeout=lookup_timeout(), settle=settle
                )
            except ProviderError as exc:
                log.warning("reconcile of payment %s deferred: %s", candidate.id, exc)
            else:
                settled += done.applied
                if done.why is not None:
                    log.debug("payment %s not reconciled: %s", candidate.id, done.why)
            after = candidate.id
        if len(candidates) < page:
            return Swept(settled, resume_after=0)  # the end: the next pass starts over
