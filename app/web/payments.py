"""Payment routes: ingest (any replica) and reads. Ingest only inserts; no dispatch here."""

from __future__ import annotations

from aiohttp import web

from app.domain.payment import Payment, PaymentRequest
from app.domain.states import PaymentStatus
from app.obs.tracing import Tracing
from app.store import payments as queue
from app.web.params import BIGINT_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, int_param, parse_id
from app.web.problems import problem
from app.web.schemas import PaymentList, json_response, payment_body, payment_json
from app.web.state import ENGINE, INGEST, SETTINGS, TRACING
from app.web.validation import InvalidRequest, check_idempotency_key, parse_payment


async def create_payment(request: web.Request) -> web.Response:
    """POST /v1/payments — validate, insert durably, answer 202 (new) or 200 (replay)."""
    tracing = request.app[TRACING]
    if tracing is not None:
        return await _create_traced(request, tracing)
    key, payment_request, fingerprint = await _read_payment(request)
    payment, created = await request.app[INGEST].enqueue(key, payment_request, fingerprint)
    return _answer(payment, created, fingerprint)


async def _create_traced(request: web.Request, tracing: Tracing) -> web.Response:
    """create_payment inside the ingest span, whose context the payment row keeps so that
    the leader's spans join this request's trace."""
    with tracing.ingest(request.headers) as span:
        key, payment_request, fingerprint = await _read_payment(request)
        payment, created = await request.app[INGEST].enqueue(
            key, payment_request, fingerprint, span.trace_parent
        )
        response = _answer(payment, created, fingerprint)
        span.answered(payment.id, created, response.status)
        return response


async def _read_payment(request: web.Request) -> tuple[str, PaymentRequest, str]:
    """The Idempotency-Key, the validated body and its fingerprint; InvalidRequest (or 413)
    saying what is wrong otherwise."""
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(
            max_size=settings.max_body_bytes, actual_size=request.content_length
        )
    if request.content_type != "application/json":
        raise InvalidRequest(
            415,
            "Unsupported media type",
            [
                {
                    "field": "Content-Type",
                    "message": f"must be application/json (got {request.content_type or 'none'})",
                }
            ],
        )
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = await request.read()  # client_max_size bounds chunked bodies too (→ 413)
    payment_request = parse_payment(body)
    # Once: it is a canonical dump and a hash.
    return key, payment_request, payment_request.fingerprint()


def _answer(payment: Payment, created: bool, fingerprint: str) -> web.Response:
    """202 for a new payment, 200 for a replay of the same request, 422 for the same key
    with another body."""
    if not created and payment.request_fingerprint != fingerprint:
        return problem(
            422,
            "Idempotency-Key reused with a different request",
            f"payment {payment.id} was created with this Idempotency-Key and a different "
            "body; use a new key for a new payment",
            errors=[{"field": "Idempotency-Key", "message": "already used for another request"}],
            payment_id=payment.id,
        )
    location = f"/v1/payments/{payment.id}"
    return web.Response(
        body=payment_json(payment),
        status=202 if created else 200,
        content_type="application/json",
        charset="utf-8",
        headers={"Location": location},
    )


async def get_payment(request: web.Request) -> web.Response:
    """GET /v1/payments/{id}."""
    raw = request.match_info["id"]
    payment_id = parse_id(raw)
    if payment_id is None:
        return problem(404, "Payment not found", f"no payment has id {raw!r}")
    async with request.app[ENGINE].connect() as conn:
        payment = await queue.get_payment(conn, payment_id)
    if payment is None:
        return problem(404, "Payment not found", f"no payment has id {payment_id}")
    return json_response(payment_body(payment))


async def list_payments(request: web.Request) -> web.Response:
    """GET /v1/payments?status=&limit=&after= — keyset pagination by id."""
    params = request.query
    errors: list[dict[str, str]] = []
    unknown = sorted(set(params) - {"status", "limit", "after"})
    errors += [{"field": name, "message": "unknown query parameter"} for name in unknown]
    status: PaymentStatus | None = None
    if "status" in params:
        try:
            status = PaymentStatus(params["status"])
        except ValueError:
            allowed = ", ".join(s.value for s in PaymentStatus)
            errors.append({"field": "status", "message": f"must be one of {allowed}"})
    limit = int_param(params, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX, errors)
    after = int_param(params, "after", 0, 0, BIGINT_MAX, errors)
    if errors:
        raise InvalidRequest(422, "Invalid query", errors)
    async with request.app[ENGINE].connect() as conn:
        page = await queue.list_payments(conn, status=status, after=after, limit=limit + 1)
    has_more = len(page) > limit
    page = page[:limit]
    return json_response(
        PaymentList(
            data=[payment_body(payment) for payment in page],
            has_more=has_more,
            next_after=page[-1].id if has_more else None,
        )
    )


def add_payment_routes(app: web.Application) -> None:
    """Register the public payment routes."""
    app.router.add_post("/v1/payments", create_payment)
    app.router.add_get("/v1/payments", list_payments)
    app.router.add_get("/v1/payments/{id}", get_payment)
