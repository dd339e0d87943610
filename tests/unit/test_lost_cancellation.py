"""A cancellation lost in a library must not hold up a resign. Pure asyncio, no etcd: the
elector's race is given a helper that swallows its first cancellation, as aetcd's
``asyncio.wait_for`` does on Python 3.11 when etcd's answer comes in just as the caller is
cancelled (CPython gh-86296). The watch side of it runs against a real etcd in
tests/integration/test_etcd_stack.py."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.leadership import elector as elector_module
from app.leadership.elector import ElectionConfig, Elector
from app.leadership.etcd import EtcdClient
from app.leadership.keepalive import LoopWatchdog
from app.leadership.term import Term

BOUND = 2.0  # seconds a cancelled consumer may take to end here (it should take ms)


async def test_a_resign_is_not_held_up_by_a_helper_that_lost_its_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(elector_module, "CANCEL_ROUND", 0.2)
    config = ElectionConfig(
        node_id="n1",
        url="http://n1.invalid",
        prefix="/paydispatch/test/",
        endpoints=("127.0.0.1:2379",),
        lease_ttl=2,
        margin=0.5,
        etcd_timeout=1.0,
        shutdown_grace=1.0,
    )

    async def work(term: Term) -> None:  # pragma: no cover - never elected here
        await term.stopping.wait()

    elector = Elector(config, EtcdClient(config.endpoints, timeout=1.0), work, LoopWatchdog())
    waiting = asyncio.Event()
    stopped = asyncio.Event()

    async def waits_for_an_event_that_never_comes() -> None:
        waiting.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # the first cancellation is lost here
            await asyncio.Event().wait()
        finally:
            stopped.set()

    race = asyncio.create_task(
        elector._race(asyncio.Event(), [], waits_for_an_event_that_never_comes())
    )
    await asyncio.wait_for(waiting.wait(), BOUND)
    await elector.resign()
    done, _ = await asyncio.wait({race}, timeout=BOUND)
    if not done:
        race.cancel()
    assert done, "the resign waited on a helper whose cancellation was lost"
    assert race.exception() is None
    assert stopped.is_set()
