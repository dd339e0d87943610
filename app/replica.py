"""A full replica: the ingest API plus leader election, the leader observer and (while
leading) the leader's work. Lifecycles are cleanup contexts, torn down in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.api import ENGINE, METRICS, METRICS_REFRESH, SETTINGS, create_app, json_response
from app.dashboard import add_dashboard
from app.db import create_engine
from app.dispatcher import Dispatcher, DispatchStats
from app.election import Elector, LeaderObserver, Leadership
from app.etcdclient import EtcdClient
from app.keepalive import LoopWatchdog
from app.metrics import gauge, labelled_counter
from app.problems import problem
from app.provider_client import ProviderClient
from app.settings import Settings
from app.status import StatusCounts

log = logging.getLogger(__name__)

ELECTOR = web.AppKey("elector", Elector)
OBSERVER = web.AppKey("observer", LeaderObserver)
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
TASKS = web.AppKey("tasks", list[asyncio.Task[None]])
DISPATCH_STATS = web.AppKey("dispatch_stats", DispatchStats)
STATUS_COUNTS = web.AppKey("status_counts", StatusCounts)


async def get_leader(request: web.Request) -> web.Response:
    """GET /v1/leader — the leader as this replica observes it; 503 while there is none."""
    leader = request.app[OBSERVER].leader
    if leader is None:
        return problem(
            503, "No leader", "no replica holds leadership right now", headers={"Retry-After": "1"}
        )
    return json_response(leader.to_json())


async def get_cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster — the cluster as this replica sees it: leader, every campaigning
    replica, recent leadership changes and queue depth by status."""
    observer = request.app[OBSERVER]
    leader = observer.leader
    queue_depth: dict[str, int] | None
    try:
        queue_depth = await request.app[STATUS_COUNTS].counts()
    except Exception as exc:  # the cluster view still answers while Postgres is away
        log.warning("queue depth unavailable: %s", exc)
        queue_depth = None
    return json_response(
        {
            "observed_by": request.app[SETTINGS].node_id,
            "leader": leader.to_json() if leader else None,
            "replicas": [
                {
                    "node_id": c.node_id,
                    "url": c.url,
                    "candidate_revision": c.token,
                    "leading": leader is not None and c.token == leader.token,
                }
                for c in observer.candidates
            ],
            "leadership_changes": [change.to_json() for change in reversed(observer.changes)],
            "queue": queue_depth,
        }
    )


async def get_node(request: web.Request) -> web.Response:
    """GET /v1/node — this replica's own view: role, term, counters, event-loop lag."""
    elector = request.app[ELECTOR]
    watchdog = request.app[WATCHDOG]
    leadership = elector.leadership
    observed = request.app[OBSERVER].leader
    return json_response(
        {
            "node_id": request.app[SETTINGS].node_id,
            "url": request.app[SETTINGS].public_url,
            "is_leader": elector.is_leader,
            "token": leadership.token if leadership else None,
            "validity_remaining_s": round(leadership.remaining(), 3) if leadership else None,
            "lease_renewed_ago_s": (
                round(time.monotonic() - leadership.keepalive.last_ok_sent, 3)
                if leadership
                else None
            ),
            "leader": observed.to_json() if observed else None,
            "terms": elector.stats.terms,
            "transitions": elector.stats.transitions,
            "stale_writes_rejected": elector.stats.stale_writes_rejected,
            "dispatch": dataclasses.asdict(request.app[DISPATCH_STATS]),
            "event_loop_lag_s": round(watchdog.lag, 4),
            "event_loop_max_lag_s": round(watchdog.max_lag, 4),
        }
    )


async def block_loop(request: web.Request) -> web.Response:
    """POST /_test/block-loop?seconds=N — block the event loop on purpose (test hook)."""
    seconds = float(request.query.get("seconds", "3"))
    log.warning("test hook: blocking the event loop for %.1fs", seconds)
    time.sleep(seconds)  # noqa: ASYNC251  # blocking the loop is this hook's whole point
    return json_response({"blocked_s": seconds})


