"""The leader's LISTEN connection against a real Postgres: named for operators, woken by
NOTIFY, and back (with a wake-up for the gap) after Postgres ended its session."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from app.store.listen import listen_forever


async def _listen_pids(db: asyncpg.Connection, name: str) -> list[int]:
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        name,
    )
    return [int(row["pid"]) for row in rows]


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


async def test_listen_session_is_named_woken_and_comes_back(
    database_url: str, db: asyncpg.Connection
) -> None:
    node = f"n-{uuid.uuid4().hex[:8]}"
    name = f"paydispatch-listen:{node}"
    channel = f"c_{uuid.uuid4().hex[:8]}"
    wakes: list[float] = []
    woken = asyncio.Event()

    def wake() -> None:
        wakes.append(time.monotonic())
        woken.set()

    task = asyncio.create_task(
        listen_forever(
            database_url, channel, wake, connect_timeout=2.0, node_id=node, retry_delay=0.1
        )
    )
    try:

        async def listening() -> bool:
            return len(await _listen_pids(db, name)) == 1

        await _wait_for(listening)
        first = await _listen_pids(db, name)
        assert len(wakes) == 1  # once after LISTEN: whatever arrived while no one listened

        woken.clear()
        await db.execute("SELECT pg_notify($1, '')", channel)
        await asyncio.wait_for(woken.wait(), 5)
        assert len(wakes) == 2

        # Postgres ends the session (a restart does this to every one): LISTEN again on a
        # new session, and wake once for what the gap may have hidden.
        await db.execute("SELECT pg_terminate_backend($1)", first[0])

        async def relistening() -> bool:
            now = await _listen_pids(db, name)
            return len(now) == 1 and now != first

        await _wait_for(relistening)
        assert len(wakes) >= 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def gone() -> bool:
        return not await _listen_pids(db, name)

    await _wait_for(gone)
