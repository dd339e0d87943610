"""The crash detector against a real etcd and Postgres, with stand-ins for dead leaders.

A stand-in leader is an etcd key with a lease, a Postgres session holding its liveness lock
and an address that refuses connections: what a SIGKILLed replica leaves behind once its
session ends. The chaos tests kill real replicas; these pin down what those cannot tell
apart from a slow machine: the detector acts on a lock's release and on a leader change
themselves, not on the safety-net recheck it also does (patched here to 600 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from app.failover import detector as detector_module
from app.failover.detector import CrashDetector, DetectorConfig
from app.leadership.etcd import EtcdClient
from app.leadership.observer import LeaderObserver
from app.stack.etcd import EtcdCluster
from app.stack.ports import free_port
from app.store.liveness import liveness_key
from tests.integration.test_elector import config

FENCE = "payments"
WATCHER = "watcher"
WAIT = 20.0  # seconds anything expected may take on a loaded 2-core machine


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the async predicate ``condition`` until it is true, failing with ``what``."""
    deadline = time.monotonic() + WAIT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


@dataclass
class StandIn:
    """A leader's traces: its key (token = create revision), lease and lock session."""

    key: str
    token: int
    lease: int
    holder: asyncpg.Connection


@dataclass
class Scene:
    """A detector and its observer watching the stand-ins under one election prefix."""

    client: EtcdClient
    database_url: str
    prefix: str
    detector: CrashDetector
    stand_ins: list[StandIn]

    async def stand_in(self, name: str) -> StandIn:
        """A campaigning "leader" whose address refuses and whose lock is held."""
        lease = await self.client.grant_lease(60)  # longer than a test can take
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
        value = json.dumps({"node_id": name, "url": url}).encode()
        key = f"{self.prefix}{lease:016x}"
        created, kv, _ = await self.client.create_if_absent(key, value, lease)
        assert created
        assert kv is not None
        holder = await asyncpg.connect(self.database_url)
        await holder.execute(
            "SELECT pg_advisory_lock($1, $2)", *liveness_key(FENCE, kv.create_revision)
        )
        stand_in = StandIn(key, kv.create_revision, lease, holder)
        self.stand_ins.append(stand_in)
        return stand_in

    async def detector_waits_on(self, leader: StandIn) -> None:
        """Until the detector's session blocks on ``leader``'s lock."""
        classid, objid = liveness_key(FENCE, leader.token)

        async def blocked() -> bool:
            waiting: bool = await leader.holder.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE a.application_name = $1 AND l.locktype = 'advisory' AND NOT l.granted"
                " AND l.classid = $2::bigint::oid AND l.objid = $3::bigint::oid)",
                f"paydispatch-liveness:{WATCHER}",
                classid,
                objid,
            )
            return waiting

        await until(blocked, f"the detector blocks on the lock of token {leader.token}")

    async def revoked(self, leader: StandIn) -> None:
        """Until ``leader``'s key is gone (its lease revoked)."""

        async def gone() -> bool:
            current, _ = await self.client.get(leader.key)
            return current is None

        await until(gone, f"the lease of token {leader.token} is revoked")


@pytest.fixture
async def scene(
    etcd: EtcdCluster, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Scene]:
    # A detector that woke only on its recheck would now miss every WAIT in these tests.
    monkeypatch.setattr(detector_module, "LEADER_RECHECK", 600.0)
    prefix = f"/paydispatch/test-{uuid.uuid4().hex[:8]}/election/"
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        observer = LeaderObserver(config(etcd, prefix, WATCHER), client)
        detector = CrashDetector(
            DetectorConfig(
                node_id=WATCHER,
                url=f"http://{WATCHER}.invalid",
                database_url=database_url,
                fence_name=FENCE,
                etcd_timeout=1.0,
                connect_timeout=2.0,
                min_interval=0.0,
            ),
            client,
            observer,
        )
        scene = Scene(client, database_url, prefix, detector, [])
        tasks = [asyncio.create_task(observer.run()), asyncio.create_task(detector.run())]
        try:
            yield scene
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stand_in in scene.stand_ins:
                if not stand_in.holder.is_closed():
                    await stand_in.holder.close()
                with contextlib.suppress(Exception):
                    await client.revoke_lease(stand_in.lease)


async def test_a_released_liveness_lock_is_acted_on_at_once_not_at_the_next_recheck(
    scene: Scene,
) -> None:
    leader = await scene.stand_in("dead")
    await scene.detector_waits_on(leader)
    await leader.holder.close()  # the leader's session ends, as when its process dies
    await scene.revoked(leader)
    assert scene.detector.stats.outcomes == {"takeover": 1}


async def test_a_leader_change_during_a_lock_wait_moves_the_wait_to_the_new_leader(
    scene: Scene,
) -> None:
    # "a" leads (the older key), "b" is next. "a" steps down by its lease alone, its lock
    # still held: the detector must leave that wait for "b"'s lock on the change itself.
    first = await scene.stand_in("a")
    second = await scene.stand_in("b")
    assert first.token < second.token
    await scene.detector_waits_on(first)
    await scene.client.revoke_lease(first.lease)  # "a" resigns; its session stays
    await scene.detector_waits_on(second)
    await second.holder.close()  # now "b" dies
    await scene.revoked(second)
    assert scene.detector.stats.outcomes == {"takeover": 1}
