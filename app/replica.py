"""A full replica, composed: the API, leader election, the leader observer and (while
leading) the dispatcher. This module only wires parts together and runs them; each part
lives in its own package. Lifecycles are cleanup contexts, torn down in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from app.dispatch.dispatcher import DispatchStats
from app.dispatch.leader import LEADER_POOL_SIZE, DispatchLeader
from app.dispatch.provider import ProviderClient
from app.errors import DatabaseUnavailable
from app.failover.beacon import LivenessBeacon
from app.failover.detector import CrashDetector, DetectorConfig
from app.leadership.elector import ElectionConfig, Elector
from app.leadership.etcd import EtcdClient, EtcdSecurity
from app.leadership.keepalive import LoopWatchdog
from app.leadership.observer import LeaderObserver
from app.obs.collectors import collect_replica, refresh_counts
from app.obs.tracing import TracingConfig, start_tracing
from app.runtime import settle_heap
from app.settings import Settings
from app.store.counts import StatusCounts
from app.store.engine import create_engine
from app.store.fence import check_fence_name, enforced_fence_name, privilege_warnings
from app.web.admin import add_admin_routes
from app.web.app import create_app
from app.web.cluster import add_cluster_routes
from app.web.dashboard import add_dashboard
from app.web.state import (
    DISPATCH_STATS,
    ELECTOR,
    ENGINE,
    FAILOVER_STATS,
    LIFECYCLE,
    METRICS,
    METRICS_REFRESH,
    OBSERVER,
    SETTINGS,
    STATUS_COUNTS,
    TASKS,
    TRACING,
    WATCHDOG,
)
from app.web.testhooks import add_test_hooks

log = logging.getLogger(__name__)

# How long a starting replica waits for Postgres to answer its fence check: long enough for a
# database that is still starting next to it (compose, the local stack), short enough that a
# wrong URL ends the start with an error instead of a silent hang.
STARTUP_DATABASE_WAIT = 30.0


def etcd_security(settings: Settings) -> EtcdSecurity | None:
    """TLS and credentials for etcd from the settings (already validated together); None
    when neither is configured."""
    if settings.etcd_ca_file is None and settings.etcd_username is None:
        return None
    password = settings.etcd_password
    return EtcdSecurity(
        ca_file=settings.etcd_ca_file,
        cert_file=settings.etcd_cert_file,
        key_file=settings.etcd_key_file,
        username=settings.etcd_username,
        password=password.get_secret_value() if password is not None else None,
    )


def election_config(settings: Settings) -> ElectionConfig:
    """The elector's view of the settings: who this replica is, the election's timing and
    how to reach etcd (the keep-alive thread opens its own client from this)."""
    return ElectionConfig(
        node_id=settings.node_id,
        url=settings.public_url,
        prefix=settings.election_prefix,
        endpoints=settings.etcd_endpoints,
        lease_ttl=settings.lease_ttl,
        margin=settings.lease_safety_margin,
        etcd_timeout=settings.etcd_timeout,
        shutdown_grace=settings.shutdown_grace,
        security=etcd_security(settings),
    )


def detector_config(settings: Settings) -> DetectorConfig:
    """The crash detector's view of the settings."""
    return DetectorConfig(
        node_id=settings.node_id,
        url=settings.public_url,
        database_url=settings.database_url,
        fence_name=settings.fence_name,
        etcd_timeout=settings.etcd_timeout,
        connect_timeout=settings.db_timeout,
        min_interval=settings.fast_failover_min_interval,
    )


async def _verify_fence(app: web.Application) -> AsyncIterator[None]:
    """Refuse to start unless this replica's fence is the one the schema's triggers enforce.

    Runs before the server answers and before the elector campaigns: a leader raising a
    fence no trigger checks would not be fenced at all (issue 10, defect 6).
    """
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DATABASE_WAIT
    while True:
        try:
            enforced = await enforced_fence_name(app[ENGINE])
            warnings = await privilege_warnings(app[ENGINE], settings.replica_role)
            break
        except DatabaseUnavailable as exc:
            if loop.time() > deadline:
                raise DatabaseUnavailable(
                    "cannot check the fence before starting: Postgres did not answer within "
                    f"{STARTUP_DATABASE_WAIT:.0f}s (PAYDISPATCH_DATABASE_URL)"
                ) from exc
            log.warning("waiting for Postgres to check the fence: %s", exc)
            await asyncio.sleep(1.0)
    check_fence_name(settings.fence_name, enforced)
    for warning in warnings:
        log.warning(
            "%s: replicas should log in as a member of the least-privilege role %s "
            "(README, 'Database roles')",
            warning,
            settings.replica_role,
        )
    yield


