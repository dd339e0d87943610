"""Engine construction and the mapping of Postgres failures onto typed errors.

The rest of the application names the database's handles only through ``Engine`` and
``Connection`` below: which driver and which SQL toolkit sit behind them is this package's
business alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.errors import DatabaseUnavailable, PaydispatchError, StaleLeader, TerminalStateViolation
from app.settings import Settings

# Our own SQLSTATEs, raised by the triggers in migrations/versions/ (0001, 0004).
SQLSTATE_STALE_TOKEN = "PDF01"
SQLSTATE_MISSING_TOKEN = "PDF02"
SQLSTATE_UNKNOWN_FENCE = "PDF03"
SQLSTATE_FENCE_GUARD = "PDF04"  # a statement tried to lower, rename or remove a fence
SQLSTATE_TERMINAL = "PDT01"
SQLSTATE_IMMUTABLE = "PDI01"
SQLSTATE_APPEND_ONLY = "PDA01"

# Postgres is down, restarting or refusing connections: worth retrying later.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53300")


# The handles callers pass around (a pool, and one connection or transaction from it).
Engine: TypeAlias = AsyncEngine
Connection: TypeAlias = AsyncConnection


class IntegrityViolation(PaydispatchError):
    """A database rule of paydispatch rejected the write (this is a bug in the writer)."""


def create_engine(
    settings: Settings,
    *,
    pool_size: int | None = None,
    leader: bool = False,
    autocommit: bool = False,
) -> AsyncEngine:
    """An async engine on asyncpg for ``settings.database_url`` with bounded waits.

    ``leader=True`` adds server-side bounds for the leader's sessions: a leader frozen inside
    a transaction (SIGSTOP, a partition) holds a share lock on the fence row, and the next
    leader's fence raise would wait on it for as long as the freeze lasts. Postgres ends
    such a session after ``idle_in_transaction_session_timeout``, releasing the lock well
    within one lease TTL; leader transactions last milliseconds, so nothing healthy trips it.

    ``autocommit=True`` suits the API, whose statements each stand alone: no BEGIN/COMMIT
    round trips around every insert and read (the ingest insert is atomic by itself).
    """
    server_settings = session_settings(settings, leader=leader)
    return create_async_engine(
        engine_url(settings.database_url),
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_timeout,
        # The API skips pre-ping: a dead pooled connection fails one statement, SQLAlchemy
        # then invalidates the pool, and the client retries (ingest answers 503). The leader
        # pings: its few, batched transactions must not start on a connection a Postgres
        # restart broke, whose clean-up after a failure can stall.
        pool_pre_ping=leader,
        connect_args={
            "timeout": settings.db_timeout,
            "command_timeout": settings.db_timeout * 2,
            "server_settings": server_settings,
        },
    )


def session_settings(settings: Settings, *, leader: bool) -> dict[str, str]:
    """Server settings of our sessions; a leader's add the bounds ``create_engine`` explains
    (the raw connections of ``app.store.claims`` use the same)."""
    server_settings = {"application_name": f"paydispatch:{settings.node_id}"[:63]}
    if leader:
        idle_ms = int(min(1.0, settings.lease_ttl / 2) * 1000)
        server_settings["idle_in_transaction_session_timeout"] = str(idle_ms)
        server_settings["statement_timeout"] = str(int(settings.db_timeout * 1000))
    return server_settings


def engine_url(database_url: str) -> str:
    """DATABASE_URL with the driver SQLAlchemy needs (the app picks it, not the operator)."""
    return _with_scheme(database_url, "postgresql+asyncpg")


def driver_dsn(database_url: str) -> str:
    """DATABASE_URL as a plain libpq-style DSN the driver accepts directly (LISTEN)."""
    return _with_scheme(database_url, "postgresql")


def _with_scheme(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme, *parts[1:]))


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE carried by a driver exception, however deeply SQLAlchemy wrapped it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        nxt: Any = getattr(current, "orig", None) or current.__cause__
        current = nxt if isinstance(nxt, BaseException) else None
    return None


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means Postgres cannot be reached now (as opposed to a bad query)."""
    if isinstance(exc, (OSError, TimeoutError, sqlalchemy.exc.TimeoutError)):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)
    cause = getattr(exc, "orig", None) or exc.__cause__
    if cause is not None and cause is not exc:
        return is_unavailable(cause)
    # asyncpg's "connection was closed in the middle of operation" and friends carry no
    # SQLSTATE; they are all InterfaceError subclasses. InternalClientError ("cannot switch
    # to state ...; another operation is in progress") is what a raw asyncpg connection
    # (app.store.ingest, app.store.claims) raises when the server ended it under a statement:
    # SQLAlchemy used to wrap it as an InterfaceError.
    return isinstance(exc, sqlalchemy.exc.InterfaceError) or type(exc).__name__ in {
        "ConnectionDoesNotExistError",
        "InterfaceError",
        "ConnectionFailureError",
        "InternalClientError",
    }


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Re-raise a driver failure inside the block as the typed error it stands for
    (``translate``); paydispatch's own errors and unclassified ones pass through unchanged."""
    try:
        yield
    except PaydispatchError:
        raise
    except Exception as exc:
        typed = translate(exc)
        if typed is None:
            raise
        raise typed from exc


def translate(exc: BaseException) -> PaydispatchError | None:
    """The typed error ``exc`` stands for, or None when it is not one we classify."""
    state = sqlstate_of(exc)
    if state in (SQLSTATE_STALE_TOKEN, SQLSTATE_UNKNOWN_FENCE):
        return StaleLeader(f"{StaleLeader.__doc__} Postgres said: {_message(exc)}")
    if state == SQLSTATE_TERMINAL:
        return TerminalStateViolation(_message(exc))
    if state in (
        SQLSTATE_MISSING_TOKEN,
        SQLSTATE_IMMUTABLE,
        SQLSTATE_APPEND_ONLY,
        SQLSTATE_FENCE_GUARD,
    ):
        return IntegrityViolation(_message(exc))
    if is_unavailable(exc):
        return DatabaseUnavailable(f"Postgres is unavailable: {_message(exc)}")
    return None


def _message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def ping(engine: AsyncEngine) -> None:
    """One round trip to Postgres (readiness); raises whatever the driver raises."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
