"""Ingest while Postgres restarts: requests wait the outage out (``ingest_outage_wait``), or
get 503 with Retry-After once it outlasts the wait (never 500); nothing acknowledged is lost,
and every key is one payment."""

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
from app.web.state import INGEST, LIFECYCLE
from tests.conftest import postgres_dir
from tests.support.proxy import proxied


@pytest.fixture
async def own_server() -> AsyncIterator[PostgresServer]:
    """A Postgres of this test's own: restarting the shared one would disturb other tests."""
    server = PostgresServer(base_dir=postgres_dir())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


class Client:
    """Posts payments to one replica and keeps what it was told."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.acknowledged: dict[str, int] = {}
        self.unavailable: list[str] = []
        self.statuses: list[int] = []

    async def post(self, key: str) -> int:
        async with self.http.post(
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
                self.acknowledged[key] = payload["id"]
            elif resp.status == 503:
                assert resp.headers["Retry-After"].isdigit()
                assert resp.headers["Content-Type"].startswith("application/problem+json")
            return resp.status

    async def load(self, prefix: str, restarted: asyncio.Event, posters: int = 16) -> None:
        """``posters`` clients posting new keys until 20 requests each were answered after
        the restart. Bounded in count and time."""
        deadline = time.monotonic() + 30

        async def poster(n: int) -> None:
            recovered = 0
            for i in range(2000):
                if time.monotonic() > deadline or recovered >= 20:
                    break
                key = f"{prefix}-{n}-{i}"
                status = await self.post(key)
                self.statuses.append(status)
                if status == 503:
                    self.unavailable.append(key)
                elif restarted.is_set():
                    recovered += 1
                await asyncio.sleep(0.005)

        await asyncio.gather(*(poster(n) for n in range(posters)))


async def _serve(
    server: PostgresServer, outage_wait: float, database_url: str | None = None
) -> web.AppRunner:
    settings = load_settings(
        database_url=database_url or server.url("postgres"),
        port=free_port(),
        db_timeout=1.0,
        api_keys="k",
        ingest_outage_wait=outage_wait,
    )
    await migrate(settings)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    return runner


def _url(runner: web.AppRunner) -> str:
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


async def _stored(server: PostgresServer) -> dict[str, int]:
    conn = await asyncpg.connect(server.url("postgres"))
    try:
        return dict(await conn.fetch("SELECT idempotency_key, id FROM payments"))
    finally:
        await conn.close()


async def _restart_under_load(server: PostgresServer, runner: web.AppRunner, prefix: str) -> Client:
    restarted = asyncio.Event()
    async with aiohttp.ClientSession(_url(runner)) as http:
        client = Client(http)
        loader = asyncio.create_task(client.load(prefix, restarted))
        for _ in range(500):  # bounded: until the load is under way
            if len(client.statuses) >= 20:
                break
            await asyncio.sleep(0.01)
        assert len(client.statuses) >= 20, "the load never got going"
        await asyncio.to_thread(server.restart, 1.5)
        restarted.set()
        await asyncio.wait_for(loader, 60)
        # Clients retry what got 503 with the same key: each becomes exactly one payment.
        for key in client.unavailable:
            assert await client.post(key) in (200, 202)
    return client


async def test_postgres_restart_without_waiting_answers_503_and_loses_nothing(
    own_server: PostgresServer,
) -> None:
    runner = await _serve(own_server, outage_wait=0)
    try:
        client = await _restart_under_load(own_server, runner, "no-wait")
    finally:
        await runner.cleanup()
    assert set(client.statuses) <= {202, 503}, f"unexpected {sorted(set(client.statuses))}"
    assert client.unavailable, "the restart window produced no 503: the test did not bite"
    rows = await _stored(own_server)
    assert all(rows.get(key) == pid for key, pid in client.acknowledged.items())
    assert len(rows) == len(client.acknowledged)


async def test_requests_wait_out_a_postgres_restart(own_server: PostgresServer) -> None:
    # 1.5 s down plus a stop and a start: well inside 10 s.
    runner = await _serve(own_server, outage_wait=10.0)
    try:
        client = await _restart_under_load(own_server, runner, "wait")
    finally:
        await runner.cleanup()
    # Requests were in flight when Postgres went away (some answers were lost with their
    # connections and found again by the retry: those are 200s, replays of their key).
    assert not client.unavailable, f"{len(client.unavailable)} requests got 503"
    assert set(client.statuses) <= {200, 202}, f"unexpected {sorted(set(client.statuses))}"
    rows = await _stored(own_server)
    assert all(rows.get(key) == pid for key, pid in client.acknowledged.items())
    assert len(rows) == len(client.acknowledged)


async def test_an_insert_whose_answer_was_lost_is_found_by_the_retry(
    own_server: PostgresServer,
) -> None:
    """The server commits, the connection dies before its answer arrives: the retry meets the
    row under the same key and answers the 200 of a replay, with that row's id."""
    async with proxied(own_server.url("postgres")) as proxy:
        runner = await _serve(
            own_server, outage_wait=5.0, database_url=proxy.url_for(own_server.url("postgres"))
        )
        try:
            async with aiohttp.ClientSession(_url(runner)) as http:
                client = Client(http)
                assert await client.post("first") == 202
                # The insert's answer carries the row, whose key is this one.
                proxy.lose_reply_with(b"answer-lost")
                assert await client.post("answer-lost") == 200
        finally:
            await runner.cleanup()
    rows = await _stored(own_server)
    assert set(rows) == {"first", "answer-lost"}
    assert client.acknowledged["answer-lost"] == rows["answer-lost"]


async def test_an_outage_longer_than_the_wait_answers_503(own_server: PostgresServer) -> None:
    runner = await _serve(own_server, outage_wait=2.0)
    try:
        async with aiohttp.ClientSession(_url(runner)) as http:
            client = Client(http)
            assert await client.post("before") == 202
            await asyncio.to_thread(own_server.stop)
            try:
                started = time.monotonic()
                assert await client.post("during") == 503
                # It waited for Postgres before giving up.
                assert time.monotonic() - started >= 2.0
                # Once the outage has lasted two waits, a request is not held for it.
                await asyncio.sleep(max(0.0, started + 4.2 - time.monotonic()))
                asked = time.monotonic()
                assert await client.post("later") == 503
                assert time.monotonic() - asked < 1.0
            finally:
                await asyncio.to_thread(own_server.start)
            assert await client.post("during") == 202
    finally:
        await runner.cleanup()
    assert set(await _stored(own_server)) == {"before", "during"}


async def test_shutdown_ends_the_wait(own_server: PostgresServer) -> None:
    """A replica shutting down does not sit out the wait: the moment shutdown begins (what a
    SIGTERM does first, before the drain and the server's close), the waiting request gets
    503, which a load balancer retries elsewhere."""
    runner = await _serve(own_server, outage_wait=30.0)
    ingest = runner.app[INGEST]
    try:
        async with aiohttp.ClientSession(_url(runner)) as http:
            await asyncio.to_thread(own_server.stop)
            waiting = asyncio.create_task(Client(http).post("during-shutdown"))
            for _ in range(100):  # bounded: until the request waits for Postgres
                if ingest.waiting_for_postgres:
                    break
                await asyncio.sleep(0.05)
            assert ingest.waiting_for_postgres, "the request never began to wait"
            await runner.app[LIFECYCLE].begin_shutdown()
            assert await asyncio.wait_for(waiting, 10) == 503
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)