async def _leadership(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    watchdog = LoopWatchdog()
    client = EtcdClient(settings.etcd_endpoints, timeout=settings.etcd_timeout)
    # The leader's own pool and HTTP session: ingest load must not starve the dispatcher
    # of connections, nor the other way round.
    leader_engine = create_engine(settings, pool_size=4, leader=True)
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.dispatch_concurrency),
    )
    provider = ProviderClient(settings.provider_url, http)
    dispatch_stats = DispatchStats()
    elector: Elector

    async def dispatch(leadership: Leadership) -> None:
        await Dispatcher(
            settings,
            leader_engine,
            provider,
            leadership,
            dispatch_stats,
            elector.stats,
            app[METRICS],
        ).run()

    elector = Elector(settings, client, leader_engine, dispatch, watchdog)
    observer = LeaderObserver(settings, client)
    app[WATCHDOG] = watchdog
    app[ELECTOR] = elector
    app[OBSERVER] = observer
    app[DISPATCH_STATS] = dispatch_stats
    app[STATUS_COUNTS] = StatusCounts(app[ENGINE], settings.readyz_timeout)
    app[METRICS].add_collector(functools.partial(_collect, app))
    app[METRICS_REFRESH].append(_refresh_counts(app[STATUS_COUNTS]))
    tasks = [
        asyncio.create_task(watchdog.run(), name="loop-watchdog"),
        asyncio.create_task(observer.run(), name="leader-observer"),
        asyncio.create_task(elector.run(), name="elector"),
    ]
    app[TASKS] = tasks
    try:
        yield
    finally:
        await _resign_and_wait(app)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await http.close()
        await leader_engine.dispose()


def _refresh_counts(counts: StatusCounts) -> Callable[[], Awaitable[object]]:
    async def refresh() -> object:
        try:
            return await counts.counts()
        except Exception as exc:  # a scrape still answers while Postgres is away
            log.warning("payments-by-status gauge not refreshed: %s", exc)
            return None

    return refresh


def _collect(app: web.Application) -> Iterator[Metric]:
    """Scrape-time view of state counted elsewhere (one source of truth per number)."""
    elector = app[ELECTOR]
    leadership = elector.leadership
    dispatch = app[DISPATCH_STATS]
    yield gauge(
        "paydispatch_is_leader",
        "1 while this replica holds a valid term.",
        1.0 if elector.is_leader else 0.0,
    )
    yield gauge(
        "paydispatch_leader_token",
        "Fencing token of this replica's term (NaN when not leading).",
        leadership.token if leadership else None,
    )
    yield gauge(
        "paydispatch_lease_validity_remaining_seconds",
        "Seconds this leader may still act without a confirmed renewal.",
        max(0.0, leadership.remaining()) if leadership else None,
    )
    yield gauge(
        "paydispatch_event_loop_lag_seconds",
        "Lateness of the last event-loop beat.",
        app[WATCHDOG].lag,
    )
    yield labelled_counter(
        "paydispatch_leadership_transitions",
        "Leadership transitions by reason (elected, resigned, lost, fenced, ...).",
        "reason",
        elector.stats.transitions,
    )
    yield CounterMetricFamily(
        "paydispatch_fence_rejections",
        "Writes of this replica rejected by the Postgres fence.",
        value=elector.stats.stale_writes_rejected,
    )
    yield CounterMetricFamily(
        "paydispatch_dispatch_retries",
        "Provider calls scheduled for retry.",
        value=dispatch.retries,
    )
    yield CounterMetricFamily(
        "paydispatch_dispatch_recovered",
        "Payments re-queued at takeover.",
        value=dispatch.recovered,
    )
    cached = app[STATUS_COUNTS].cached()
    if cached:
        family = GaugeMetricFamily(
            "paydispatch_payments",
            "Payments by status (cached query, at most a few seconds old).",
            labels=["status"],
        )
        for status, count in sorted(cached.items()):
            family.add_metric([status], count)
        yield family


async def _resign_and_wait(app: web.Application) -> None:
    settings = app[SETTINGS]
    await app[ELECTOR].resign()
    with contextlib.suppress(TimeoutError):
        # Bounded: the shutdown grace for the work plus one etcd call to revoke.
        await asyncio.wait_for(
            asyncio.shield(app[TASKS][-1]), settings.shutdown_grace + settings.etcd_timeout + 1
        )


async def _resign_first(app: web.Application) -> None:
    # on_shutdown runs before cleanup contexts: hand leadership over while the HTTP server
    # is still up, so followers see the key vanish at once.
    await _resign_and_wait(app)


async def dump_tasks(request: web.Request) -> web.Response:
    """GET /_test/tasks — every task's name and current stack (test hook, for diagnosis)."""
    out = {}
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        out[f"{task.get_name()}#{id(task)}"] = [
            f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
            for f in frames
        ]
    return json_response(out)


def create_replica_app(settings: Settings) -> web.Application:
    """API + election + observer + (while leading) the dispatcher."""
    app = create_app(settings)
    app.cleanup_ctx.append(_leadership)
    app.on_shutdown.append(_resign_first)
    app.router.add_get("/v1/leader", get_leader)
    app.router.add_get("/v1/node", get_node)
    app.router.add_get("/v1/cluster", get_cluster)
    add_dashboard(app)
    # Imported here: the admin handlers use this module's state keys.
    from app.admin import add_admin_routes

    add_admin_routes(app)
    if settings.test_hooks:
        app.router.add_post("/_test/block-loop", block_loop)
        app.router.add_get("/_test/tasks", dump_tasks)
    return app
