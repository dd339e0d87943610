"""The ingest pool's warm connections, against a real Postgres: opened in the background at
start-up, kept, topped up after Postgres ended them; none when switched off; a server that
is not there yet delays nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from app.domain.payment import PaymentRequest
from app.stack.ports import free_port
from app.store.ingest import IngestStore


def _tag() -> str:
    return f"warm-test-{uuid.uuid4().hex[:8]}"


async def _sessions(db: asyncpg.Connection, tag: str) -> list[int]:
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", tag
    )
    return [int(row["pid"]) for row in rows]


async def _until(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def _until_sessions(db: asyncpg.Connection, tag: str, count: int, what: str) -> None:
    async def there() -> bool:
        return len(await _sessions(db, tag)) == count

    await _until(there, what)


def _store(database_url: str, tag: str, *, size: int, warm: int) -> IngestStore:
    return IngestStore(
        database_url,
        size=size,
        timeout=2.0,
        server_settings={"application_name": tag},
        warm=warm,
    )


async def test_warm_connections_open_at_start_and_stay_open(
    database_url: str, db: asyncpg.Connection
) -> None:
    tag = _tag()
    store = _store(database_url, tag, size=5, warm=3)
    await store.open()
    try:
        await _until_sessions(db, tag, 3, "three warm sessions")
        assert store.open_connections() == 3
        first = await _sessions(db, tag)
        # A request uses one of them: no new session is opened for it.
        payment, created = await store.enqueue(
            "warm-1", PaymentRequest(amount=100, currency="EUR"), "fp"
        )
        assert created
        assert payment.idempotency_key == "warm-1"
        await asyncio.sleep(1.5)  # more than a top-up round
        assert await _sessions(db, tag) == first
    finally:
        await store.close()
    assert await _sessions(db, tag) == []


async def test_sessions_postgres_ended_are_replaced(
    database_url: str, db: asyncpg.Connection
) -> None:
    tag = _tag()
    store = _store(database_url, tag, size=4, warm=2)
    await store.open()
    try:
        await _until_sessions(db, tag, 2, "two warm sessions")
        ended = await _sessions(db, tag)
        # What a Postgres restart does to every session, done to ours alone.
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            tag,
        )

        async def replaced() -> bool:
            now = await _sessions(db, tag)
            return len(now) == 2 and not set(now) & set(ended)

        await _until(replaced, "two new warm sessions after theirs were ended")
        payment, created = await store.enqueue(
            "warm-after", PaymentRequest(amount=100, currency="EUR"), "fp"
        )
        assert created
        assert payment.status.value == "pending"
    finally:
        await store.close()


async def test_warm_is_capped_at_the_pool_size(database_url: str, db: asyncpg.Connection) -> None:
    tag = _tag()
    store = _store(database_url, tag, size=2, warm=9)
    await store.open()
    try:
        await _until_sessions(db, tag, 2, "the whole pool of two open")
        await asyncio.sleep(1.5)
        assert len(await _sessions(db, tag)) == 2
    finally:
        await store.close()


async def test_no_warm_connections_opens_on_demand(
    database_url: str, db: asyncpg.Connection
) -> None:
    tag = _tag()
    store = _store(database_url, tag, size=3, warm=0)
    await store.open()
    try:
        await asyncio.sleep(1.5)
        assert await _sessions(db, tag) == []
        assert store.open_connections() == 0
        await store.enqueue("cold-1", PaymentRequest(amount=100, currency="EUR"), "fp")
        assert len(await _sessions(db, tag)) == 1
    finally:
        await store.close()


@pytest.mark.timeout(30)
async def test_an_absent_server_delays_neither_open_nor_close() -> None:
    # Nothing listens on this port: every top-up round fails, quietly.
    store = _store(
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", _tag(), size=2, warm=2
    )
    started = time.monotonic()
    await store.open()
    await asyncio.sleep(1.2)  # a failed round and the start of the next
    assert store.open_connections() == 0
    await store.close()
    assert time.monotonic() - started < 5.0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "ingest-warm"]
