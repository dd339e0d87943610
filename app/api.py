"""The HTTP API of a replica: ingest, payment queries, health. Routes only; no dispatch here."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import queue
from app.auth import auth_middleware
from app.db import create_engine
from app.errors import ConfigurationError
from app.metrics import CONTENT_TYPE, Metrics, http_metrics_middleware
from app.openapi import openapi_document
from app.problems import problem, problem_middleware
from app.settings import Settings
from app.states import PaymentStatus
from app.validation import InvalidRequest, check_idempotency_key, parse_payment

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)

METRICS = web.AppKey("metrics", Metrics)
# Async steps run before each scrape (e.g. refreshing cached queue counts), so the sync
# collectors only read memory.
METRICS_REFRESH = web.AppKey("metrics_refresh", list[Callable[[], Awaitable[object]]])

LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500


class Lifecycle:
    """Readiness of this replica: false before start-up finishes and once shutdown begins."""

    def __init__(self) -> None:
        self.shutting_down = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


def json_response(payload: Any, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON response (the stdlib encoder; payloads are plain dicts)."""
    return web.Response(
        text=json.dumps(payload), status=status, content_type="application/json", **kwargs
    )


async def create_payment(request: web.Request) -> web.Response:
    """POST /v1/payments — validate, insert durably, answer 202 (new) or 200 (replay)."""
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
    async with request.app[ENGINE].begin() as conn:
        payment, created = await queue.enqueue(conn, key, payment_request)
    if not created and payment.request_fingerprint != payment_request.fingerprint():
        return problem(
            422,
            "Idempotency-Key reused with a different request",
            f"payment {payment.id} was created with this Idempotency-Key and a different "
            "body; use a new key for a new payment",
            errors=[{"field": "Idempotency-Key", "message": "already used for another request"}],
            payment_id=payment.id,
        )
    location = f"/v1/payments/{payment.id}"
    return json_response(
        payment.to_json(), status=202 if created else 200, headers={"Location": location}
    )


async def get_payment(request: web.Request) -> web.Response:
    """GET /v1/payments/{id}."""
    raw = request.match_info["id"]
    payment_id = _parse_id(raw)
    if payment_id is None:
        return problem(404, "Payment not found", f"no payment has id {raw!r}")
    async with request.app[ENGINE].connect() as conn:
        payment = await queue.get_payment(conn, payment_id)
    if payment is None:
        return problem(404, "Payment not found", f"no payment has id {payment_id}")
    return json_response(payment.to_json())


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
    limit = _int_param(params, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX, errors)
    after = _int_param(params, "after", 0, 0, 2**63 - 1, errors)
    if errors:
        raise InvalidRequest(422, "Invalid query", errors)
    async with request.app[ENGINE].connect() as conn:
        page = await queue.list_payments(conn, status=status, after=after, limit=limit + 1)
    has_more = len(page) > limit
    page = page[:limit]
    return json_response(
        {
            "data": [payment.to_json() for payment in page],
            "has_more": has_more,
            "next_after": page[-1].id if has_more else None,
        }
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics — Prometheus text; open like the health endpoints (no payment data)."""
    for refresh in request.app[METRICS_REFRESH]:
        await refresh()
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def livez(request: web.Request) -> web.Response:
    """GET /livez — the process serves HTTP (no dependency is checked)."""
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz — Postgres answers within the timeout and we are not shutting down."""
    settings = request.app[SETTINGS]
    if request.app[LIFECYCLE].shutting_down:
        return json_response({"status": "shutting_down"}, status=503)
    try:
        async with asyncio.timeout(settings.readyz_timeout):
            async with request.app[ENGINE].connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:  # readiness reports any failure; it never raises
        return json_response(
            {"status": "not_ready", "database": f"{type(exc).__name__}: {exc}"[:300]},
            status=503,
        )
    return json_response({"status": "ready", "database": "ok"})


def _parse_id(raw: str) -> int | None:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if 0 < value <= 2**63 - 1 else None


def _int_param(
    params: Any, name: str, default: int, low: int, high: int, errors: list[dict[str, str]]
) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if raw.isascii() and raw.isdigit() and low <= int(raw) <= high:
        return int(raw)
    errors.append({"field": name, "message": f"must be an integer from {low} to {high}"})
    return default


async def _database(app: web.Application) -> AsyncIterator[None]:
    engine = create_engine(app[SETTINGS], autocommit=True)
    app[ENGINE] = engine
    yield
    await engine.dispose()


async def _mark_shutting_down(app: web.Application) -> None:
    app[LIFECYCLE].shutting_down = True


def create_app(settings: Settings) -> web.Application:
    """The aiohttp application of one replica (API only; leadership is added by serve)."""
    metrics = Metrics()
    if not (settings.api_keys or settings.admin_api_keys or settings.allow_no_auth):
        raise ConfigurationError(
            "no API keys configured: set PAYDISPATCH_API_KEYS (comma-separated bearer tokens), "
            "or set PAYDISPATCH_ALLOW_NO_AUTH=true to serve /v1/* without authentication"
        )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            http_metrics_middleware(metrics),
            problem_middleware(settings.retry_after_seconds),
            auth_middleware(settings.api_keys, settings.admin_api_keys),
        ],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[METRICS_REFRESH] = []
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(_database)
    app.on_shutdown.append(_mark_shutting_down)
    app.router.add_post("/v1/payments", create_payment)
    app.router.add_get("/v1/payments", list_payments)
    app.router.add_get("/v1/payments/{id}", get_payment)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_document)
    return app
