"""Exactly-once dispatch end to end: real replicas, etcd, Postgres and provider processes.

Every test ends with the exactly-once checker comparing the provider's ledger with the
payments table: zero duplicates, zero lost, zero mismatched, nothing left in flight.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.ops.client import http_json
from app.stack.etcd import EtcdCluster
from app.stack.postgres import PostgresServer
from app.stack.sandbox_process import SandboxProcess, start_sandbox_process, stop_sandbox_process
from load.checker import Verdict, check_exactly_once, wait_until_settled
from load.loadgen import LoadResult, post_payments
from load.scenarios import FAST_RETRIES
from tests.cluster import TEST_ADMIN_KEY, TEST_API_KEY, Replicas, cluster_env, running_replicas
from tests.conftest import REPLICA_LOGIN, admin_execute, postgres_dir

pytestmark = pytest.mark.chaos

TTL = 2
DECLINED_AMOUNT = 113  # amount(i) = 100 + i % 997 → i ≡ 13 (mod 997) declines


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    sandbox = await start_sandbox_process(
        tmp_path, decline_amounts=(DECLINED_AMOUNT,), latency_ms_min=5, latency_ms_max=30
    )
    try:
        yield sandbox
    finally:
        await stop_sandbox_process(sandbox.process)


def start_cluster(
    database_url: str, etcd: EtcdCluster, provider_url: str, tmp_path: Path, **extra: str
) -> Any:
    env = cluster_env(
        database_url,
        etcd.endpoints_csv,
        PAYDISPATCH_PROVIDER_URL=provider_url,
        **(FAST_RETRIES | extra),
    )
    return running_replicas(3, env, tmp_path / "replicas")


@pytest.fixture
def replicas(
    database_url: str, etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> Iterator[Replicas]:
    with start_cluster(database_url, etcd, provider.base_url, tmp_path) as group:
        yield group


async def settle_and_check(
    database_url: str, provider_url: str, load: LoadResult, timeout: float = 60
) -> Verdict:
    assert not load.gave_up, f"{len(load.gave_up)} payments never acknowledged"
    assert await wait_until_settled(database_url, timeout), "queue did not drain in time"
    verdict = await check_exactly_once(database_url, provider_url, load.acknowledged)
    print(verdict.to_json())
    assert verdict.ok, verdict.to_json()
    assert verdict.accepted == len(load.acknowledged)
    return verdict


async def in_flight_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM payments WHERE status = 'in_flight'")
        return count
    finally:
        await conn.close()


async def test_happy_path_1000_payments_across_3_replicas_are_charged_exactly_once(
    replicas: Replicas, provider: SandboxProcess, database_url: str
) -> None:
    load = await post_payments(
        [r.url for r in replicas.all], 1000, concurrency=48, api_key=TEST_API_KEY
    )
    verdict = await settle_and_check(database_url, provider.base_url, load)
    assert verdict.charged + verdict.declined == 1000
    assert verdict.declined == sum(1 for i in range(1000) if 100 + i % 997 == DECLINED_AMOUNT)
    assert verdict.by_status == {"succeeded": verdict.charged, "declined": verdict.declined}


async def test_provider_faults_still_charge_each_payment_exactly_once(
    database_url: str, etcd: EtcdCluster, tmp_path: Path
) -> None:
    sandbox = await start_sandbox_process(
        tmp_path,
        error_rate=0.2,
        timeout_rate=0.2,
        drop_rate=0.2,
        conflict_rate=0.2,
        hang_seconds=2,
        seed=7,
    )
    try:
        with start_cluster(database_url, etcd, sandbox.base_url, tmp_path) as replicas:
            load = await post_payments(
                [r.url for r in replicas.all], 300, concurrency=32, api_key=TEST_API_KEY
            )
            verdict = await settle_and_check(database_url, sandbox.base_url, load, timeout=90)
        assert verdict.charged == 300
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{sandbox.base_url}/v1/stats") as resp,
        ):
            faults = (await resp.json())["faults"]
        print("faults injected:", faults)
        # The test must bite: every fault kind was actually exercised.
        assert all(faults.get(kind, 0) > 0 for kind in ("error", "timeout", "drop", "conflict"))
    finally:
        await stop_sandbox_process(sandbox.process)


async def run_with_fault(
    replicas: Replicas, count: int, rate: float, fault_after: float, fault: Any
) -> LoadResult:
    """Post ``count`` payments at ``rate``/s; apply ``fault`` ``fault_after`` seconds in."""
    loader = asyncio.create_task(
        post_payments(
            [r.url for r in replicas.all], count, rate=rate, concurrency=32, api_key=TEST_API_KEY
        )
    )
    await asyncio.sleep(fault_after)
    await asyncio.to_thread(fault)
    return await loader


async def test_leader_sigkill_mid_run_loses_and_duplicates_nothing(
    replicas: Replicas, provider: SandboxProcess, database_url: str
) -> None:
    leader = replicas.wait_leader()
    victim = replicas.by_id(leader["node_id"])
    load = await run_with_fault(replicas, 600, 300, 0.8, victim.kill)
    after = replicas.wait_leader(
        [r for r in replicas.all if r is not victim], above=leader["token"]
    )
    await settle_and_check(database_url, provider.base_url, load)
    assert after["token"] > leader["token"]
    assert await in_flight_count(database_url) == 0


async def test_leader_sigstop_past_ttl_then_sigcont_has_its_writes_fenced_out(
    replicas: Replicas, provider: SandboxProcess, database_url: str
) -> None:
    leader = replicas.wait_leader()
    victim = replicas.by_id(leader["node_id"])
    survivors = [r for r in replicas.all if r is not victim]

    def pause_past_ttl() -> None:
        victim.pause()
        try:
            replicas.wait_leader(survivors, above=leader["token"], timeout=TTL + 5)
        finally:
            victim.resume()

    load = await run_with_fault(replicas, 600, 300, 0.8, pause_past_ttl)
    await settle_and_check(database_url, provider.base_url, load)
    node = victim.node()
    assert node is not None
    assert node["is_leader"] is False
    if node["stale_writes_rejected"] < 1:  # show where the old leader's tasks are
        tasks = http_json(f"{victim.url}/_test/tasks", api_key=TEST_ADMIN_KEY)[1]
        print(json.dumps(tasks, indent=1))
    assert node["stale_writes_rejected"] >= 1, node
    conn = await asyncpg.connect(database_url)
    try:
        fence = await conn.fetchrow(
            "SELECT token, updated_at FROM leader_fence WHERE name = 'payments'"
        )
        # Nothing carries the old token once the new fence went up.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM payments WHERE fence_token = $1 AND updated_at > $2",
                leader["token"],
                fence["updated_at"],
            )
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM payment_attempts WHERE fence_token = $1 AND finished_at > $2",
                leader["token"],
                fence["updated_at"],
            )
            == 0
        )
    finally:
        await conn.close()
    assert fence["token"] > leader["token"]


async def test_leader_sigterm_mid_run_hands_over_and_loses_nothing(
    replicas: Replicas, provider: SandboxProcess, database_url: str
) -> None:
    leader = replicas.wait_leader()
    victim = replicas.by_id(leader["node_id"])
    load = await run_with_fault(replicas, 600, 300, 0.8, lambda: victim.signal(signal.SIGTERM))
    assert victim.process is not None
    assert await asyncio.to_thread(victim.process.wait, 15) == 0
    await settle_and_check(database_url, provider.base_url, load)
    assert await in_flight_count(database_url) == 0


async def test_provider_restart_mid_run_keeps_the_ledger_and_exactly_once(
    database_url: str, etcd: EtcdCluster, tmp_path: Path
) -> None:
    (tmp_path / "provider").mkdir()
    sandbox = await start_sandbox_process(tmp_path / "provider", latency_ms_min=1, latency_ms_max=5)
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    try:
        with start_cluster(database_url, etcd, sandbox.base_url, tmp_path) as replicas:
            loader = asyncio.create_task(
                post_payments(
                    [r.url for r in replicas.all],
                    500,
                    rate=250,
                    concurrency=32,
                    api_key=TEST_API_KEY,
                )
            )
            await asyncio.sleep(0.8)
            sandbox.process.kill()
            await sandbox.process.wait()
            await asyncio.sleep(0.5)
            sandbox = await start_sandbox_process(tmp_path / "provider", port=port)
            load = await loader
            await settle_and_check(database_url, sandbox.base_url, load)
    finally:
        await stop_sandbox_process(sandbox.process)


async def test_postgres_restart_mid_run_resumes_dispatch_and_ingest_says_503(
    etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> None:
    from app.settings import load_settings
    from app.store.migrate import migrate

    server = PostgresServer(base_dir=postgres_dir())
    await asyncio.to_thread(server.start)
    try:
        url = server.url("postgres")
        settings = load_settings(database_url=url)
        await migrate(settings)
        # This server is the test's own: it needs its own login in the replica role.
        await admin_execute(
            server, f"CREATE ROLE {REPLICA_LOGIN} LOGIN IN ROLE {settings.replica_role}"
        )
        # Ingest answers at once instead of waiting the outage out (its default): this test
        # is about the 503 path; test_ingest_postgres_restart covers the wait.
        with start_cluster(
            url,
            etcd,
            provider.base_url,
            tmp_path,
            PAYDISPATCH_DB_TIMEOUT="1",
            PAYDISPATCH_INGEST_OUTAGE_WAIT="0",
        ) as replicas:
            loader = asyncio.create_task(
                post_payments(
                    [r.url for r in replicas.all],
                    500,
                    rate=200,
                    concurrency=32,
                    api_key=TEST_API_KEY,
                )
            )
            await asyncio.sleep(0.8)
            started = time.monotonic()
            await asyncio.to_thread(server.restart, 1.5)
            print(f"postgres down and back in {time.monotonic() - started:.2f}s")
            load = await loader
            assert load.statuses[503] > 0, dict(load.statuses)
            assert load.statuses[500] == 0, dict(load.statuses)
            await settle_and_check(url, provider.base_url, load)
    finally:
        await asyncio.to_thread(server.destroy)


async def test_unknown_outcomes_past_the_budget_are_settled_by_ledger_lookup(
    database_url: str, etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Every response is lost and only one attempt is allowed: payments park in
    needs_reconciliation, and the leader's sweep settles them from the provider's ledger
    (looked up by idempotency key) instead of sending them again."""
    sandbox = await start_sandbox_process(tmp_path, drop_rate=1.0)
    try:
        with start_cluster(
            database_url,
            etcd,
            sandbox.base_url,
            tmp_path,
            PAYDISPATCH_MAX_ATTEMPTS="1",
            PAYDISPATCH_RECONCILE_INTERVAL="0.5",
        ) as replicas:
            load = await post_payments(
                [r.url for r in replicas.all], 50, concurrency=16, api_key=TEST_API_KEY
            )
            verdict = await settle_and_check(database_url, sandbox.base_url, load)
            leader = replicas.wait_leader()
        assert verdict.charged == 50
        assert leader["dispatch"]["reconciled"] + leader["dispatch"]["succeeded"] >= 50
    finally:
        await stop_sandbox_process(sandbox.process)
