"""Typed application state of a replica (aiohttp ``AppKey``s) and its lifecycle flag.

Every handler reads what it needs through these keys; nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.dispatch.dispatcher import DispatchStats
from app.failover.detector import FailoverStats
from app.leadership.elector import Elector
from app.leadership.keepalive import LoopWatchdog
from app.leadership.observer import LeaderObserver
from app.obs.metrics import Metrics
from app.obs.tracing import Tracing
from app.settings import Settings
from app.store.counts import StatusCounts
from app.store.engine import Engine
from app.store.ingest import IngestStore


class Lifecycle:
    """Readiness of this replica: false before start-up finishes and once shutdown begins."""

    def __init__(self) -> None:
        self.shutting_down = False
        # Why /readyz last failed (logged once per change, not on every probe).
        self.not_ready_because: str | None = None
        # Run the moment shutdown begins, before the listener closes (the leader's
        # handover): registered by the composition root.
        self.on_stopping: list[Callable[[], Awaitable[object]]] = []

    async def begin_shutdown(self) -> None:
        """From now on: /readyz fails and /v1/* answers 503 (a load balancer retries them on
        another replica); then the stopping hooks run. Idempotent."""
        if self.shutting_down:
            return
        self.shutting_down = True
        for hook in self.on_stopping:
            await hook()


SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
# The ingest insert's own raw pool (app.store.ingest): the hot path skips the ORM.
INGEST = web.AppKey("ingest", IngestStore)
METRICS = web.AppKey("metrics", Metrics)
# Async steps run before each scrape (e.g. refreshing cached queue counts), so the sync
# collectors only read memory.
METRICS_REFRESH = web.AppKey("metrics_refresh", list[Callable[[], Awaitable[object]]])
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# The replica's tracer, or None: tracing is off (the default), and that None is the only
# thing the ingest path checks.
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")

# Set by the replica's composition root (absent on an API-only app).
ELECTOR = web.AppKey("elector", Elector)
OBSERVER = web.AppKey("observer", LeaderObserver)
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
TASKS = web.AppKey("tasks", list[asyncio.Task[None]])
DISPATCH_STATS = web.AppKey("dispatch_stats", DispatchStats)
STATUS_COUNTS = web.AppKey("status_counts", StatusCounts)
FAILOVER_STATS = web.AppKey("failover_stats", FailoverStats)
