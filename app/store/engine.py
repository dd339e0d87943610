"""The database handles of the running service, and the mapping of Postgres failures onto typed
errors.

The rest of the application names the database's handles only through ``Engine`` and
``Connection`` below: which driver sits behind them is this package's business alone. They
wrap a plain asyncpg pool — no SQL toolkit in a running replica (SQLAlchemy and Alembic cost
a replica some 20 MB of memory; only ``paydispatch migrate`` loads them, ``app.store.migrate``).
Statements use ``$1``-style parameters; asyncpg prepares each one once per connection and
keeps it in its statement cache, as ``app.store.claims`` and ``app.store.ingest`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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

log = logging.getLogger(__name__)

# Seconds a pool gets to close its connections politely before they are cut.
_CLOSE_WAIT = 2.0
# Longest a leader checkout's ping may take before the connection counts as broken.
_PING_BOUND = 0.5
# Longest a connection's return to its pool may take. Normally it does no I/O (no reset
# query), but the pool closes one it retires — expired after Postgres went away, or at its
# query limit — politely, waiting for the server's answer: on a link a partition left hanging
# that would hold a leaving leader (and its lease) for as long as the wait lasts. Locally the
# answer takes a millisecond; past this bound the connection is cut instead.
_RELEASE_BOUND = 0.1


class IntegrityViolation(PaydispatchError):
    """A database rule of paydispatch rejected the write (this is a bug in the writer)."""


class Row(Protocol):
    """A result row (asyncpg's ``Record``): a column by name or by position."""

    def __getitem__(self, key: str | int, /) -> Any: ...


class Connection:
    """One connection lent by an ``Engine`` for the duration of a ``with`` block.

    Outside ``Engine.transaction`` each statement commits on its own (autocommit).
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Any) -> None:
        self._raw = raw  # asyncpg.Connection (asyncpg ships no type information)

    async def execute(self, query: str, *args: object) -> None:
        """Run ``query`` for its effect."""
        await self._raw.execute(query, *args)

    async def fetch(self, query: str, *args: object) -> list[Row]:
        """Every row ``query`` returns."""
        rows: list[Row] = await self._raw.fetch(query, *args)
        return rows

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        """The first row ``query`` returns, or None."""
        row: Row | None = await self._raw.fetchrow(query, *args)
        return row

    async def fetchval(self, query: str, *args: object) -> Any:
        """The first column of the first row ``query`` returns (None when no row)."""
        return await self._raw.fetchval(query, *args)


async def no_reset(connection: Any) -> None:
    """A pool's reset on release: nothing to reset, as our sessions set no state (asyncpg
    still rolls back an open transaction before calling this). asyncpg's default reset
    would cost a round trip per release."""


async def open_pool(
    dsn: str,
    *,
    size: int,
    timeout: float,
    server_settings: dict[str, str],
    keep_idle: bool = False,
) -> Any:
    """An asyncpg pool of up to ``size`` connections, none open yet (a replica may start while
    Postgres is still coming up): ``timeout`` bounds each connect, twice that each statement,
    and a connection goes back to the pool without a reset query (``no_reset``). Idle
    connections close after asyncpg's 5 minutes, or never with ``keep_idle``."""
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=size,
        timeout=timeout,
        command_timeout=timeout * 2,
        server_settings=server_settings,
        reset=no_reset,
        **({"max_inactive_connection_lifetime": 0} if keep_idle else {}),
    )


async def close_pool(pool: Any) -> None:
    """Close an asyncpg pool, bounded: a dead server must not hold a shutdown."""
    try:
        await asyncio.wait_for(pool.close(), _CLOSE_WAIT)
    except Exception:
        pool.terminate()


