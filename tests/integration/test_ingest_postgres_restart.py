"""Ingest while Postgres restarts: 503 with Retry-After (never 500), nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from app.settings import load_settings
from app.stack.ports import free_port
from app.stack.postgres import PostgresServer
from app.store.migrate import migrate
from app.web.app import create_app
from tests.conftest import postgres_dir


@pytest.fixture
async def own_server() -> AsyncIterator[PostgresServer]:
    """A Postgres of this test's own: restarting the shared one would disturb other tests."""
    server = PostgresServer(base_dir=postgres_dir())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


async def test_postgres_restart_during_ingest_answers_503_and_loses_nothing(
    own_server: PostgresServer,
) -> None:
    settings = load_settings(
        database_url=own_server.url("postgres"), port=free_port(), db_timeout=1.0, api_keys="k"
    )
    await migrate(settings)
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()

    acknowledged: dict[str, int] = {}
    unavailable: list[str] = []
    statuses: list[int] = []
    restarted = asyncio.Event()

    async def post(http: aiohttp.ClientSession, key: str) -> int:
        async with http.post(
            "/v1/payments",
            data=json.dumps({"amount": 100, "currency": "EUR"}),
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": key,
                "Authorization": "Bearer k",
            },
        ) as resp:
            payload = await resp.json(content_type=None)
            if resp.status in (200, 202):
                acknowledged[key] = payload["id"]
            elif resp.status == 503:
                assert resp.headers["Retry-After"].isdigit()
                assert resp.headers["Content-Type"].startswith("application/problem+json")
            return resp.status

    async def load(http: aiohttp.ClientSession) -> None:
        # Bounded in count and time; ends once ingest has recovered after the restart.
        deadline = time.monotonic() + 30
        recovered = 0
        for i in range(5000):
            if time.monotonic() > deadline or recovered >= 20:
                break
            key = f"restart-{i}"
            status = await post(http, key)
            statuses.append(status)
            if status == 503:
                unavailable.append(key)
            elif restarted.is_set():
                recovered += 1
            await asyncio.sleep(0.005)

    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{settings.port}") as http:
            loader = asyncio.create_task(load(http))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_server.restart, 1.5)
            restarted.set()
            await asyncio.wait_for(loader, 60)

            assert set(statuses) <= {202, 503}, f"unexpected statuses {sorted(set(statuses))}"
            assert unavailable, "the restart window produced no 503: the test did not bite"
            # Clients retry what got 503 with the same key: each becomes exactly one payment.
            for key in unavailable:
                assert await post(http, key) in (200, 202)
    finally:
        await runner.cleanup()

    conn = await asyncpg.connect(own_server.url("postgres"))
    try:
        rows = dict(await conn.fetch("SELECT idempotency_key, id FROM payments"))
    finally:
        await conn.close()
    assert all(rows.get(key) == payment_id for key, payment_id in acknowledged.items())
    assert len(rows) == len(acknowledged)
