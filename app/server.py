"""Running a replica: the HTTP server plus its background work, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from app.replica import create_replica_app
from app.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings, app: web.Application | None = None) -> None:
    """Serve ``app`` (default: a replica built from ``settings``) until SIGTERM or SIGINT.

    Shutdown runs the app's on_shutdown hooks (readiness goes false, the leader resigns)
    and then its cleanup contexts in reverse order, so nothing outlives the call.
    """
    app = app or create_replica_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        log.info(
            "serving on http://%s:%s as node %s", settings.host, settings.port, settings.node_id
        )
        await stop.wait()
        log.info("stop signal received; shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
