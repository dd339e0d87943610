"""Leading without an election: the dispatch side given a term by the test.

The elector is tested on its own against real etcd (tests/integration/test_elector.py);
here the test plays the elector and hands ``DispatchLeader`` a term whose lease is always
freshly renewed, so what is tested is the dispatch side against a real Postgres and a real
HTTP provider. Leadership changes are real too: a new term raises the real fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.dispatch.dispatcher import DispatchStats
from app.dispatch.leader import LEADER_POOL_SIZE, DispatchLeader
from app.dispatch.provider import ProviderClient
from app.leadership.term import Term
from app.obs.metrics import Metrics
from app.settings import Settings
from app.store.engine import Engine, create_engine


class FreshLease:
    """A lease whose last renewal was always just confirmed, until a test says it is lost."""

    def __init__(self) -> None:
        self.lost_reason: str | None = None

    @property
    def last_ok_sent(self) -> float:
        return time.monotonic()


@dataclass
class Leading:
    """A running term of the dispatch side, and what it counted."""

    term: Term
    task: asyncio.Task[None]
    lease: FreshLease
    stats: DispatchStats = field(default_factory=DispatchStats)

    async def stop(self, grace: float = 5.0) -> None:
        """End the term gracefully (like a resign), then cancel whatever is left."""
        self.term.stopping.set()
        # How the term ended is the test's business (it awaits ``task`` itself if it cares).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.task), grace)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def fresh_term(settings: Settings, token: int) -> tuple[Term, FreshLease]:
    """A term with fencing token ``token`` on a lease that stays fresh until the test says
    it is lost (``lease.lost_reason``)."""
    lease = FreshLease()
    term = Term(
        token=token,
        key=f"test/{token}",
        lease_id=token,
        node_id=settings.node_id,
        lease=lease,
        ttl=settings.lease_ttl,
        margin=settings.lease_safety_margin,
    )
    return term, lease


def provider_client(settings: Settings) -> ProviderClient:
    """The provider client a replica builds for ``settings`` (close it, or use ``async with``)."""
    return ProviderClient(settings.provider_url, connections=settings.dispatch_concurrency)


def dispatch_leader(
    settings: Settings,
    engine: Engine,
    provider: ProviderClient,
    stats: DispatchStats | None = None,
) -> DispatchLeader:
    """The dispatch side a replica builds, on ``engine`` (its leader pool), calling the
    provider through ``provider``."""
    return DispatchLeader(
        settings,
        engine,
        provider,
        stats if stats is not None else DispatchStats(),
        Metrics(),
    )


@contextlib.asynccontextmanager
async def leading(
    settings: Settings, token: int, engine: Engine | None = None
) -> AsyncIterator[Leading]:
    """Lead with fencing token ``token`` until the block ends, on ``engine`` (a replica's
    leader pool, kept open for the caller's next term) or on a pool of this term's own."""
    own_engine = engine is None
    if engine is None:
        engine = create_engine(settings, pool_size=LEADER_POOL_SIZE, leader=True)
    async with provider_client(settings) as provider:
        stats = DispatchStats()
        leader = dispatch_leader(settings, engine, provider, stats)
        term, lease = fresh_term(settings, token)
        running = Leading(term, asyncio.create_task(leader(term)), lease, stats)
        try:
            yield running
        finally:
            await running.stop()
            if own_engine:
                await engine.close()