async def _leadership(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    watchdog = LoopWatchdog()
    config = election_config(settings)
    client = EtcdClient(
        settings.etcd_endpoints, timeout=settings.etcd_timeout, security=config.security
    )
    # The leader's own pool and provider connections: ingest load must not starve the dispatcher
    # of connections, nor the other way round.
    leader_engine = create_engine(settings, pool_size=LEADER_POOL_SIZE, leader=True)
    # Keep-alive connections, as many as calls may be in flight, so a steady drain never
    # opens a connection per charge.
    provider = ProviderClient(settings.provider_url, connections=settings.dispatch_concurrency)
    dispatch_stats = DispatchStats()
    # Fast crash detection (app.failover): the leader holds its liveness lock beside the
    # dispatcher; every replica's detector waits on the current leader's.
    beacon = LivenessBeacon(
        settings.database_url, settings.fence_name, settings.node_id, settings.db_timeout
    )
    # Data flows one way: the elector publishes terms; the dispatch side leads each one.
    leader = DispatchLeader(
        settings,
        leader_engine,
        provider,
        dispatch_stats,
        app[METRICS],
        companions=(beacon,) if settings.fast_failover else (),
        tracing=app[TRACING],
    )
    # Its sessions open and prepared before this replica can be elected.
    await leader.warm()
    elector = Elector(config, client, leader, watchdog)
    observer = LeaderObserver(config, client)
    detector = CrashDetector(detector_config(settings), client, observer)
    app[WATCHDOG] = watchdog
    app[ELECTOR] = elector
    app[OBSERVER] = observer
    app[DISPATCH_STATS] = dispatch_stats
    app[FAILOVER_STATS] = detector.stats
    app[STATUS_COUNTS] = StatusCounts(app[ENGINE], settings.readyz_timeout)
    app[METRICS].add_collector(
        functools.partial(collect_replica, elector, watchdog, dispatch_stats, app[STATUS_COUNTS])
    )
    app[METRICS_REFRESH].append(refresh_counts(app[STATUS_COUNTS]))
    tasks = [
        asyncio.create_task(watchdog.run(), name="loop-watchdog"),
        asyncio.create_task(observer.run(), name="leader-observer"),
        asyncio.create_task(leader.keep_warm(), name="leader-sessions"),
    ]
    if settings.fast_failover:
        tasks.append(asyncio.create_task(detector.run(), name="crash-detector"))
    # The elector last: _resign_and_wait awaits app[TASKS][-1].
    tasks.append(asyncio.create_task(elector.run(), name="elector"))
    app[TASKS] = tasks
    # Shutdown begins → hand leadership over at once, while the listener still answers 503s.
    app[LIFECYCLE].on_stopping.append(leader.stop_keeping_warm)
    app[LIFECYCLE].on_stopping.append(elector.resign)
    try:
        yield
    finally:
        await _resign_and_wait(app)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await provider.close()
        await leader_engine.close()


def _tracing(config: TracingConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """The tracer's lifecycle: started before anything that makes spans, shut down after
    all of it (the last spans of a leaving leader are flushed, not lost)."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tracing = start_tracing(config)
        app[TRACING] = tracing
        log.info("tracing on: OTLP/HTTP export as service %s", config.service_name)
        try:
            yield
        finally:
            app[TRACING] = None
            await tracing.shutdown()

    return lifecycle


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


def create_replica_app(settings: Settings, tracing: TracingConfig | None = None) -> web.Application:
    """API + election + observer + (while leading) the dispatcher; traces when ``tracing``
    says so (``app.obs.tracing.tracing_config``)."""
    app = create_app(settings)
    if tracing is not None:
        # First: up before the database and the leadership parts, down after them.
        app.cleanup_ctx.insert(0, _tracing(tracing))
    app.cleanup_ctx.append(_verify_fence)
    app.cleanup_ctx.append(_leadership)
    app.on_shutdown.append(_resign_first)
    add_cluster_routes(app)
    add_dashboard(app)
    add_admin_routes(app)
    if settings.test_hooks:
        add_test_hooks(app)
    return app


async def serve(
    settings: Settings,
    app: web.Application | None = None,
    *,
    tracing: TracingConfig | None = None,
) -> None:
    """Serve ``app`` (default: a replica built from ``settings``, tracing as ``tracing``
    says) until SIGTERM or SIGINT.

    Shutdown runs the app's on_shutdown hooks (readiness goes false, the leader resigns)
    and then its cleanup contexts in reverse order, so nothing outlives the call.
    """
    app = app or create_replica_app(settings, tracing)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except BaseException:
        # A refused start (the fence check) must still close what started before it.
        await runner.cleanup()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        settle_heap()  # start-up is done: freeze it, and a larger young generation
        log.info(
            "serving on http://%s:%s as node %s", settings.host, settings.port, settings.node_id
        )
        await stop.wait()
        log.info("stop signal received; shutting down")
        # Not ready and 503 from this instant, leadership handed over at once; the listener
        # stays open for the drain so that a load balancer's next health check sees it
        # (and retries what it sent meanwhile) before connections are refused.
        await app[LIFECYCLE].begin_shutdown()
        await asyncio.sleep(settings.shutdown_drain)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
