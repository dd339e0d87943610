"""The Postgres side of fencing: raising the fence to a new leader's token, and the leader's
fenced write transaction.

The check itself lives in the database (trigger ``paydispatch_check_fence``); this module
moves the fence, opens every leader transaction with ``paydispatch_assert_fence``, and maps
the database's refusal onto ``StaleLeader``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from sqlalchemy import text

from app.errors import LeadershipLost, StaleLeader
from app.store.engine import Connection, Engine, translate

_RAISE_FENCE = text("SELECT paydispatch_raise_fence(:name, :token, :holder)")
_READ_FENCE = text("SELECT token, holder FROM leader_fence WHERE name = :name")
_ASSERT_FENCE = text("SELECT paydispatch_assert_fence(:fence, :token)")


async def raise_fence(engine: Engine, *, name: str, token: int, holder: str, timeout: float) -> int:
    """Move the fence ``name`` up to ``token`` (equal is fine: the same leader again).

    Raises StaleLeader if a newer token already holds the fence, DatabaseUnavailable if
    Postgres cannot be reached, TimeoutError past ``timeout`` (keep it below the leader's
    remaining validity).
    """
    try:
        async with asyncio.timeout(timeout), engine.begin() as conn:
            raised = (
                await conn.execute(_RAISE_FENCE, {"name": name, "token": token, "holder": holder})
            ).scalar_one()
    except TimeoutError:
        raise
    except Exception as exc:
        typed = translate(exc)
        if typed is None:
            raise
        raise typed from exc
    if raised != token:  # pragma: no cover - the function returns the token or raises
        raise StaleLeader(f"fence {name} answered {raised} when raised to {token}")
    return int(raised)


async def read_fence(engine: Engine, name: str) -> tuple[int, str | None]:
    """(token, holder) of the fence ``name``."""
    async with engine.connect() as conn:
        row = (await conn.execute(_READ_FENCE, {"name": name})).one()
    return int(row.token), row.holder


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
            async with contextlib.AsyncExitStack() as stack:
                if timeout is not None:
                    await stack.enter_async_context(asyncio.timeout(timeout))
                conn = await stack.enter_async_context(self.engine.begin())
                await conn.execute(_ASSERT_FENCE, {"fence": self.fence_name, "token": self.token})
                yield conn
        except (StaleLeader, LeadershipLost, asyncio.CancelledError, TimeoutError):
            raise
        except Exception as exc:
            typed = translate(exc)
            if isinstance(typed, StaleLeader) and self.on_stale is not None:
                self.on_stale(typed)
            if typed is None:
                raise
            raise typed from exc
