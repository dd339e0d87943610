"""The aiohttp application of a replica's API: middlewares, state and routes.

``create_app`` builds the API alone (ingest, reads, health); the replica's composition root
(``app.replica``) adds leadership, the cluster and admin routes and the dashboard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from app.errors import ConfigurationError
from app.obs.metrics import Metrics, http_metrics_middleware
from app.settings import Settings
from app.store.engine import create_engine, session_settings
from app.store.ingest import IngestStore
from app.web.auth import auth_middleware
from app.web.health import add_health_routes
from app.web.openapi import openapi_document
from app.web.payments import add_payment_routes
from app.web.problems import Handler, problem_middleware, unavailable
from app.web.state import (
    ENGINE,
    INGEST,
    LIFECYCLE,
    METRICS,
    METRICS_REFRESH,
    SETTINGS,
    TRACING,
    Lifecycle,
)


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = create_engine(settings)
    ingest = IngestStore(
        settings.database_url,
        size=settings.db_pool_size,
        timeout=settings.db_timeout,
        server_settings=session_settings(settings, leader=False),
        warm=settings.db_pool_warm,
        outage_wait=settings.ingest_outage_wait,
    )
    await ingest.open()
    app[ENGINE] = engine
    app[INGEST] = ingest

    async def stop_waiting() -> None:
        ingest.stop_waiting()

    # First of the stopping hooks, the moment shutdown begins (a replica's SIGTERM, before
    # its drain): a request waiting out a Postgres outage would otherwise hold the
    # shutdown for its whole wait.
    app[LIFECYCLE].on_stopping.insert(0, stop_waiting)
    try:
        yield
    finally:
        await ingest.close()
        await engine.close()


async def _mark_shutting_down(app: web.Application) -> None:
    await app[LIFECYCLE].begin_shutdown()


def draining_middleware(lifecycle: Lifecycle, retry_after: int) -> Middleware:
    """Middleware: once shutdown has begun, every /v1/* request gets a 503 with
    ``Connection: close`` instead of being started on a replica about to close its sockets.
    A load balancer retries it on another replica (the Idempotency-Key makes a retried POST
    safe); a client without one is told to retry. Health and metrics still answer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if lifecycle.shutting_down and request.path.startswith("/v1/"):
            response = unavailable(
                retry_after,
                "This replica is shutting down; nothing was stored. Retry the same request "
                "(same Idempotency-Key) on another replica.",
            )
            response.force_close()
            return response
        return await handler(request)

    return middleware


def create_app(settings: Settings) -> web.Application:
    """The aiohttp application of one replica (API only; leadership is added by serve)."""
    metrics = Metrics()
    if not (settings.api_keys or settings.admin_api_keys or settings.allow_no_auth):
        raise ConfigurationError(
            "no API keys configured: set PAYDISPATCH_API_KEYS (comma-separated bearer tokens), "
            "or set PAYDISPATCH_ALLOW_NO_AUTH=true to serve /v1/* without authentication"
        )
    lifecycle = Lifecycle()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            http_metrics_middleware(metrics),
            draining_middleware(lifecycle, 1),
            problem_middleware(settings.retry_after_seconds),
            auth_middleware(settings.api_keys, settings.admin_api_keys),
        ],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[METRICS_REFRESH] = []
    app[LIFECYCLE] = lifecycle
    app[TRACING] = None  # the replica's composition root starts tracing when asked to
    app.cleanup_ctx.append(_database)
    app.on_shutdown.append(_mark_shutting_down)
    add_payment_routes(app)
    add_health_routes(app)
    app.router.add_get("/openapi.json", openapi_document)
    return app
