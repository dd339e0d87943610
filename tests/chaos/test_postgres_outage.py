"""A leader keeps its term through a short Postgres outage instead of churning through
terms (a new lease, keep-alive thread and gRPC channel each), and a leader that cannot reach
Postgres for longer than the stall limit gives its term up. Real Postgres restarted for
real; the first two tests play the elector (its own behaviour is tested against real etcd),
the last runs three real replicas."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.dispatch.leader import stall_limit
from app.errors import DatabaseUnavailable
from app.settings import Settings
from app.stack.local import LocalStack
from app.stack.postgres import PostgresServer
from app.store.migrate import migrate
from load.scenario import run_scenario
from tests.conftest import postgres_dir
from tests.integration.test_hostile_provider import dispatch_settings, enqueue
from tests.support.hostile import first_attempt, hostile_provider
from tests.support.leading import leading

pytestmark = pytest.mark.chaos


@pytest.fixture
async def own_server() -> AsyncIterator[PostgresServer]:
    """A Postgres of this test's own: restarting the shared one would disturb other tests."""
    server = PostgresServer(base_dir=postgres_dir())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


async def statuses(settings: Settings) -> dict[str, str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        found = await conn.fetch("SELECT reference, status FROM payments")
    finally:
        await conn.close()
    return {row["reference"]: row["status"] for row in found}


async def until_all_succeeded(settings: Settings, count: int, within: float = 40) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            found = await statuses(settings)
        except (OSError, asyncpg.PostgresError):
            found = {}
        if len(found) == count and set(found.values()) == {"succeeded"}:
            return
        assert time.monotonic() < deadline, sorted(collections.Counter(found.values()).items())
        await asyncio.sleep(0.1)


async def test_a_leader_keeps_its_term_through_a_short_postgres_restart(
    own_server: PostgresServer,
) -> None:
    async with hostile_provider(first_attempt({})) as provider:
        settings = dispatch_settings(own_server.url("postgres"), provider.url).model_copy(
            update={"db_timeout": 1.0}
        )
        await migrate(settings)
        before = [f"before-{n}" for n in range(40)]
        after = [f"after-{n}" for n in range(40)]
        await enqueue(settings, before)
        async with leading(settings, token=7) as term:
            await until_all_succeeded(settings, len(before))
            down_for = 2.0
            assert down_for < stall_limit(settings)
            await asyncio.to_thread(own_server.restart, down_for)
            await enqueue(settings, after)
            await until_all_succeeded(settings, len(before) + len(after))
            assert not term.task.done(), "the term ended over a two-second outage"
    keys = [charge["idempotency_key"] for charge in provider.charges]
    assert len(keys) == len(before) + len(after) == len(set(keys))


async def test_a_leader_that_cannot_reach_postgres_gives_its_term_up_after_the_stall_limit(
    own_server: PostgresServer,
) -> None:
    async with hostile_provider(first_attempt({})) as provider:
        settings = dispatch_settings(own_server.url("postgres"), provider.url).model_copy(
            update={"db_timeout": 0.5, "provider_timeout": 0.5}
        )
        await migrate(settings)
        await asyncio.to_thread(own_server.stop)
        started = time.monotonic()
        async with leading(settings, token=3) as term:
            with pytest.raises(DatabaseUnavailable):
                await asyncio.wait_for(asyncio.shield(term.task), stall_limit(settings) + 10)
        gave_up = time.monotonic() - started
        assert stall_limit(settings) <= gave_up < stall_limit(settings) + 5


async def test_a_postgres_restart_under_load_costs_no_leadership_change() -> None:
    # Three real replicas, real etcd and a real Postgres restarted (1.5 s down) mid-run: the
    # leader keeps its term (no token change at all), followers do not campaign, and every
    # payment is charged exactly once.
    stack = LocalStack(replicas=3)
    await asyncio.to_thread(stack.start)
    try:
        result = await run_scenario(
            stack.target(), rate=60, duration=12, faults=["postgres-restart"]
        )
    finally:
        await asyncio.to_thread(stack.stop)
    assert result.verdict.ok, result.verdict.to_json()
    tokens = {sample.token for sample in result.samples if sample.token is not None}
    assert len(tokens) == 1, f"leadership changed over a Postgres restart: {sorted(tokens)}"
    assert result.token_changes == []
