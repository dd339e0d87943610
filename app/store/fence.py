"""The Postgres side of fencing: raising the fence to a new leader's token.

The check itself lives in the database (trigger ``paydispatch_check_fence``); this module
only moves the fence, and maps the database's refusal onto ``StaleLeader``.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import StaleLeader
from app.store.engine import translate

RAISE_FENCE = text("SELECT paydispatch_raise_fence(:name, :token, :holder)")
READ_FENCE = text("SELECT token, holder FROM leader_fence WHERE name = :name")


async def raise_fence(
    engine: AsyncEngine, *, name: str, token: int, holder: str, timeout: float
) -> int:
    """Move the fence ``name`` up to ``token`` (equal is fine: the same leader again).

    Raises StaleLeader if a newer token already holds the fence, DatabaseUnavailable if
    Postgres cannot be reached, TimeoutError past ``timeout`` (keep it below the leader's
    remaining validity).
    """
    try:
        async with asyncio.timeout(timeout), engine.begin() as conn:
            raised = (
                await conn.execute(RAISE_FENCE, {"name": name, "token": token, "holder": holder})
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


async def read_fence(engine: AsyncEngine, name: str) -> tuple[int, str | None]:
    """(token, holder) of the fence ``name``."""
    async with engine.connect() as conn:
        row = (await conn.execute(READ_FENCE, {"name": name})).one()
    return int(row.token), row.holder
