"""Health and metrics routes: open without a key (they reveal no payment data)."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from aiohttp import web

from app.obs.metrics import CONTENT_TYPE
from app.store.engine import ping
from app.web.schemas import Alive, NotReady, Ready, ShuttingDown, json_response
from app.web.state import ENGINE, LIFECYCLE, METRICS, METRICS_REFRESH, SETTINGS

log = logging.getLogger(__name__)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics — Prometheus text; open like the health endpoints (no payment data)."""
    for refresh in request.app[METRICS_REFRESH]:
        await refresh()
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def livez(request: web.Request) -> web.Response:
    """GET /livez — the process serves HTTP (no dependency is checked)."""
    return json_response(Alive(status="alive"))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz — Postgres answers within the timeout and we are not shutting down."""
    settings = request.app[SETTINGS]
    if request.app[LIFECYCLE].shutting_down:
        return json_response(ShuttingDown(status="shutting_down"), status=503)
    lifecycle = request.app[LIFECYCLE]
    try:
        async with asyncio.timeout(settings.readyz_timeout):
            await ping(request.app[ENGINE])
    except Exception as exc:  # readiness reports any failure; it never raises
        # The driver's words name hosts, ports, socket paths and users: they go to the log
        # (once per change, probes come every few hundred ms), never into an answer that
        # anyone can fetch without a key.
        reason: Literal["timeout", "unavailable"] = (
            "timeout" if isinstance(exc, TimeoutError) else "unavailable"
        )
        because = f"{type(exc).__name__}: {exc}"
        if because != lifecycle.not_ready_because:
            log.warning("not ready: Postgres check failed (%s): %s", reason, because)
            lifecycle.not_ready_because = because
        return json_response(NotReady(status="not_ready", database=reason), status=503)
    if lifecycle.not_ready_because is not None:
        log.info("ready again: Postgres answers")
        lifecycle.not_ready_because = None
    return json_response(Ready(status="ready", database="ok"))


def add_health_routes(app: web.Application) -> None:
    """Register /livez, /readyz and /metrics."""
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
