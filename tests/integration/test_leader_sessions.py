"""A replica's leader sessions: opened at start-up, held by each term's lanes, given back
for the next term, and replaced when Postgres ends them. Real Postgres, a real HTTP
provider, the real fence; the test plays the elector (tests/support/leading.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.dispatch.leader import LEADER_POOL_SIZE, LEADER_WARM_CONNECTIONS
from app.settings import Settings
from app.store.engine import Engine, create_engine
from tests.integration.test_hostile_provider import dispatch_settings, enqueue, settle
from tests.support.hostile import HostileProvider, first_attempt, hostile_provider
from tests.support.leading import leading


@pytest.fixture
async def provider() -> AsyncIterator[HostileProvider]:
    async with hostile_provider(first_attempt({})) as running:
        yield running


@pytest.fixture
async def settings_(database_url: str, provider: HostileProvider) -> Settings:
    return dispatch_settings(database_url, provider.url)


@pytest.fixture
async def engine(settings_: Settings) -> AsyncIterator[Engine]:
    """The leader pool a replica opens at start-up."""
    engine = create_engine(settings_, pool_size=LEADER_POOL_SIZE, leader=True)
    await engine.warm(LEADER_WARM_CONNECTIONS)
    try:
        yield engine
    finally:
        await engine.close()


async def leader_sessions(db: asyncpg.Connection, settings: Settings) -> set[int]:
    """Backend pids of the sessions the leader pool holds (by their application_name; the
    LISTEN connection and the test's own carry none)."""
    found = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        f"paydispatch:{settings.node_id}",
    )
    return {row["pid"] for row in found}


def assert_charged_once(provider: HostileProvider, settled: list[dict[str, object]]) -> None:
    assert [row["status"] for row in settled] == ["succeeded"] * len(settled)
    keys = [charge["idempotency_key"] for charge in provider.charges]
    assert len(keys) == len(set(keys)), "a payment was charged twice"
    assert {row["provider_charge_id"] for row in settled} <= {c["id"] for c in provider.charges}


async def test_successive_terms_on_one_replica_run_on_the_sessions_it_opened_at_start_up(
    db: asyncpg.Connection, provider: HostileProvider, settings_: Settings, engine: Engine
) -> None:
    at_start = await leader_sessions(db, settings_)
    assert len(at_start) == LEADER_WARM_CONNECTIONS

    await enqueue(settings_, ["first-1", "first-2", "first-3"])
    async with leading(settings_, token=1, engine=engine):
        first = await settle(db, ["first-1", "first-2", "first-3"])
    after_first = await leader_sessions(db, settings_)

    await enqueue(settings_, ["second-1", "second-2"])
    async with leading(settings_, token=2, engine=engine):
        second = await settle(db, ["second-1", "second-2"])
        during_second = await leader_sessions(db, settings_)
    after_second = await leader_sessions(db, settings_)

    assert at_start <= after_first, "a session opened at start-up was not kept"
    assert len(after_first) <= LEADER_POOL_SIZE
    # The second term opened nothing and closed nothing: its lanes (busy claiming and
    # recording while it ran) were sessions the first term had given back.
    assert during_second <= after_first, "the second term opened sessions of its own"
    assert after_second == after_first
    assert_charged_once(provider, first + second)
    assert {row["fence_token"] for row in second} == {2}


async def test_a_term_whose_sessions_postgres_ends_goes_on_with_new_ones_and_charges_once(
    db: asyncpg.Connection, provider: HostileProvider, settings_: Settings, engine: Engine
) -> None:
    await enqueue(settings_, ["before-1", "before-2"])
    async with leading(settings_, token=1, engine=engine) as term:
        before = await settle(db, ["before-1", "before-2"])
        ended = await leader_sessions(db, settings_)
        # An operator (or a failover of the database) ends every session the leader holds,
        # including the two its lanes are using for this term.
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(ended)
        )
        await enqueue(settings_, ["after-1", "after-2", "after-3"])
        after = await settle(db, ["after-1", "after-2", "after-3"])
        assert not term.task.done(), "the term ended over sessions it could replace"

    assert_charged_once(provider, before + after)
    assert {row["fence_token"] for row in after} == {1}
    assert not ended & await leader_sessions(db, settings_), "an ended session is still held"
