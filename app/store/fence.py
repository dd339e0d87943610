"""The Postgres side of fencing: raising the fence to a new leader's token, the leader's
fenced write transaction, and the start-up check that this replica's fence is the one the
schema enforces.

The check itself lives in the database (trigger ``paydispatch_check_fence``); this module
moves the fence, opens every leader transaction with ``paydispatch_assert_fence``, and maps
the database's refusal onto ``StaleLeader``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from app.errors import ConfigurationError, PaydispatchError, StaleLeader
from app.store.engine import Connection, Engine, translate, typed_errors

_RAISE_FENCE = "SELECT paydispatch_raise_fence($1, $2, $3)"
_ASSERT_FENCE = "SELECT paydispatch_assert_fence($1, $2)"

# The triggers that make fencing real: the two that check every leader write against the fence
# named in their argument, and the two that keep the fence row from going down or away.
FENCE_TRIGGERS = {"payments": "payments_fence", "payment_attempts": "payment_attempts_fence"}
GUARD_TRIGGERS = ("leader_fence_guard", "leader_fence_no_truncate")
_TRIGGERS = """
SELECT c.relname AS table_name, t.tgname AS name, t.tgenabled::text AS enabled,
       t.tgnargs AS nargs, t.tgargs AS args
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE t.tgrelid IN (to_regclass('payments'), to_regclass('payment_attempts'),
                    to_regclass('leader_fence'))
  AND NOT t.tgisinternal
"""
_FENCE_EXISTS = "SELECT 1 FROM leader_fence WHERE name = $1"
_PRIVILEGES = """
SELECT current_user AS login,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       has_table_privilege('leader_fence', 'UPDATE')
         OR has_table_privilege('leader_fence', 'DELETE')
         OR has_table_privilege('leader_fence', 'TRUNCATE') AS can_write_fence,
       CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)
            THEN pg_has_role($1, 'MEMBER') ELSE false END AS in_replica_role
"""
# tgenabled: O fires in normal sessions, A always; D (disabled) and R (replica sessions
# only) mean the trigger does not guard this replica's writes.
_FIRING = ("O", "A")


@contextlib.asynccontextmanager
async def raised_fence(
    engine: Engine, *, name: str, token: int, holder: str, timeout: float
) -> AsyncIterator[Connection]:
    """A transaction that first moves the fence ``name`` up to ``token`` (equal is fine: the
    same leader again), then lets the caller write under it before one COMMIT: a new
    leader's take-over work costs no second transaction.

    Raises StaleLeader if a newer token already holds the fence, DatabaseUnavailable if
    Postgres cannot be reached or does not answer within ``timeout`` (keep it below the
    leader's remaining validity).
    """
    with typed_errors():
        async with engine.transaction(timeout) as conn:
            raised = await conn.fetchval(_RAISE_FENCE, name, token, holder)
            if raised != token:  # pragma: no cover - the function returns the token or raises
                raise StaleLeader(f"fence {name} answered {raised} when raised to {token}")
            yield conn


class FencedWriter:
    """Opens the write transactions of one leader term (one token on one fence).

    Every transaction starts with ``paydispatch_assert_fence``: it takes the fence row's share
    lock and fails once a newer token holds the fence, so a write either commits before the
    next leader raises the fence or is refused after — whatever this process believes.
    ``on_stale`` is told of every refusal (the dispatch side counts and logs them); the
    refusal is raised as ``StaleLeader`` all the same.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        fence_name: str,
        token: int,
        on_stale: Callable[[StaleLeader], None] | None = None,
    ) -> None:
        self.engine = engine
        self.fence_name = fence_name
        self.token = token
        self.on_stale = on_stale

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None) -> AsyncIterator[Connection]:
        """A transaction that opens with the fence assertion, bounded by ``timeout`` seconds
        (None: unbounded here, the caller bounds it). Driver errors raised in it become typed
        (StaleLeader, DatabaseUnavailable, ...); errors we do not classify pass unchanged."""
        try:
            async with self.engine.transaction(timeout) as conn:
                await conn.execute(_ASSERT_FENCE, self.fence_name, self.token)
                yield conn
        except (PaydispatchError, asyncio.CancelledError, TimeoutError):
            raise  # already typed (StaleLeader, LeadershipLost, DatabaseUnavailable, ...)
        except Exception as exc:
            typed = translate(exc)
            if isinstance(typed, StaleLeader) and self.on_stale is not None:
                self.on_stale(typed)
            if typed is None:
                raise
            raise typed from exc


