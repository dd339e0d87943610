"""Operator actions behind the admin key: retry, reconcile, leader handover. Each one is
recorded in ``admin_actions`` (who — a key fingerprint, never the key — what, outcome)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from aiohttp import web

from app.dispatch.dispatcher import retry_policy
from app.dispatch.provider import ProviderClient
from app.dispatch.reconcile import Settlement, reconcile_one
from app.domain.payment import Payment, ReconcileCandidate
from app.domain.states import PaymentStatus
from app.errors import ProviderError, UnprovenCharge
from app.settings import Settings
from app.store import payments
from app.web.auth import bearer_token
from app.web.params import parse_id
from app.web.problems import problem
from app.web.schemas import HandedOver, Reconciled, Requeued, json_response
from app.web.state import ELECTOR, ENGINE, OBSERVER, SETTINGS


# What an operator's reconcile may write: the ledger proves one of these, or nothing is written.
def rotation_quiet_period(settings: Settings) -> float:
    """Seconds a payment's key must have been quiet (no attempt, no change) before a ledger
    lookup that finds nothing counts as proof that nothing is being charged under it."""
    return max(60.0, 4 * settings.provider_timeout)


def actor(request: web.Request) -> str:
    """A stable, non-secret name for the key that made the request."""
    token = bearer_token(request) or "anonymous"
    return "key:" + hashlib.sha256(token.encode()).hexdigest()[:12]


async def audit(
    request: web.Request,
    action: str,
    outcome: str,
    payment_id: int | None = None,
    **detail: Any,
) -> None:
    """Append one admin action to the audit table."""
    async with request.app[ENGINE].transaction() as conn:
        await payments.audit(
            conn,
            actor=actor(request),
            node=request.app[SETTINGS].node_id,
            action=action,
            outcome=outcome,
            payment_id=payment_id,
            detail=detail,
        )


def _payment_id(request: web.Request) -> int | None:
    # The shared parser: an id that is no positive 63-bit integer names no payment (404),
    # however long it is.
    return parse_id(request.match_info["id"])


async def _load(request: web.Request, payment_id: int | None) -> Payment | None:
    if payment_id is None:
        return None
    async with request.app[ENGINE].connect() as conn:
        return await payments.get_payment(conn, payment_id)


async def retry_payment(request: web.Request) -> web.Response:
    """POST /v1/admin/payments/{id}/retry — re-queue a pending or needs_reconciliation
    payment now. It is re-sent with its own provider key, so a charge already made is
    answered, not repeated — while the provider still keeps that key. A payment whose key
    is older than that is re-sent only when a ledger lookup proves no charge exists under
    it, and then under a fresh key; a charge found means: reconcile it instead."""
    payment = await _load(request, _payment_id(request))
    settings = request.app[SETTINGS]
    if payment is None:
        return problem(404, "Payment not found", f"no payment has id {request.match_info['id']!r}")
    if payment.status not in (PaymentStatus.PENDING, PaymentStatus.NEEDS_RECONCILIATION):
        await audit(request, "retry", "refused", payment.id, status=payment.status.value)
        return problem(
            409,
            "Payment cannot be retried",
            f"payment {payment.id} is {payment.status.value}; only pending and "
            "needs_reconciliation payments can be retried",
        )
    horizon = retry_policy(settings).horizon.total_seconds()
    async with request.app[ENGINE].connect() as conn:
        age = await payments.key_age(conn, payment_id=payment.id, horizon=horizon)
    if age is None:  # pragma: no cover - payments are never deleted
        return problem(404, "Payment not found", f"no payment has id {payment.id}")
    new_key = None
    if age.too_old:
        # "No charge in the ledger" proves nothing while a request under the key may still
        # be processing at the provider (a charge in progress is not listed yet): only a
        # key that has been quiet well past any call's timeout may be looked up and retired.
        quiet_needed = rotation_quiet_period(settings)
        if age.quiet_for < quiet_needed:
            await audit(request, "retry", "refused_too_recent", payment.id)
            return problem(
                409,
                "Payment was sent too recently to prove it was not charged",
                f"payment {payment.id} is too old to re-send under its key, and its last "
                f"attempt was {age.quiet_for:.0f}s ago: a charge may still be in progress. "
                f"Retry after {quiet_needed - age.quiet_for:.0f}s",
                headers={"Retry-After": str(int(quiet_needed - age.quiet_for) + 1)},
            )
        try:
            async with ProviderClient(settings.provider_url, connections=1) as provider:
                charge = await provider.find_by_key(
                    payment.provider_key, timeout=settings.provider_timeout
                )
        except ProviderError as exc:
            await audit(request, "retry", "provider_unavailable", payment.id, error=str(exc))
            return problem(
                503,
                "Provider unavailable",
                f"payment {payment.id} is too old to re-send without first proving that no "
                f"charge exists, and the provider's ledger could not be read: {exc}",
                headers={"Retry-After": "5"},
            )
        if charge is not None:
            await audit(request, "retry", "refused_charge_exists", payment.id)
            return problem(
                409,
                "A charge exists for this payment",
                f"the provider holds charge {charge.charge_id} under this payment's key: "
                "reconcile the payment instead of sending it again",
            )
        new_key = str(uuid.uuid4())
    async with request.app[ENGINE].transaction() as conn:
        requeued = await payments.admin_requeue(
            conn,
            payment_id=payment.id,
            fence_name=settings.fence_name,
            old_key=payment.provider_key,
            seen=age.updated_at,
            new_key=new_key,
        )
    if not requeued:  # it moved on between the read and the write (claimed, settled)
        return problem(409, "Payment changed meanwhile", "read it again and decide again")
    outcome = "requeued" if new_key is None else "requeued_under_new_key"
    await audit(request, "retry", outcome, payment.id, previous=payment.status.value)
    return json_response(Requeued(id=payment.id, status="pending", previous=payment.status.value))


async def reconcile_payment(request: web.Request) -> web.Response:
    """POST /v1/admin/payments/{id}/reconcile — settle a needs_reconciliation payment from the
    provider's ledger (looked up by idempotency key); nothing is re-sent."""
    payment = await _load(request, _payment_id(request))
    settings = request.app[SETTINGS]
    if payment is None:
        return problem(404, "Payment not found", f"no payment has id {request.match_info['id']!r}")
    if payment.status is not PaymentStatus.NEEDS_RECONCILIATION:
        await audit(request, "reconcile", "refused", payment.id, status=payment.status.value)
        return problem(
            409,
            "Nothing to reconcile",
            f"payment {payment.id} is {payment.status.value}, not needs_reconciliation",
        )

    async def settle(settlement: Settlement) -> bool:
        async with request.app[ENGINE].transaction() as conn:
            return await payments.admin_settle(
                conn,
                payment_id=settlement.payment_id,
                status=settlement.status,
                charge_id=settlement.charge_id,
                fence_name=settings.fence_name,
            )

    candidate = ReconcileCandidate(
        payment.id, payment.provider_key, payment.amount, payment.currency, payment.reference
    )
    try:
        async with ProviderClient(settings.provider_url, connections=1) as provider:
            done = await reconcile_one(
                provider,
                candidate,
                timeout=settings.provider_timeout,
                settle=settle,
            )
    except UnprovenCharge as exc:
        await audit(request, "reconcile", "not_settleable", payment.id, error=str(exc))
        return problem(
            422,
            "Ledger does not settle the payment",
            f"{exc}; payment {payment.id} stays needs_reconciliation: check the charge at the "
            "provider before deciding",
        )
    except ProviderError as exc:
        await audit(request, "reconcile", "provider_unavailable", payment.id, error=str(exc))
        return problem(503, "Provider unavailable", str(exc), headers={"Retry-After": "5"})
    if done.settlement is None:
        await audit(request, "reconcile", "not_settled", payment.id, why=done.why)
        return problem(
            409,
            "Nothing in the provider's ledger settles this payment",
            f"{done.why}; retry the payment (the same key while the provider keeps it) or "
            "leave it for investigation",
        )
    if not done.applied:
        return problem(409, "Payment changed meanwhile", "read it again and decide again")
    settled = done.settlement
    await audit(request, "reconcile", settled.status.value, payment.id, charge_id=settled.charge_id)
    return json_response(
        # Validated, not constructed: the ledger's status is a plain str that must be one
        # of the two the document allows.
        Reconciled.model_validate(
            {"id": payment.id, "status": settled.status, "provider_charge_id": settled.charge_id}
        )
    )


async def resign_leader(request: web.Request) -> web.Response:
    """POST /v1/admin/leader/resign — the leader hands over at once (graceful, like SIGTERM)
    and campaigns again behind the new leader. Send it to the leader (see /v1/leader)."""
    token = request.app[ELECTOR].handover()
    if token is None:
        leader = request.app[OBSERVER].confirmed_leader()
        await audit(request, "leader_resign", "not_leader")
        where = f" the leader is {leader.node_id} at {leader.url}" if leader else " none leads"
        return problem(409, "Not the leader", f"this replica does not lead;{where}")
    await audit(request, "leader_resign", "handed_over", token=token)
    return json_response(HandedOver(node_id=request.app[SETTINGS].node_id, handed_over_token=token))


def add_admin_routes(app: web.Application) -> None:
    """Register the admin routes (the auth middleware demands an admin key for them)."""
    app.router.add_post("/v1/admin/payments/{id}/retry", retry_payment)
    app.router.add_post("/v1/admin/payments/{id}/reconcile", reconcile_payment)
    app.router.add_post("/v1/admin/leader/resign", resign_leader)
