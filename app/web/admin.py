"""Operator actions behind the admin key: retry, reconcile, leader handover. Each one is
recorded in ``admin_actions`` (who — a key fingerprint, never the key — what, outcome)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
from aiohttp import web

from app.dispatch.provider import ProviderClient
from app.domain.payment import Payment
from app.domain.states import PaymentStatus
from app.errors import RetryableProviderError, UnknownOutcome
from app.store import payments as queue
from app.web.auth import bearer_token
from app.web.problems import problem
from app.web.schemas import HandedOver, Reconciled, Requeued, json_response
from app.web.state import ELECTOR, ENGINE, OBSERVER, SETTINGS


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
    async with request.app[ENGINE].begin() as conn:
        await conn.execute(
            queue.AUDIT,
            {
                "actor": actor(request),
                "node": request.app[SETTINGS].node_id,
                "action": action,
                "payment_id": payment_id,
                "outcome": outcome,
                "detail": json.dumps(detail),
            },
        )


def _payment_id(request: web.Request) -> int | None:
    raw = request.match_info["id"]
    return int(raw) if raw.isascii() and raw.isdigit() and 0 < int(raw) < 2**63 else None


async def _load(request: web.Request, payment_id: int | None) -> Payment | None:
    if payment_id is None:
        return None
    async with request.app[ENGINE].connect() as conn:
        return await queue.get_payment(conn, payment_id)


async def retry_payment(request: web.Request) -> web.Response:
    """POST /v1/admin/payments/{id}/retry — re-queue a pending or needs_reconciliation
    payment now. It is re-sent with its own idempotency key, so a charge already made is
    answered, not repeated (within the provider's key retention)."""
    payment = await _load(request, _payment_id(request))
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
    async with request.app[ENGINE].begin() as conn:
        row = (
            await conn.execute(
                queue.ADMIN_RETRY,
                {
                    "id": payment.id,
                    "fence": request.app[SETTINGS].fence_name,
                },
            )
        ).first()
    if row is None:  # it moved on between the read and the write (claimed, settled)
        return problem(409, "Payment changed meanwhile", "read it again and decide again")
    await audit(request, "retry", "requeued", payment.id, previous=payment.status.value)
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
    try:
        async with aiohttp.ClientSession() as http:
            charge = await ProviderClient(settings.provider_url, http).find_by_key(
                payment.idempotency_key, timeout=settings.provider_timeout
            )
    except (RetryableProviderError, UnknownOutcome) as exc:
        await audit(request, "reconcile", "provider_unavailable", payment.id, error=str(exc))
        return problem(503, "Provider unavailable", str(exc), headers={"Retry-After": "5"})
    if charge is None:
        await audit(request, "reconcile", "no_charge_found", payment.id)
        return problem(
            409,
            "No charge at the provider",
            f"the provider has no charge for key {payment.idempotency_key!r}; "
            "retry the payment (same key) or leave it for investigation",
        )
    async with request.app[ENGINE].begin() as conn:
        row = (
            await conn.execute(
                queue.ADMIN_SETTLE,
                {
                    "id": payment.id,
                    "status": charge.status,
                    "charge_id": charge.charge_id,
                    "fence": settings.fence_name,
                },
            )
        ).first()
    if row is None:
        return problem(409, "Payment changed meanwhile", "read it again and decide again")
    await audit(request, "reconcile", charge.status, payment.id, charge_id=charge.charge_id)
    return json_response(
        # Validated, not constructed: the ledger's status is a plain str that must be one
        # of the two the document allows.
        Reconciled.model_validate(
            {"id": payment.id, "status": charge.status, "provider_charge_id": charge.charge_id}
        )
    )


async def resign_leader(request: web.Request) -> web.Response:
    """POST /v1/admin/leader/resign — the leader hands over at once (graceful, like SIGTERM)
    and campaigns again behind the new leader. Send it to the leader (see /v1/leader)."""
    token = request.app[ELECTOR].handover()
    if token is None:
        leader = request.app[OBSERVER].leader
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
