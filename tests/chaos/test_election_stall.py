"""A leader whose work stops making progress steps down instead of holding the term forever
(real etcd and Postgres; the work is a stand-in that wedges on purpose)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.leadership.elector import Elector, Leadership
from app.leadership.etcd import EtcdClient
from app.leadership.keepalive import LoopWatchdog
from app.settings import load_settings
from app.stack.etcd import EtcdCluster
from app.store.engine import create_engine

pytestmark = pytest.mark.chaos


async def test_a_wedged_leader_work_ends_the_term(database_url: str, etcd: EtcdCluster) -> None:
    settings = load_settings(
        database_url=database_url,
        etcd_endpoints=etcd.endpoints_csv,
        node_id="wedged",
        cluster_name=f"stall-{uuid.uuid4().hex[:8]}",
        db_timeout=0.5,
        provider_timeout=0.5,
        api_keys="k",
    )
    terms: list[float] = []

    async def wedged(leadership: Leadership) -> None:
        terms.append(time.monotonic())
        await asyncio.Event().wait()  # never reports progress, like a wedged driver call

    engine = create_engine(settings, pool_size=2, leader=True)
    watchdog = LoopWatchdog()
    async with EtcdClient(settings.etcd_endpoints, timeout=settings.etcd_timeout) as client:
        elector = Elector(settings, client, engine, wedged, watchdog)
        beating = asyncio.create_task(watchdog.run())
        running = asyncio.create_task(elector.run())
        try:
            limit = 3 * settings.db_timeout + settings.provider_timeout + 2
            deadline = time.monotonic() + limit + 10
            while elector.stats.transitions.get("lost", 0) < 1:
                assert time.monotonic() < deadline, "the wedged term was never ended"
                await asyncio.sleep(0.05)
            # It stepped down after about the stall limit, then campaigned and led again.
            assert terms, "the work never started"
            while len(terms) < 2:
                assert time.monotonic() < deadline, "no new term after stepping down"
                await asyncio.sleep(0.05)
            assert limit <= terms[1] - terms[0] < limit + 3
        finally:
            await elector.resign()
            await asyncio.wait_for(running, 20)
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
            await engine.dispose()
