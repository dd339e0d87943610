"""A replica's leader sessions: opened at start-up, held by each term's lanes, given back
for the next term, and replaced when Postgres ends them. Real Postgres, a real HTTP
provider, the real fence; the test plays the elector (tests/support/leading.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.dispatch import leader as leader_module
from app.dispatch.dispatcher import Dispatcher, DispatchStats
from app.dispatch.leader import (
    LEADER_POOL_SIZE,
    LEADER_WARM_CONNECTIONS,
    REWARM_EVERY,
    DispatchLeader,
)
from app.obs.metrics import Metrics
from app.settings import Settings
from app.store import claims
from app.store.engine import Engine, create_engine
from app.store.fence import raised_fence
from tests.integration.test_hostile_provider import dispatch_settings, enqueue, rows, settle
from tests.support.hostile import HostileProvider, first_attempt, hostile_provider
from tests.support.leading import dispatch_leader, fresh_term, leading, provider_client


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


async def test_a_term_whose_idle_sessions_postgres_ends_takes_new_ones_without_an_outage(
    db: asyncpg.Connection,
    provider: HostileProvider,
    settings_: Settings,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Woken by NOTIFY only (no 50 ms poll), so no claim is under way when the sessions end.
    settings = settings_.model_copy(update={"dispatch_poll_interval": 30.0})
    await enqueue(settings, ["before-1", "before-2"])
    async with leading(settings, token=1, engine=engine) as term:
        before = await settle(db, ["before-1", "before-2"])
        ended = await leader_sessions(db, settings)
        # An operator (or a failover of the database) ends every session the leader holds,
        # including the two its lanes hold for this term, while they are idle.
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(ended)
        )
        await until_gone(db, ended)
        with caplog.at_level(logging.WARNING, logger="app.dispatch.dispatcher"):
            await enqueue(settings, ["after-1", "after-2", "after-3"])
            after = await settle(db, ["after-1", "after-2", "after-3"])
        assert not term.task.done(), "the term ended over sessions it could replace"

    assert_charged_once(provider, before + after)
    assert {row["fence_token"] for row in after} == {1}
    assert not ended & await leader_sessions(db, settings), "an ended session is still held"
    # A session known to be closed is replaced before use: no statement met it, so the
    # dispatcher saw no outage (and waited no retry interval).
    assert "Postgres unavailable" not in caplog.text


async def until_gone(db: asyncpg.Connection, pids: set[int], within: float = 5.0) -> None:
    """Wait until none of ``pids`` is a live session any more."""
    deadline = time.monotonic() + within
    while await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
    ):
        assert time.monotonic() < deadline, f"sessions {pids} still there after {within}s"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # and the leader's side has read the end of its sockets


async def test_a_first_batch_claimed_at_take_over_but_never_called_goes_back_to_the_queue(
    db: asyncpg.Connection, provider: HostileProvider, settings_: Settings, engine: Engine
) -> None:
    # The term ends after its take-over transaction committed (with the first batch in it)
    # and before the dispatcher ran: lease lost, resigned, or cancelled in between.
    await enqueue(settings_, ["unsent-1", "unsent-2"])
    term, _ = fresh_term(settings_, token=3)
    async with provider_client(settings_) as client:
        dispatcher = Dispatcher(settings_, engine, client, term, DispatchStats(), Metrics())
        async with raised_fence(
            engine, name=settings_.fence_name, token=3, holder=settings_.node_id, timeout=5
        ) as conn:
            await dispatcher.claim_first(conn)
        claimed = await rows(db, ["unsent-1", "unsent-2"])
        assert [row["status"] for row in claimed] == ["in_flight", "in_flight"]

        await dispatcher.close()

    after = await rows(db, ["unsent-1", "unsent-2"])
    assert [row["status"] for row in after] == ["pending", "pending"]
    assert {row["fence_token"] for row in after} == {3}
    assert provider.charges == [], "a payment of a term that never ran was sent"


async def test_warm_sessions_have_the_term_statements_prepared_and_nothing_is_written(
    settings_: Settings, db: asyncpg.Connection, engine: Engine
) -> None:
    # Inside handovers at 250/s a session often met its statement for the first time: the
    # claim's Parse took 17 ms, the record's array-type introspection 19-31 ms.
    fence = settings_.fence_name
    # One in flight under an older leader's token, which a take-over's recovery re-queues:
    # the priming prepares the recovery statement too, and must not.
    older = await db.fetchval("SELECT token FROM leader_fence WHERE name = $1", fence) + 1
    await enqueue(settings_, ["prime-in-flight"])
    async with raised_fence(
        engine, name=fence, token=older, holder="older-leader", timeout=5
    ) as conn:
        assert (
            len(await claims.claim_in(conn, fence_name=fence, token=older, limit=1, horizon=3600))
            == 1
        )
    async with raised_fence(engine, name=fence, token=older + 1, holder="newer", timeout=5):
        pass  # a newer leader raised the fence and has not recovered yet
    # And a due payment the priming claim (under the fence's current token) must not take.
    await enqueue(settings_, ["prime-bait"])
    before = await db.fetch("SELECT * FROM leader_fence ORDER BY name")
    rows_before = await db.fetch("SELECT * FROM payments ORDER BY id")
    attempts_before = await db.fetchval("SELECT count(*) FROM payment_attempts")
    # The fixture's engine sessions carry the same application_name: out of the way.
    await engine.close()
    fresh = create_engine(settings_, pool_size=LEADER_POOL_SIZE, leader=True)
    try:
        await fresh.warm(
            LEADER_WARM_CONNECTIONS, prime=functools.partial(claims.prime, fence_name=fence)
        )
        opened = await leader_sessions(db, settings_)
        assert len(opened) == LEADER_WARM_CONNECTIONS
        await assert_primed(fresh, opened)
    finally:
        await fresh.close()
    assert await db.fetch("SELECT * FROM leader_fence ORDER BY name") == before
    assert await db.fetch("SELECT * FROM payments ORDER BY id") == rows_before
    assert await db.fetchval("SELECT count(*) FROM payment_attempts") == attempts_before
    (bait,) = await rows(db, ["prime-bait"])
    assert (bait["status"], bait["fence_token"], bait["attempts"]) == ("pending", None, 0)
    (flight,) = await rows(db, ["prime-in-flight"])
    assert (flight["status"], flight["fence_token"]) == ("in_flight", older)


async def assert_primed(engine: Engine, sessions: set[int]) -> None:
    """Each of ``sessions`` (all the warm ones) has the claim, the record and the recovery
    statements prepared."""
    held = [await engine.checkout() for _ in range(len(sessions))]
    try:
        for raw in held:
            assert raw.get_server_pid() in sessions, "a checkout opened a new session"
            prepared = [
                row[0] for row in await raw.fetch("SELECT statement FROM pg_prepared_statements")
            ]
            assert any("FOR UPDATE SKIP LOCKED" in text for text in prepared), prepared
            assert any("provider_charge_id = COALESCE" in text for text in prepared), prepared
            assert any("'abandoned'" in text for text in prepared), prepared
    finally:
        for raw in held:
            await engine.checkin(raw)


async def test_warming_again_leaves_primed_sessions_alone_and_primes_their_replacements(
    db: asyncpg.Connection,
    settings_: Settings,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fence = settings_.fence_name
    prime = functools.partial(claims.prime, fence_name=fence)
    await engine.close()  # the fixture's sessions, opened without priming
    fresh = create_engine(settings_, pool_size=LEADER_POOL_SIZE, leader=True)
    try:
        await fresh.warm(LEADER_WARM_CONNECTIONS, prime=prime)
        first = await leader_sessions(db, settings_)
        assert len(first) == LEADER_WARM_CONNECTIONS

        # Followers warm every second while a new leader may be raising the fence: a round
        # on primed sessions must not touch it. Held here, a priming statement (they all
        # assert the fence) would wait on it until the engine's timeout and log a failure.
        with caplog.at_level(logging.INFO, logger="app.store.engine"):
            async with db.transaction():
                await db.execute("SELECT 1 FROM leader_fence WHERE name = $1 FOR UPDATE", fence)
                await fresh.warm(LEADER_WARM_CONNECTIONS, prime=prime)
        assert "could not prepare" not in caplog.text
        assert await leader_sessions(db, settings_) == first

        await end_sessions(db, first)
        await fresh.warm(LEADER_WARM_CONNECTIONS, prime=prime)
        replaced = await leader_sessions(db, settings_)
        assert len(replaced) == LEADER_WARM_CONNECTIONS
        assert not replaced & first
        await assert_primed(fresh, replaced)
    finally:
        await fresh.close()


async def test_between_terms_sessions_postgres_ended_are_replaced_by_primed_ones(
    db: asyncpg.Connection, provider: HostileProvider, settings_: Settings, engine: Engine
) -> None:
    # A Postgres restart ends every warm session; the next term used to open and prepare
    # its sessions inside the handover (SIGTERM handovers after a restart: ~0.1 → 0.25 s).
    await engine.close()  # the fixture's sessions, opened without priming
    leader_engine = create_engine(settings_, pool_size=LEADER_POOL_SIZE, leader=True)
    async with provider_client(settings_) as client:
        leader = dispatch_leader(settings_, leader_engine, client)
        try:
            await leader.warm()
            first = await leader_sessions(db, settings_)
            assert len(first) == LEADER_WARM_CONNECTIONS
            keeping = asyncio.create_task(leader.keep_warm())
            try:
                await end_sessions(db, first)
                replaced = await until_sessions(db, settings_, LEADER_WARM_CONNECTIONS)
                # The round that opened them primes them before it ends; then no more.
                await leader.stop_keeping_warm()
                await asyncio.wait_for(keeping, 10 * REWARM_EVERY)
            finally:
                keeping.cancel()
                await asyncio.gather(keeping, return_exceptions=True)
            assert not replaced & first
            await assert_primed(leader_engine, replaced)

            # And the next term runs on them: its take-over and lanes open nothing.
            await enqueue(settings_, ["after-restart-1", "after-restart-2"])
            async with leading(settings_, token=5, engine=leader_engine):
                settled = await settle(db, ["after-restart-1", "after-restart-2"])
                during = await leader_sessions(db, settings_)
            assert during == replaced, "the term opened sessions of its own"
            assert_charged_once(provider, settled)
        finally:
            await leader_engine.close()


async def end_sessions(db: asyncpg.Connection, pids: set[int]) -> None:
    """End ``pids`` as a Postgres restart (or an operator) would, and wait until they are."""
    await db.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(pids))
    await until_gone(db, pids)


async def until_sessions(
    db: asyncpg.Connection, settings: Settings, count: int, within: float = 10.0
) -> set[int]:
    """The leader pool's sessions once there are ``count`` of them."""
    deadline = time.monotonic() + within
    while len(found := await leader_sessions(db, settings)) < count:
        assert time.monotonic() < deadline, f"{len(found)} leader sessions after {within}s"
        await asyncio.sleep(0.1)
    return found


