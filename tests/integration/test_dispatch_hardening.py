"""Regression tests for the holes an independent review found in dispatch (issue 10): each
one reproduced the wrong outcome on the code before its fix. Real Postgres, a real HTTP
provider (tests/support/hostile.py), the real fence; the test plays the elector."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from app.dispatch.leader import stall_limit
from app.errors import DatabaseUnavailable, LeadershipLost
from app.settings import Settings
from app.web.app import create_app
from tests.integration.test_hostile_provider import dispatch_settings, enqueue, rows, settle
from tests.support.hostile import HostileProvider, first_attempt, hostile_provider
from tests.support.leading import leading
from tests.support.proxy import proxied

TWO_DAYS = timedelta(days=2)


@pytest.fixture
async def provider() -> AsyncIterator[HostileProvider]:
    async with hostile_provider(first_attempt({})) as running:
        yield running


def charge_at_provider(provider: HostileProvider, row: dict[str, Any]) -> dict[str, Any]:
    """Make the charge the provider would have made for ``row`` earlier (a sent attempt)."""
    return provider.charge(
        row["provider_key"],
        {
            "amount": row["amount"],
            "currency": row["currency"],
            "reference": row["reference"],
            "metadata": {"payment_id": str(row["id"])},
        },
    )


async def backdate(db: asyncpg.Connection, ids: list[int], age: timedelta) -> None:
    """Pretend these payments (and their provider keys) were created ``age`` ago."""
    await db.execute("ALTER TABLE payments DISABLE TRIGGER payments_guard")
    try:
        await db.execute(
            "UPDATE payments SET created_at = now() - $2::interval, "
            "provider_key_issued_at = now() - $2::interval, fence_token = "
            "(SELECT max(token) FROM leader_fence) WHERE id = ANY($1::bigint[])",
            ids,
            age,
        )
    finally:
        await db.execute("ALTER TABLE payments ENABLE TRIGGER payments_guard")


async def left_in_flight_by(db: asyncpg.Connection, ids: list[int], token: int) -> None:
    """A leader with ``token`` claimed these and died mid-call."""
    await db.execute("SELECT paydispatch_raise_fence('payments', $1, 'dead-leader')", token)
    await db.execute(
        "UPDATE payments SET status = 'in_flight', attempts = attempts + 1, fence_token = $2 "
        "WHERE id = ANY($1::bigint[])",
        ids,
        token,
    )


async def quiet_for(db: asyncpg.Connection, payment_id: int, age: timedelta) -> None:
    """Pretend nothing happened to the payment (no change, no attempt) for ``age``."""
    await db.execute(
        "UPDATE payments SET updated_at = now() - $2::interval, fence_token = "
        "(SELECT max(token) FROM leader_fence) WHERE id = $1",
        payment_id,
        age,
    )


async def park(db: asyncpg.Connection, ids: list[int]) -> None:
    """Put these payments in needs_reconciliation, in this order of updated_at."""
    for payment_id in ids:
        await db.execute(
            "UPDATE payments SET status = 'needs_reconciliation', updated_at = clock_timestamp(), "
            "fence_token = (SELECT max(token) FROM leader_fence) WHERE id = $1",
            payment_id,
        )


# --- defect 1: re-sent past the provider's key retention ---------------------------------------


async def test_a_payment_left_in_flight_past_key_retention_is_looked_up_never_re_sent(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["old-charged", "old-uncharged"])
    charged, uncharged = await rows(db, ["old-charged", "old-uncharged"])
    charge = charge_at_provider(provider, charged)  # the dead leader's call went through
    await left_in_flight_by(db, [charged["id"], uncharged["id"]], token=5)
    await backdate(db, [charged["id"], uncharged["id"]], TWO_DAYS)

    async with leading(settings, token=6):
        await until_status(db, "old-charged", "succeeded")
        await until_status(db, "old-uncharged", "needs_reconciliation")
        await asyncio.sleep(0.5)  # a few more sweeps: still never sent

    assert provider.answered == [], "a payment past key retention was sent again"
    after = {row["reference"]: row for row in await rows(db, ["old-charged", "old-uncharged"])}
    assert after["old-charged"]["provider_charge_id"] == charge["id"]
    assert after["old-uncharged"]["status"] == "needs_reconciliation"
    assert "older than the provider keeps keys" in after["old-uncharged"]["last_error"]
    assert len(provider.charges) == 1


async def test_admin_retry_of_an_old_payment_is_refused_while_the_provider_holds_a_charge(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["old"])
    (row,) = await rows(db, ["old"])
    charge_at_provider(provider, row)
    await backdate(db, [row["id"]], TWO_DAYS)
    await park(db, [row["id"]])
    await quiet_for(db, row["id"], timedelta(hours=1))

    status, body = await admin_retry(settings, row["id"])

    assert status == 409
    assert "reconcile" in body["detail"]
    (after,) = await rows(db, ["old"])
    assert after["status"] == "needs_reconciliation"
    assert after["provider_key"] == row["provider_key"]


async def test_admin_retry_of_an_old_payment_without_a_charge_sends_it_once_under_a_new_key(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["old"])
    (row,) = await rows(db, ["old"])
    await backdate(db, [row["id"]], TWO_DAYS)
    await park(db, [row["id"]])
    await quiet_for(db, row["id"], timedelta(hours=1))

    status, _ = await admin_retry(settings, row["id"])
    assert status == 200
    async with leading(settings, token=2):
        await until_status(db, "old", "succeeded")

    (after,) = await rows(db, ["old"])
    assert after["provider_key"] != row["provider_key"]
    assert provider.lookups == [row["provider_key"]], "no charge was proven absent first"
    assert [c["idempotency_key"] for c in provider.charges] == [after["provider_key"]]


async def test_admin_retry_of_an_old_payment_sent_moments_ago_is_refused_without_a_lookup(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    # Found by review: a call under the old key may still be processing at the provider,
    # where the ledger does not list it yet; "no charge found" proves nothing then, and a
    # new key would be a second charge.
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["old"])
    (row,) = await rows(db, ["old"])
    await backdate(db, [row["id"]], TWO_DAYS)
    await park(db, [row["id"]])  # parked just now, after its last attempt

    status, body = await admin_retry(settings, row["id"])

    assert status == 409
    assert "in progress" in body["detail"]
    assert provider.lookups == []
    (after,) = await rows(db, ["old"])
    assert after["provider_key"] == row["provider_key"]
    assert after["status"] == "needs_reconciliation"


# --- defect 3: charges are accepted without checking they belong to the payment -----------------


async def test_a_reused_client_key_never_replays_an_old_charge_for_a_new_payment(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    # The payments table was reset while the provider's ledger survived: the provider still
    # holds a charge filed under the key a client now uses again for a new payment.
    provider.charge(
        "client-again",
        {"amount": 999, "currency": "EUR", "reference": "old", "metadata": {"payment_id": "1"}},
    )
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["again"])  # client key "client-again"

    async with leading(settings, token=1):
        settled = await settle(db, ["again"])

    (row,) = settled
    assert row["status"] == "succeeded"
    charges = [c for c in provider.charges if c["idempotency_key"] == row["provider_key"]]
    assert [c["id"] for c in charges] == [row["provider_charge_id"]]
    assert row["provider_key"] != "client-again"


async def test_the_sweep_never_settles_a_payment_from_a_charge_that_is_not_its_own(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["parked"])
    (row,) = await rows(db, ["parked"])
    # The ledger holds a charge under this payment's key, but for another amount.
    provider.charge(row["provider_key"], {"amount": 1, "currency": "EUR", "metadata": None})
    await park(db, [row["id"]])

    async with leading(settings, token=1):
        await asyncio.sleep(1.0)  # several sweeps

    (after,) = await rows(db, ["parked"])
    assert after["status"] == "needs_reconciliation"
    assert after["provider_charge_id"] is None


# --- defect 4: the reconcile sweep starved ----------------------------------------------------


async def test_uncharged_parked_payments_never_hide_the_charged_ones_behind_them(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    uncharged = [f"u{n}" for n in range(55)]
    charged = [f"c{n}" for n in range(5)]
    await enqueue(settings, [*uncharged, *charged])
    for row in await rows(db, charged):
        charge_at_provider(provider, row)
    # The 55 uncharged ones have waited longest: the old sweep looked at the 50 oldest only.
    await park(db, [row["id"] for row in await rows(db, uncharged)])
    await park(db, [row["id"] for row in await rows(db, charged)])

    async with leading(settings, token=1):
        for reference in charged:
            await until_status(db, reference, "succeeded")


async def test_a_failed_lookup_is_skipped_and_does_not_end_the_sweep(
    database_url: str, db: asyncpg.Connection, provider: HostileProvider
) -> None:
    settings = dispatch_settings(database_url, provider.url)
    await enqueue(settings, ["broken", "fine"])
    broken, fine = await rows(db, ["broken", "fine"])
    charge_at_provider(provider, broken)
    charge_at_provider(provider, fine)
    provider.ledger_fails_for.add(broken["provider_key"])
    await park(db, [broken["id"], fine["id"]])  # the broken one first

    async with leading(settings, token=1):
        await until_status(db, "fine", "succeeded")

    (still,) = await rows(db, ["broken"])
    assert still["status"] == "needs_reconciliation"


# --- defect 5: every way out of a call ends in an outcome, a release or the end of the term ---


async def test_a_lease_lost_mid_batch_ends_the_term_and_strands_nothing(
    database_url: str, db: asyncpg.Connection
) -> None:
    async with hostile_provider(first_attempt({})) as provider:
        provider.latency = 0.3  # calls are still in flight when the lease goes
        settings = dispatch_settings(database_url, provider.url)
        references = [f"p{n}" for n in range(20)]
        await enqueue(settings, references)
        async with leading(settings, token=1) as term:
            await until_some_in_flight(db, references)
            term.lease.lost_reason = "lease 1 is gone (revoked by an operator)"
            with pytest.raises(LeadershipLost):
                await asyncio.wait_for(asyncio.shield(term.task), 10)
        in_flight = [r for r in await rows(db, references) if r["status"] == "in_flight"]
        assert in_flight == [], "claimed payments left in flight by a term that ended"


# --- helpers --------------------------------------------------------------------------------


async def until_status(db: asyncpg.Connection, reference: str, status: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        (row,) = await rows(db, [reference])
        if row["status"] == status:
            return
        assert time.monotonic() < deadline, f"{reference} is {row['status']}, not {status}"
        await asyncio.sleep(0.05)


async def until_some_in_flight(
    db: asyncpg.Connection, references: list[str], at_least: int = 1
) -> None:
    deadline = time.monotonic() + 30
    while sum(r["status"] == "in_flight" for r in await rows(db, references)) < at_least:
        assert time.monotonic() < deadline, "nothing was ever claimed"
        await asyncio.sleep(0.01)


async def admin_retry(settings: Settings, payment_id: int) -> tuple[int, Any]:
    """POST /v1/admin/payments/{id}/retry on a real server with the admin routes."""
    from aiohttp.test_utils import TestClient, TestServer

    from app.web.admin import add_admin_routes

    admin_settings = settings.model_copy(update={"admin_api_keys": ("admin-key",)})
    app = create_app(admin_settings)
    add_admin_routes(app)
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            f"/v1/admin/payments/{payment_id}/retry",
            headers={"Authorization": "Bearer admin-key"},
        )
        return response.status, json.loads(await response.text())


async def test_a_leader_cut_from_postgres_with_every_slot_busy_still_gives_its_term_up(
    database_url: str, db: asyncpg.Connection
) -> None:
    # Found by review: with every slot taken no claim ran, and the claim loop counted its
    # idle rounds as progress, so the stall limit never fired and no healthy replica led.
    async with hostile_provider(first_attempt({})) as provider, proxied(database_url) as cut:
        provider.latency = 1.0
        direct = dispatch_settings(database_url, provider.url)
        settings = direct.model_copy(
            update={
                "database_url": cut.url_for(database_url),
                "db_timeout": 0.5,
                "provider_timeout": 2.0,
                "dispatch_concurrency": 4,
                "dispatch_batch_size": 4,
            }
        )
        await enqueue(direct, [f"busy{n}" for n in range(12)])
        async with leading(settings, token=20) as term:
            await until_some_in_flight(db, [f"busy{n}" for n in range(12)], at_least=4)
            cut.cut()
            limit = stall_limit(settings)
            done, _ = await asyncio.wait({term.task}, timeout=limit + 10)
            assert done, f"the term outlived the stall limit ({limit:.1f}s) by 10s"
            assert isinstance(term.task.exception(), LeadershipLost | DatabaseUnavailable)


async def test_rows_claimed_by_a_transaction_whose_answer_was_lost_are_released_and_sent(
    database_url: str, db: asyncpg.Connection
) -> None:
    # Found by review: a claim whose COMMIT landed but whose answer was lost left rows in
    # flight under the leader's own token, tracked by nobody, until leadership changed.
    async with hostile_provider(first_attempt({})) as provider, proxied(database_url) as cut:
        direct = dispatch_settings(database_url, provider.url)
        settings = direct.model_copy(
            update={"database_url": cut.url_for(database_url), "db_timeout": 0.5}
        )
        async with leading(settings, token=30):
            await asyncio.sleep(0.3)  # the term is up and fenced
            cut.cut()  # the leader's claims now fail...
            await enqueue(direct, ["lost0", "lost1", "lost2"])
            # ...and one of them did commit, as far as the database is concerned.
            await db.execute(
                "UPDATE payments SET status = 'in_flight', fence_token = 30, "
                "attempts = attempts + 1 WHERE reference LIKE 'lost%'"
            )
            await asyncio.sleep(1.0)
            cut.heal()
            for reference in ("lost0", "lost1", "lost2"):
                await until_status(db, reference, "succeeded")
    assert len(provider.charges) == 3
