"""Availability with real processes: fast crash detection, handover, faults behind haproxy.

The assertions are on order and outcome, never on timings (those go to ``python -m load``
reports): which path replaced a leader (the replicas' ``failover`` counters), that tokens
only grow, that the fence holds the newest, that every payment is charged exactly once and
that a client behind haproxy never saw an error.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.stack.etcd import EtcdCluster
from app.stack.haproxy import HaproxyProcess, haproxy_binary
from app.stack.postgres import PostgresServer
from app.stack.sandbox_process import SandboxProcess, start_sandbox_process, stop_sandbox_process
from app.store.liveness import liveness_key
from load.loadgen import post_payments
from tests.chaos.test_dispatch import run_with_fault, settle_and_check, start_cluster
from tests.cluster import TEST_API_KEY, Replicas, wait_for
from tests.conftest import REPLICA_LOGIN, admin_execute, postgres_dir

pytestmark = pytest.mark.chaos

TTL = 2


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    """The stand-in provider with a little latency, as in test_dispatch."""
    process = await start_sandbox_process(tmp_path, latency_ms_min=5, latency_ms_max=30)
    try:
        yield process
    finally:
        await stop_sandbox_process(process.process)


@pytest.fixture
def cluster(
    database_url: str, etcd: EtcdCluster, sandbox: SandboxProcess, tmp_path: Path
) -> Iterator[Replicas]:
    """Three replicas on the test's database, charging ``sandbox``."""
    with start_cluster(database_url, etcd, sandbox.base_url, tmp_path) as group:
        yield group


async def _liveness_held(database_url: str, token: int) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        classid, objid = liveness_key("payments", token)
        held: bool = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2)",
            classid,
            objid,
        )
        return held
    finally:
        await conn.close()


async def wait_liveness_armed(database_url: str, token: int, timeout: float = 10) -> None:
    """Until the leader of ``token`` holds its liveness lock (it takes it after the fence)."""
    deadline = time.monotonic() + timeout
    while not await _liveness_held(database_url, token):
        assert time.monotonic() < deadline, f"leader {token} never took its liveness lock"
        await asyncio.sleep(0.05)


def failover_outcomes(replicas: Replicas) -> dict[str, dict[str, int]]:
    """node_id → the crash detector's decisions, of every replica that answers."""
    return {node_id: node.get("failover", {}) for node_id, node in replicas.nodes().items()}


def takeovers(replicas: Replicas) -> int:
    return sum(o.get("takeover", 0) for o in failover_outcomes(replicas).values())


async def test_a_killed_leader_is_replaced_through_its_released_lock_and_nothing_is_lost(
    cluster: Replicas, sandbox: SandboxProcess, database_url: str
) -> None:
    replicas = cluster
    leader = replicas.wait_leader()
    await wait_liveness_armed(database_url, leader["token"])
    victim = replicas.by_id(leader["node_id"])
    survivors = [r for r in replicas.all if r is not victim]

    load = await run_with_fault(replicas, 600, 300, 0.8, victim.kill)

    new = replicas.wait_leader(survivors, above=leader["token"])
    # The fast path did it: a survivor revoked the dead leader's lease (not etcd's expiry).
    assert takeovers(replicas) >= 1, failover_outcomes(replicas)
    await settle_and_check(database_url, sandbox.base_url, load)
    assert new["token"] > leader["token"]


async def test_a_paused_leader_is_not_revoked_by_the_fast_path(
    cluster: Replicas, sandbox: SandboxProcess, database_url: str
) -> None:
    replicas = cluster
    leader = replicas.wait_leader()
    await wait_liveness_armed(database_url, leader["token"])
    victim = replicas.by_id(leader["node_id"])
    survivors = [r for r in replicas.all if r is not victim]

    def pause_until_replaced() -> None:
        victim.pause()
        try:
            replicas.wait_leader(survivors, above=leader["token"], timeout=TTL + 5)
        finally:
            victim.resume()

    load = await run_with_fault(replicas, 400, 200, 0.5, pause_until_replaced)
    # Its sockets stayed open, so its lock stayed held: only the lease could end its term.
    assert takeovers(replicas) == 0, failover_outcomes(replicas)
    await settle_and_check(database_url, sandbox.base_url, load)
    node = victim.node()
    assert node is not None
    assert node["is_leader"] is False


