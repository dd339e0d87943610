"""A state machine over the dispatch side, against real Postgres and a hostile provider
(hypothesis ``RuleBasedStateMachine``): generated interleavings of ingest, leading, time
passing, leadership lost, a new leader raising the fence while the old one still runs,
graceful resigns, and an operator's retry and reconcile.

After every step: no key is charged twice, no payment is ``succeeded`` without its own
charge, none is ``failed`` unless the provider called it invalid. At the end, an honest
leader drains everything and an operator works through what waits for reconciliation (as
the runbook says: reconcile, and retry what has no charge); then the exactly-once checker
(``load/checker.py``) must find nothing duplicated, lost, mismatched or stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.settings import Settings
from app.web.admin import add_admin_routes
from app.web.app import create_app
from load.checker import compare
from tests.integration.test_hostile_provider import dispatch_settings, enqueue
from tests.support.hostile import Anomaly, HostileProvider, first_attempt, hostile_provider
from tests.support.leading import Leading, leading

ADMIN_KEY = "state-machine-admin"
TOKENS = itertools.count(int(time.time() * 1000))  # strictly increasing across runs
ANOMALIES = st.sampled_from([*Anomaly, None])


class DispatchMachine(RuleBasedStateMachine):
    """One run: its own event loop, provider, references and terms; a shared database."""

    database_url = ""  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.run_id = f"sm{next(TOKENS)}"
        self.plan: dict[str, Anomaly] = {}
        self.references: list[str] = []
        self.exits = contextlib.AsyncExitStack()
        self.provider: HostileProvider = self.loop.run_until_complete(
            self.exits.enter_async_context(hostile_provider(first_attempt(self.plan)))
        )
        self.settings: Settings = dispatch_settings(self.database_url, self.provider.url)
        self.db: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(self.database_url)
        )
        self.terms: list[tuple[contextlib.AbstractAsyncContextManager[Leading], Leading]] = []

    # --- rules ----------------------------------------------------------------------------

    @rule(anomalies=st.lists(ANOMALIES, min_size=1, max_size=4))
    def ingest(self, anomalies: list[Anomaly | None]) -> None:
        """Clients pay; some payments meet an anomaly on their first attempt."""
        new = [f"{self.run_id}-{len(self.references) + n}" for n in range(len(anomalies))]
        for reference, anomaly in zip(new, anomalies, strict=True):
            if anomaly is not None:
                self.plan[reference] = anomaly
        self.references += new
        self.loop.run_until_complete(enqueue(self.settings, new))

    @rule()
    def a_new_leader_takes_over(self) -> None:
        """A new term raises the fence; any older term keeps running, now fenced out."""
        manager = leading(self.settings, token=next(TOKENS))
        term = self.loop.run_until_complete(manager.__aenter__())
        self.terms.append((manager, term))

    @precondition(lambda self: bool(self.terms))
    @rule()
    def the_newest_leader_loses_its_lease(self) -> None:
        self.terms[-1][1].lease.lost_reason = "lease lost (state machine)"

    @precondition(lambda self: bool(self.terms))
    @rule()
    def the_oldest_leader_resigns(self) -> None:
        manager, _ = self.terms.pop(0)
        self.loop.run_until_complete(manager.__aexit__(None, None, None))

    @rule(latency=st.sampled_from([0.0, 0.05, 0.3]))
    def the_provider_changes_pace(self, latency: float) -> None:
        """Slow answers keep calls in flight across the other steps (takeovers, resigns)."""
        self.provider.latency = latency

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.5]))
    def time_passes(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    @precondition(lambda self: bool(self.references))
    @rule(data=st.data(), action=st.sampled_from(["retry", "reconcile"]))
    def an_operator_acts(self, data: st.DataObject, action: str) -> None:
        reference = data.draw(st.sampled_from(self.references))
        self.loop.run_until_complete(self._admin(action, reference))

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def nothing_is_ever_recorded_wrong(self) -> None:
        rows = self.loop.run_until_complete(self._rows())
        keys = [c["idempotency_key"] for c in self.provider.charges]
        assert len(keys) == len(set(keys)), "a key was charged twice"
        for row in rows:
            mine = [c for c in self.provider.charges if c["idempotency_key"] == row["provider_key"]]
            if row["status"] in ("succeeded", "declined"):
                assert [c["id"] for c in mine] == [row["provider_charge_id"]], row
            if row["status"] == "failed":
                anomaly = self.plan.get(row["reference"])
                assert anomaly is not None, row
                assert anomaly.final, row
                assert mine == [], row

    # --- the end --------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self._settle_and_check())
        finally:
            self.loop.run_until_complete(self._close())
            self.loop.close()

    async def _settle_and_check(self) -> None:
        for manager, _ in self.terms:
            await manager.__aexit__(None, None, None)
        self.terms = []
        async with leading(self.settings, token=next(TOKENS)):
            await self._until_none(("pending", "in_flight"))
            # The operator's runbook: reconcile what waits; what has no charge is retried.
            for row in await self._rows():
                if row["status"] == "needs_reconciliation":
                    status, _ = await self._admin("reconcile", row["reference"])
                    if status == 409:
                        await self._admin("retry", row["reference"])
            await self._until_none(("pending", "in_flight", "needs_reconciliation"))
        rows = await self._rows()
        verdict = compare(rows, self.provider.charges)
        assert verdict.ok, verdict.to_json()
        assert verdict.accepted == len(self.references)

    async def _until_none(self, statuses: tuple[str, ...]) -> None:
        deadline = time.monotonic() + 30
        while any(row["status"] in statuses for row in await self._rows()):
            assert time.monotonic() < deadline, [
                (r["reference"], r["status"], r["last_error"]) for r in await self._rows()
            ]
            await asyncio.sleep(0.05)

    async def _rows(self) -> list[dict[str, Any]]:
        found = await self.db.fetch(
            "SELECT * FROM payments WHERE reference LIKE $1 ORDER BY id", f"{self.run_id}-%"
        )
        return [dict(row) for row in found]

    async def _admin(self, action: str, reference: str) -> tuple[int, Any]:
        (row,) = [r for r in await self._rows() if r["reference"] == reference]
        settings = self.settings.model_copy(update={"admin_api_keys": (ADMIN_KEY,)})
        app = create_app(settings)
        add_admin_routes(app)
        async with TestClient(TestServer(app)) as client:
            response = await client.post(
                f"/v1/admin/payments/{row['id']}/{action}",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            return response.status, json.loads(await response.text())

    async def _close(self) -> None:
        for manager, _ in self.terms:
            with contextlib.suppress(Exception):
                await manager.__aexit__(None, None, None)
        await self.db.close()
        await self.exits.aclose()


def test_generated_interleavings_keep_every_payment_exactly_once(database_url: str) -> None:
    DispatchMachine.database_url = database_url
    run = DispatchMachine.TestCase
    run.settings = settings(
        max_examples=15,
        stateful_step_count=15,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    run().runTest()