def count_rounds(leader: DispatchLeader, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic instants of ``leader``'s warm rounds from now on."""
    rounds: list[float] = []
    warm = leader.warm

    async def counted() -> None:
        rounds.append(time.monotonic())
        await warm()

    monkeypatch.setattr(leader, "warm", counted)
    return rounds


async def test_no_warm_round_runs_while_this_replica_leads(
    db: asyncpg.Connection,
    provider: HostileProvider,
    settings_: Settings,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # During a term the lanes hold their sessions and replace them themselves; a round would
    # only take pool sessions the term's bookkeeping wants. (Pings every look here, so that
    # a round comes between terms without sessions to replace.)
    monkeypatch.setattr(leader_module, "PING_EVERY", REWARM_EVERY)
    async with provider_client(settings_) as client:
        leader = dispatch_leader(settings_, engine, client)
        rounds = count_rounds(leader, monkeypatch)
        keeping = asyncio.create_task(leader.keep_warm())
        try:
            deadline = time.monotonic() + 10 * REWARM_EVERY
            while not rounds:
                assert time.monotonic() < deadline, "no warm round between terms"
                await asyncio.sleep(0.05)

            term, _ = fresh_term(settings_, token=7)
            leading_task = asyncio.create_task(leader(term))
            await enqueue(settings_, ["while-leading"])
            settled = await settle(db, ["while-leading"])
            began = time.monotonic()
            await asyncio.sleep(3 * REWARM_EVERY)
            assert not leading_task.done(), "the term ended by itself"
            during = [t for t in rounds if t >= began]
            term.stopping.set()
            await asyncio.wait_for(leading_task, 10)

            ended = time.monotonic()
            while not [t for t in rounds if t >= ended]:
                assert time.monotonic() < ended + 10 * REWARM_EVERY, "no round after the term"
                await asyncio.sleep(0.05)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
    assert during == [], f"{len(during)} warm rounds ran while this replica led"
    assert_charged_once(provider, settled)


async def test_between_terms_open_sessions_are_left_alone_until_the_ping_is_due(
    db: asyncpg.Connection,
    provider: HostileProvider,
    settings_: Settings,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A term that starts while a round pings the sessions waits for it: with every session
    # open there is nothing to replace, so no round runs before PING_EVERY; one ended
    # session brings a round at the next look.
    monkeypatch.setattr(leader_module, "PING_EVERY", 60.0)
    await engine.close()
    leader_engine = create_engine(settings_, pool_size=LEADER_POOL_SIZE, leader=True)
    async with provider_client(settings_) as client:
        leader = dispatch_leader(settings_, leader_engine, client)
        await leader.warm()
        first = await leader_sessions(db, settings_)
        assert len(first) == LEADER_WARM_CONNECTIONS
        rounds = count_rounds(leader, monkeypatch)
        keeping = asyncio.create_task(leader.keep_warm())
        try:
            await asyncio.sleep(3.5 * REWARM_EVERY)
            assert rounds == [], f"{len(rounds)} rounds with every warm session open"
            assert await leader_sessions(db, settings_) == first

            await end_sessions(db, {min(first)})
            ended = time.monotonic()
            replaced = await until_sessions(db, settings_, LEADER_WARM_CONNECTIONS)
            assert rounds, "no round after a session ended"
            assert rounds[0] - ended < 3 * REWARM_EVERY
            assert min(first) not in replaced
            await leader.stop_keeping_warm()
            await asyncio.wait_for(keeping, 10 * REWARM_EVERY)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            await leader_engine.close()