async def test_sigterm_hands_over_before_the_old_leader_exits_and_nothing_is_lost(
    database_url: str, etcd: EtcdCluster, tmp_path: Path
) -> None:
    # Slow provider calls: plenty are in flight when the leader is told to stop.
    sandbox = await start_sandbox_process(tmp_path, latency_ms_min=200, latency_ms_max=600)
    try:
        with start_cluster(database_url, etcd, sandbox.base_url, tmp_path) as replicas:
            leader = replicas.wait_leader()
            victim = replicas.by_id(leader["node_id"])
            survivors = [r for r in replicas.all if r is not victim]
            handed_over_while_alive: list[bool] = []

            def term_and_watch() -> None:
                victim.signal(signal.SIGTERM)
                replicas.wait_leader(survivors, above=leader["token"], timeout=5)
                assert victim.process is not None
                handed_over_while_alive.append(victim.process.poll() is None)

            load = await run_with_fault(replicas, 400, 200, 0.8, term_and_watch)
            assert victim.process is not None
            assert await asyncio.to_thread(victim.process.wait, 15) == 0
            # Order: a follower led before the old leader had finished draining.
            assert handed_over_while_alive == [True]
            assert takeovers(replicas) == 0  # a handover, not a crash
            await settle_and_check(database_url, sandbox.base_url, load)
    finally:
        await stop_sandbox_process(sandbox.process)


async def test_a_postgres_restart_with_a_live_leader_causes_no_takeover(
    etcd: EtcdCluster, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    from app.settings import load_settings
    from app.store.migrate import migrate

    server = PostgresServer(base_dir=postgres_dir())
    await asyncio.to_thread(server.start)
    try:
        url = server.url("postgres")
        await migrate(load_settings(database_url=url))
        await admin_execute(
            server, f"CREATE ROLE {REPLICA_LOGIN} LOGIN IN ROLE paydispatch_replica"
        )
        with start_cluster(
            url, etcd, sandbox.base_url, tmp_path, PAYDISPATCH_DB_TIMEOUT="1"
        ) as replicas:
            leader = replicas.wait_leader()
            await wait_liveness_armed(url, leader["token"])
            loader = asyncio.create_task(
                post_payments([r.url for r in replicas.all], 300, rate=100, api_key=TEST_API_KEY)
            )
            await asyncio.sleep(0.5)
            # Every session lock goes with the restart while the leader lives on.
            await asyncio.to_thread(server.restart, 1.0)
            await wait_liveness_armed(url, leader["token"], timeout=15)
            load = await loader
            # Same leader throughout, and no replica took it for dead.
            assert [n["token"] for n in replicas.leaders()] == [leader["token"]]
            assert takeovers(replicas) == 0, failover_outcomes(replicas)
            await settle_and_check(url, sandbox.base_url, load)
    finally:
        await asyncio.to_thread(server.destroy)


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")
async def test_behind_haproxy_clients_see_no_error_through_kill_pause_and_term(
    cluster: Replicas, sandbox: SandboxProcess, database_url: str, tmp_path: Path
) -> None:
    replicas = cluster
    proxy = HaproxyProcess(
        base_dir=tmp_path / "haproxy", backends=[(r.node_id, r.port) for r in replicas.all]
    )
    await asyncio.to_thread(proxy.start)
    try:
        leader = replicas.wait_leader()
        await wait_liveness_armed(database_url, leader["token"])
        loader = asyncio.create_task(
            post_payments([proxy.url], 1400, rate=200, concurrency=32, api_key=TEST_API_KEY)
        )

        def faults() -> None:
            first = replicas.by_id(leader["node_id"])
            time.sleep(1.0)
            first.kill()  # the leader
            second = replicas.wait_leader([r for r in replicas.all if r is not first], above=0)
            time.sleep(1.5)
            follower = next(r for r in replicas.alive() if r.node_id != second["node_id"])
            follower.pause()  # a follower: its requests time out and go elsewhere
            time.sleep(TTL + 1)
            follower.resume()
            wait_for(lambda: follower.node(timeout=0.5), 10, what="the paused replica back")
            time.sleep(1.5)
            replicas.by_id(second["node_id"]).signal(signal.SIGTERM)  # the leader again

        await asyncio.to_thread(faults)
        load = await loader
        errors: dict[Any, int] = {
            status: n for status, n in load.statuses.items() if status == 0 or status >= 500
        }
        assert errors == {}, dict(load.statuses)
        await settle_and_check(database_url, sandbox.base_url, load)
    finally:
        await asyncio.to_thread(proxy.stop)
