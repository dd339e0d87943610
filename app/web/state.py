"""Typed application state of a replica (aiohttp ``AppKey``s) and its lifecycle flag.

Every handler reads what it needs through these keys; nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.dispatch.dispatcher import DispatchStats
from app.leadership.elector import Elector
from app.leadership.keepalive import LoopWatchdog
from app.leadership.observer import LeaderObserver
from app.obs.metrics import Metrics
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


SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
# The ingest insert's own raw pool (app.store.ingest): the hot path skips the ORM.
INGEST = web.AppKey("ingest", IngestStore)
METRICS = web.AppKey("metrics", Metrics)
# Async steps run before each scrape (e.g. refreshing cached queue counts), so the sync
# collectors only read memory.
METRICS_REFRESH = web.AppKey("metrics_refresh", list[Callable[[], Awaitable[object]]])
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

# Set by the replica's composition root (absent on an API-only app).
ELECTOR = web.AppKey("elector", Elector)
OBSERVER = web.AppKey("observer", LeaderObserver)
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
TASKS = web.AppKey("tasks", list[asyncio.Task[None]])
DISPATCH_STATS = web.AppKey("dispatch_stats", DispatchStats)
STATUS_COUNTS = web.AppKey("status_counts", StatusCounts)
