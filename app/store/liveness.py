"""The leader's liveness lock: a session-level Postgres advisory lock as a death signal.

The leader of token T holds ``pg_advisory_lock(K, T)`` on a dedicated connection of its own,
outside every pool (a pool would hand the session — and the lock — to other work, or close
it). A process that dies closes its sockets; its backend sees the close and exits, releasing
the lock within milliseconds, and a follower blocked in ``pg_advisory_lock`` on the same key
wakes up. A paused (SIGSTOP) or partitioned process keeps its socket open, so its lock stays
held: this signal can only say "the *session* is gone", never "the leader is gone". A
Postgres restart, or a dropped leader connection, releases it too while the leader lives.
That is why the follower side (``app.failover``) never acts on this signal alone.

One lock per token (not one per cluster): a superseded leader that is merely partitioned
keeps its old lock for as long as its session survives, and the new leader must not queue
behind it.

Session locks need a session: behind a pooler in transaction mode (pgbouncer) they silently
belong to whichever client next gets that server connection. Connect directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable

import asyncpg

from app.errors import DatabaseUnavailable
from app.store.engine import driver_dsn

log = logging.getLogger(__name__)

# Seconds between looks at pg_locks while the leader's lock is not (yet) held, and between
# reconnects after a lost connection.
ARM_POLL = 0.1
RECONNECT_DELAY = 0.5

_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2
)
"""


def liveness_key(fence_name: str, token: int) -> tuple[int, int]:
    """The advisory lock key (two non-negative int4s) of the leader of ``token``.

    The first half names the queue (so two clusters on one database never share a lock, and
    ``paydispatch migrate``'s single-bigint lock lives in another key space); the second is
    the token folded into 31 bits — two tokens 2^31 revisions apart never lead together.
    """
    return (
        zlib.crc32(f"paydispatch:liveness:{fence_name}".encode()) & 0x7FFFFFFF,
        token & 0x7FFFFFFF,
    )


async def _connect(database_url: str, timeout: float, node_id: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            driver_dsn(database_url),
            timeout=timeout,
            server_settings={
                "application_name": f"paydispatch-liveness:{node_id}"[:63],
                # The lock wait and the hold last as long as a term: no statement timeout.
                "statement_timeout": "0",
                "idle_in_transaction_session_timeout": "0",
            },
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"liveness connection failed: {exc}") from exc


async def _close(conn: asyncpg.Connection | None) -> None:
    if conn is None:
        return
    # terminate(), not close(): a cancelled lock wait leaves a query running server-side,
    # and close() would wait for it. Dropping the socket ends the session — and its locks.
    conn.terminate()


async def hold_liveness_lock(
    database_url: str,
    key: tuple[int, int],
    *,
    node_id: str,
    connect_timeout: float,
    on_armed: Callable[[bool], None] = lambda _: None,
) -> None:
    """Hold ``key`` for as long as this task runs; re-take it after every lost connection.

    Never returns; cancel it to let go. ``on_armed(True)`` once the lock is held,
    ``on_armed(False)`` whenever it is not (Postgres restarting). Failures are never raised:
    the lock only speeds up failover, it must not end a term.
    """
    warned = False
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await _connect(database_url, connect_timeout, node_id)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda *_, ev=closed: ev.set())
            # A follower holds it for a moment when it checks a released lock; wait for it.
            await conn.execute("SELECT pg_advisory_lock($1, $2)", *key)
            on_armed(True)
            if warned:
                log.info("liveness lock %s taken again", key)
                warned = False
            await closed.wait()
            raise DatabaseUnavailable("liveness connection closed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Postgres down or restarting: try again, never end the term
            on_armed(False)
            if not warned:
                warned = True
                log.warning("liveness lock %s not held (%s); retrying", key, exc)
            await asyncio.sleep(RECONNECT_DELAY)
        finally:
            await _close(conn)


async def wait_liveness_released(
    database_url: str,
    key: tuple[int, int],
    *,
    node_id: str,
    connect_timeout: float,
) -> None:
    """Return once ``key`` was held by another session and then released.

    First waits until pg_locks shows the lock granted (the leader has taken it; before that
    an acquisition would mean nothing), then blocks in ``pg_advisory_lock`` until the holder
    lets go and releases it again at once, so that the leader can re-take it (after a
    Postgres hiccup) and other followers wake up too. Raises DatabaseUnavailable when the
    connection is lost: a Postgres restart ends every session, which is no evidence of
    anything — the caller starts over.
    """
    conn = await _connect(database_url, connect_timeout, node_id)
    try:
        # Polled, not notified: nothing tells a session that another one took a lock.
        while True:
            if await conn.fetchval(_HELD, *key):
                break
            await asyncio.sleep(ARM_POLL)
        await conn.execute("SELECT pg_advisory_lock($1, $2)", *key)
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", *key)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"liveness wait interrupted: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await _close(conn)
