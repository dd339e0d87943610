"""The crash detector against a real etcd and Postgres, with a stand-in for the dead leader.

The "leader" here is an etcd key with a lease, a Postgres session holding its liveness lock
and an address that refuses connections: what a SIGKILLed replica leaves behind once its
session ends. The chaos tests kill real replicas; this one pins down what those cannot tell
apart from a slow machine: the detector acts on the lock's release itself, not on the
safety-net recheck it also does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from app.failover import detector as detector_module
from app.failover.detector import CrashDetector, DetectorConfig
from app.leadership.elector import ElectionConfig
from app.leadership.etcd import EtcdClient
from app.leadership.observer import LeaderObserver
from app.stack.etcd import EtcdCluster
from app.stack.ports import free_port
from app.store.liveness import liveness_key

FENCE = "payments"
WAIT = 20.0  # seconds anything expected may take on a loaded 2-core machine


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the async predicate ``condition`` until it is true, failing with ``what``."""
    deadline = time.monotonic() + WAIT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def test_a_released_liveness_lock_is_acted_on_at_once_not_at_the_next_recheck(
    etcd: EtcdCluster, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A recheck this long would make a detector that wakes only on it miss the WAIT below:
    # waiting on the lock *and* on leader changes must end at the first of the two.
    monkeypatch.setattr(detector_module, "LEADER_RECHECK", 600.0)
    prefix = f"/paydispatch/test-{uuid.uuid4().hex[:8]}/election/"
    election = ElectionConfig(
        node_id="watcher",
        url="http://watcher.invalid",
        prefix=prefix,
        endpoints=tuple(etcd.endpoints),
        lease_ttl=2,
        margin=0.5,
        etcd_timeout=1.0,
        shutdown_grace=2.0,
    )
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        lease = await client.grant_lease(60)  # outlives the test: only a revoke ends it
        value = json.dumps({"node_id": "dead", "url": dead_url}).encode()
        created, kv, _ = await client.create_if_absent(f"{prefix}{lease:016x}", value, lease)
        assert created
        assert kv is not None
        holder = await asyncpg.connect(database_url)
        await holder.execute(
            "SELECT pg_advisory_lock($1, $2)", *liveness_key(FENCE, kv.create_revision)
        )
        observer = LeaderObserver(election, client)
        detector = CrashDetector(
            DetectorConfig(
                node_id="watcher",
                url="http://watcher.invalid",
                database_url=database_url,
                fence_name=FENCE,
                etcd_timeout=1.0,
                connect_timeout=2.0,
                min_interval=0.0,
            ),
            client,
            observer,
        )
        tasks = [asyncio.create_task(observer.run()), asyncio.create_task(detector.run())]
        try:

            async def detector_waits_on_the_lock() -> bool:
                waiting: bool = await holder.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name"
                    " = 'paydispatch-liveness:watcher' AND wait_event_type = 'Lock')"
                )
                return waiting

            await until(detector_waits_on_the_lock, "the detector blocks on the leader's lock")
            await holder.close()  # the leader's session ends, as when its process dies

            async def lease_revoked() -> bool:
                current, _ = await client.get(kv.key)
                return current is None

            await until(lease_revoked, "the detector revokes the dead leader's lease")
            assert detector.stats.outcomes.get("takeover") == 1, detector.stats
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not holder.is_closed():
                await holder.close()
            await client.revoke_lease(lease)
