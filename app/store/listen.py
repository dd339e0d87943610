"""Wake-ups from Postgres: LISTEN on the insert channel over a dedicated connection.

A notification is only a hint that work may be waiting; the leader polls as a fallback,
because notifications sent while the connection is down are lost (LISTEN does not survive a
reconnect). So after every (re)connect the wake callback fires once, covering that gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from app.store.engine import driver_dsn

log = logging.getLogger(__name__)


async def listen_forever(
    database_url: str,
    channel: str,
    wake: Callable[[], None],
    *,
    connect_timeout: float,
    node_id: str = "",
    retry_delay: float = 0.5,
) -> None:
    """LISTEN on ``channel`` and call ``wake`` for every notification, until cancelled.

    Reconnects (and LISTENs again) after any connection loss, ``retry_delay`` seconds apart;
    ``wake`` is also called after each successful LISTEN, for whatever was inserted while no
    one listened. The session is named ``paydispatch-listen:<node_id>`` in
    ``pg_stat_activity``.
    """
    while True:
        conn = None
        try:
            conn = await asyncpg.connect(
                driver_dsn(database_url),
                timeout=connect_timeout,
                server_settings={"application_name": f"paydispatch-listen:{node_id}"[:63]},
            )
            await conn.add_listener(channel, lambda *_: wake())
            closed = asyncio.Event()
            conn.add_termination_listener(lambda *_, ev=closed: ev.set())
            wake()  # anything inserted while we were not listening
            await closed.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("LISTEN connection lost (%s); polling until it is back", exc)
            await asyncio.sleep(retry_delay)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1.0)