async def enforced_fence_name(engine: Engine) -> str:
    """The fence name the schema's fence triggers check, read from ``pg_trigger``.

    Raises ConfigurationError when the triggers are missing, disabled, disagree, or guard a
    fence row that does not exist: fencing would not hold, so nothing may lead on it.
    DatabaseUnavailable when Postgres cannot be reached.
    """
    with typed_errors():
        async with engine.connect() as conn:
            return await read_enforced_fence_name(conn)


async def read_enforced_fence_name(conn: Connection) -> str:
    """``enforced_fence_name`` on an open connection (``paydispatch migrate`` uses its own)."""
    triggers = {row["name"]: row for row in await conn.fetch(_TRIGGERS)}
    names: set[str] = set()
    for table, trigger in FENCE_TRIGGERS.items():
        row = triggers.get(trigger)
        if row is None:
            raise ConfigurationError(
                f"the database has no fence trigger {trigger} on {table}: run `paydispatch "
                "migrate` (as the schema owner) before starting replicas"
            )
        if row["enabled"] not in _FIRING:
            raise ConfigurationError(
                f"the fence trigger {trigger} on {table} is disabled: fencing does not hold. "
                f"Re-enable it (ALTER TABLE {table} ENABLE TRIGGER {trigger}) as the owner"
            )
        args = bytes(row["args"]).split(b"\0")[: row["nargs"]]
        names.add(args[0].decode() if args else "")
    if len(names) != 1:
        raise ConfigurationError(
            f"the fence triggers check different fences ({', '.join(sorted(names))}): the "
            "schema was altered by hand; fencing does not hold until they agree"
        )
    for trigger in GUARD_TRIGGERS:
        row = triggers.get(trigger)
        if row is None or row["enabled"] not in _FIRING:
            raise ConfigurationError(
                f"the fence guard trigger {trigger} on leader_fence is missing or disabled: "
                "run `paydispatch migrate`, or re-enable it as the owner"
            )
    (name,) = names
    if await conn.fetchrow(_FENCE_EXISTS, name) is None:
        raise ConfigurationError(
            f"the fence triggers check fence {name!r}, but leader_fence has no such row"
        )
    return name


def check_fence_name(configured: str, enforced: str) -> None:
    """ConfigurationError unless the configured fence is the one the triggers enforce.

    A replica on another fence would raise a fence no trigger checks: its writes, and a
    superseded leader's, would go through unfenced.
    """
    if configured != enforced:
        raise ConfigurationError(
            f"PAYDISPATCH_FENCE_NAME is {configured!r}, but this database's fence triggers "
            f"enforce {enforced!r}: a leader on {configured!r} would not be fenced at all. "
            f"Set PAYDISPATCH_FENCE_NAME={enforced} (the name fixed by the first "
            "`paydispatch migrate`)"
        )


async def privilege_warnings(engine: Engine, replica_role: str) -> list[str]:
    """What is too powerful about the role this process connects as (empty when it is a
    plain member of ``replica_role``). Advice for the logs: tests and the migration
    legitimately connect as the owner."""
    with typed_errors():
        async with engine.connect() as conn:
            row = await conn.fetchrow(_PRIVILEGES, replica_role)
    assert row is not None  # a SELECT without FROM returns one row
    login = row["login"]
    warnings = []
    if row["superuser"]:
        warnings.append(f"connected to Postgres as superuser {login!r}")
    elif row["can_write_fence"]:
        warnings.append(f"Postgres user {login!r} can write leader_fence directly")
    if not row["in_replica_role"]:
        warnings.append(f"Postgres user {login!r} is not a member of {replica_role!r}")
    return warnings
