"""A full replica: the ingest API plus leader election, the leader observer and (while
leading) the leader's work. Lifecycles are cleanup contexts, torn down in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from app.api import SETTINGS, create_app, json_response
from app.db import create_engine
from app.dispatcher import Dispatcher, DispatchStats
from app.election import Elector, LeaderObserver, Leadership
from app.etcdclient import EtcdClient
from app.keepalive import LoopWatchdog
from app.problems import problem
from app.provider_client import ProviderClient
from app.settings import Settings

log = logging.getLogger(__name__)

ELECTOR = web.AppKey("elector", Elector)
OBSERVER = web.AppKey("observer", LeaderObserver)
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
TASKS = web.AppKey("tasks", list[asyncio.Task[None]])
DISPATCH_STATS = web.AppKey("dispatch_stats", DispatchStats)


async def get_leader(request: web.Request) -> web.Response:
    """GET /v1/leader — the leader as this replica observes it; 503 while there is none."""
    leader = request.app[OBSERVER].leader
    if leader is None:
        return problem(
            503, "No leader", "no replica holds leadership right now", headers={"Retry-After": "1"}
        )
    return json_response(leader.to_json())


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
            settings, leader_engine, provider, leadership, dispatch_stats, elector.stats
        ).run()

    elector = Elector(settings, client, leader_engine, dispatch, watchdog)
    observer = LeaderObserver(settings, client)
    app[WATCHDOG] = watchdog
    app[ELECTOR] = elector
    app[OBSERVER] = observer
    app[DISPATCH_STATS] = dispatch_stats
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
    if settings.test_hooks:
        app.router.add_post("/_test/block-loop", block_loop)
        app.router.add_get("/_test/tasks", dump_tasks)
    return app