class Engine:
    """A bounded pool of asyncpg connections to one database, opened on first use (a replica
    may start while Postgres is still coming up). ``close()`` at shutdown."""

    def __init__(
        self,
        dsn: str,
        *,
        size: int,
        timeout: float,
        server_settings: dict[str, str],
        pre_ping: bool,
        keep_idle: bool = False,
    ) -> None:
        self._dsn = dsn
        self._keep_idle = keep_idle
        self._size = size
        self._timeout = timeout
        self._server_settings = server_settings
        self._pre_ping = pre_ping
        self._pool: Any = None  # asyncpg.Pool
        self._opening = asyncio.Lock()
        self._priming_failed = False

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """A connection of the pool for the block; its statements commit one by one.

        Waits at most the database timeout for a free connection (then DatabaseUnavailable).
        A block that fails, or is cancelled, may leave a statement running or the session
        broken: its connection is closed, never returned to the pool; when the failure says
        Postgres went away, the other pooled connections are replaced on their next use too.
        """
        pool = await self._ready_pool()
        raw = await self._acquire(pool)
        try:
            yield Connection(raw)
        except BaseException as exc:
            discard(raw)
            if is_unavailable(exc):
                await pool.expire_connections()
            raise
        finally:
            await release(pool, raw)

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None = None) -> AsyncIterator[Connection]:
        """A connection inside one transaction, committed when the block ends, rolled back
        (the session is closed) when it raises; bounded by ``timeout`` seconds (None: the
        caller bounds it)."""
        async with contextlib.AsyncExitStack() as stack:
            if timeout is not None:
                await stack.enter_async_context(asyncio.timeout(timeout))
            conn = await stack.enter_async_context(self.connect())
            await conn.execute("BEGIN")
            yield conn
            await conn.execute("COMMIT")

    async def warm(
        self, connections: int = 1, *, prime: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        """Open ``connections`` connections now and keep them in the pool (best effort: a
        failure is left for the first real use to meet). A new leader's take-over and its
        lanes (``checkout``) then start with a ping instead of a connection set-up (client
        and server process start, authentication: 40-60 ms here while a failover keeps
        both cores busy). ``prime`` runs on each (bounded by the timeout), to prepare what
        its later users will run; it is called on every warm, so it skips what is done.

        Called again, it pings the sessions it finds (for a leader's engine) and replaces
        those a Postgres restart ended.
        """
        try:
            pool = await self._ready_pool()
        except Exception:
            return
        # A ping each, or a connection set-up; a failure is left for the first real use to
        # meet (and report).
        async with holding(pool, connections, self._acquire) as held:
            if prime is not None and held:
                await self._prime_all(held, prime)

    async def _prime_all(self, held: list[Any], prime: Callable[[Any], Awaitable[None]]) -> None:
        primed = await asyncio.gather(
            *(self._primed(raw, prime) for raw in held), return_exceptions=True
        )
        failed = [exc for exc in primed if isinstance(exc, BaseException)]
        if failed and not self._priming_failed:
            # Not fatal (the first term prepares what it needs), but a priming that always
            # fails would otherwise only show as slower handovers. Once, not every round.
            log.info(
                "could not prepare %d of %d warm sessions: %s: %s",
                len(failed),
                len(held),
                type(failed[0]).__name__,
                failed[0],
            )
        self._priming_failed = bool(failed)

    async def _primed(self, raw: Any, prime: Callable[[Any], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await prime(raw)
        except (TimeoutError, asyncio.CancelledError):
            discard(raw)  # a statement may still run on it: never hand it on
            raise

    def open_connections(self) -> int:
        """Connections of the pool open right now (``open_count``)."""
        return open_count(self._pool)

    async def checkout(self) -> Any:
        """A connection of the pool (pinged, for a leader's engine), held beyond one block
        until ``checkin``: a leader's lane keeps one for its term, so each term starts on an
        open session whose statements were prepared by the terms before. Raises
        DatabaseUnavailable when none comes within the timeout. Closing it (``terminate``)
        also frees its place in the pool."""
        return await self._acquire(await self._ready_pool())

    async def checkin(self, raw: Any) -> None:
        """Give back a connection from ``checkout``, idle (no statement under way), for the
        next term; it is closed instead when it cannot go back cleanly (bounded)."""
        pool = self._pool
        if pool is None or not is_open(raw):
            discard(raw)
            return
        await release(pool, raw)

    async def close(self) -> None:
        """Close every connection (bounded: a dead server must not hold shutdown)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    async def _ready_pool(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await open_pool(
                        self._dsn,
                        size=self._size,
                        timeout=self._timeout,
                        server_settings=self._server_settings,
                        keep_idle=self._keep_idle,
                    )
        return self._pool

    async def _acquire(self, pool: Any) -> Any:
        try:
            # asyncio.timeout rather than acquire(timeout=...): no task per checkout. It
            # bounds the wait for a free connection and, with connect's own timeout, a new one.
            async with asyncio.timeout(self._timeout):
                raw = await pool.acquire()
                if self._pre_ping:
                    raw = await self._pinged(pool, raw)
                return raw
        except TimeoutError as exc:
            raise DatabaseUnavailable(
                f"Postgres is unavailable: no connection within {self._timeout:g}s"
            ) from exc

    @staticmethod
    async def _pinged(pool: Any, raw: Any) -> Any:
        """``raw`` if it answers; else a fresh connection, and the pool's other connections
        are replaced on their next use (a restart broke them all)."""
        try:
            # Bounded on its own: a half-open connection (a moved address, a dropped idle
            # flow) would otherwise hold the checkout for the whole acquire timeout.
            async with asyncio.timeout(_PING_BOUND):
                await raw.execute("SELECT 1")
        except BaseException as exc:
            discard(raw)
            await release(pool, raw)
            if not isinstance(exc, Exception):
                raise  # cancelled (a deadline): not the connection's fault
            await pool.expire_connections()
            return await pool.acquire()
        return raw


def open_count(pool: Any) -> int:
    """Connections of an asyncpg pool (None: not opened yet) open right now, in use or idle.
    A session Postgres ended (a restart) no longer counts as soon as its socket closes,
    without a statement."""
    return int(pool.get_size()) if pool is not None else 0


@contextlib.asynccontextmanager
async def holding(
    pool: Any, count: int, acquire: Callable[[Any], Awaitable[Any]]
) -> AsyncIterator[list[Any]]:
    """Up to ``count`` connections of ``pool`` held for the block, so that the pool opens
    those it lacks. Taken one at a time with ``acquire(pool)``; the first failure stops the
    taking (the block gets fewer). All are given back however the block ends, a
    cancellation included."""
    held: list[Any] = []
    try:
        for _ in range(count):
            try:
                held.append(await acquire(pool))
            except Exception as exc:
                log.debug("held %d of %d connections (%s)", len(held), count, exc)
                break
        yield held
    finally:
        for raw in held:
            await release(pool, raw)


async def release(pool: Any, raw: Any) -> None:
    """Give ``raw`` back to ``pool``; a connection that cannot go back within _RELEASE_BOUND
    (or at all) is closed without waiting, which frees its place just the same."""
    try:
        await pool.release(raw, timeout=_RELEASE_BOUND)
    except Exception:
        discard(raw)


def is_open(raw: Any) -> bool:
    """Whether a connection from ``Engine.checkout`` can still run a statement. When Postgres
    ends a pooled session, asyncpg gives its place in the pool back at once and the handle
    we hold raises on every call, ``is_closed()`` included: that counts as closed."""
    try:
        return not raw.is_closed()
    except asyncpg.InterfaceError:
        return False


def discard(raw: Any) -> None:
    """Close a pooled connection without waiting (its place in the pool is freed). One
    Postgres already ended is left as it is: asyncpg has freed its place and the handle
    raises on every call, ``terminate()`` included, which must not replace the error that
    brought us here."""
    with contextlib.suppress(Exception):
        raw.terminate()


def create_engine(
    settings: Settings, *, pool_size: int | None = None, leader: bool = False
) -> Engine:
    """A pool for ``settings.database_url`` with bounded waits.

    ``leader=True`` adds server-side bounds for the leader's sessions: a leader frozen inside
    a transaction (SIGSTOP, a partition) holds a share lock on the fence row, and the next
    leader's fence raise would wait on it for as long as the freeze lasts. Postgres ends
    such a session after ``idle_in_transaction_session_timeout``, releasing the lock well
    within one lease TTL; leader transactions last milliseconds, so nothing healthy trips it.

    The API skips the ping before each checkout: a dead pooled connection fails one
    statement, the pool's connections are then replaced, and the client retries (ingest
    answers 503). The leader pings: its few, batched transactions must not start on a
    connection a Postgres restart broke, whose clean-up after a failure can stall.
    """
    return Engine(
        driver_dsn(settings.database_url),
        size=pool_size or settings.db_pool_size,
        timeout=settings.db_timeout,
        server_settings=session_settings(settings, leader=leader),
        pre_ping=leader,
        # A follower's connection, opened at start-up (warm()), is still there when it is
        # elected, however long that takes.
        keep_idle=leader,
    )


def session_settings(settings: Settings, *, leader: bool) -> dict[str, str]:
    """Server settings of our sessions; a leader's add the bounds ``create_engine`` explains
    (the connections of ``app.store.claims`` and ``app.store.ingest`` use the same)."""
    server_settings = {"application_name": f"paydispatch:{settings.node_id}"[:63]}
    if leader:
        idle_ms = int(min(1.0, settings.lease_ttl / 2) * 1000)
        server_settings["idle_in_transaction_session_timeout"] = str(idle_ms)
        server_settings["statement_timeout"] = str(int(settings.db_timeout * 1000))
    return server_settings


def engine_url(database_url: str) -> str:
    """DATABASE_URL with the driver SQLAlchemy needs (the app picks it, not the operator;
    only ``paydispatch migrate`` uses SQLAlchemy)."""
    return _with_scheme(database_url, "postgresql+asyncpg")


def driver_dsn(database_url: str) -> str:
    """DATABASE_URL as a plain libpq-style DSN the driver accepts directly."""
    return _with_scheme(database_url, "postgresql")


def _with_scheme(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme, *parts[1:]))


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE carried by a driver exception, however deeply it is wrapped (causes, and
    SQLAlchemy's ``orig`` in ``paydispatch migrate``)."""
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
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    # SQLAlchemy's wrapper (``paydispatch migrate`` only) says so when the driver lost the
    # connection; read by name, so that nothing here imports SQLAlchemy.
    if getattr(exc, "connection_invalidated", False) is True:
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)
    cause = getattr(exc, "orig", None) or exc.__cause__
    if cause is not None and cause is not exc:
        return is_unavailable(cause)
    # asyncpg's "connection was closed in the middle of operation" and friends carry no
    # SQLSTATE; they are all InterfaceError subclasses. InternalClientError ("cannot switch
    # to state ...; another operation is in progress") is what asyncpg raises when the
    # server ended the session under a statement. By name, because SQLAlchemy's wrappers
    # (migrate) are named alike: its InterfaceError, and its TimeoutError (pool exhausted),
    # which is no builtin TimeoutError.
    return type(exc).__name__ in {
        "ConnectionDoesNotExistError",
        "InterfaceError",
        "ConnectionFailureError",
        "InternalClientError",
        "TimeoutError",
    }


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the *connection* to Postgres failed: refused, reset, closed
    under a statement, or the server shutting down or starting up (SQLSTATE 08, 57P).

    Narrower than ``is_unavailable`` on purpose: this decides whether waiting for Postgres
    to come back and trying again can help. A timeout means a slow server, not an absent
    one, and too many connections (53300) or a driver interface error would only be met
    again. asyncpg's InternalClientError ("cannot switch to state ...") is what a restart
    gives a statement whose session the server ended under it (seen in the restart tests).
    """
    if isinstance(exc, TimeoutError):  # an OSError subclass, but a slow server's sign
        return False
    if isinstance(exc, OSError):
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith(("08", "57P"))
    return type(exc).__name__ == "InternalClientError"


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


async def ping(engine: Engine) -> None:
    """One round trip to Postgres (readiness); raises whatever the driver raises."""
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
