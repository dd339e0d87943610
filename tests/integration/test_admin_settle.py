"""Admin reconcile writes only what the provider's ledger proves (issue 10, "Also"): a charge
whose status is neither succeeded nor declined is a 422 and nothing is written — not a 500,
and not a guess recorded as a success."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from app.settings import load_settings
from app.stack.ports import free_port
from app.web.admin import add_admin_routes
from app.web.app import create_app

ADMIN_KEY = "settle-admin-key"
KEY = "settle-key-1"


async def serve(app: web.Application) -> tuple[str, web.AppRunner]:
    port = free_port()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


@pytest.fixture
async def ledger() -> AsyncIterator[tuple[str, Callable[[str], None]]]:
    """A provider ledger (GET /v1/charges) holding one charge under KEY, its status settable."""
    state = {"status": "succeeded", "payment_id": "1"}

    async def charges(request: web.Request) -> web.Response:
        data = []
        if request.query.get("idempotency_key") == KEY:
            data.append(
                {
                    "id": "ch_settle_1",
                    "status": state["status"],
                    "amount": 100,
                    "currency": "EUR",
                    "idempotency_key": KEY,
                    "metadata": {"payment_id": state["payment_id"]},
                }
            )
        return web.json_response({"data": data, "has_more": False, "next_after": None})

    app = web.Application()
    app.router.add_get("/v1/charges", charges)
    url, runner = await serve(app)
    try:
        yield url, lambda status: state.update(status=status)
    finally:
        await runner.cleanup()


@pytest.fixture
async def admin_url(database_url: str, ledger: tuple[str, object]) -> AsyncIterator[str]:
    settings = load_settings(
        database_url=database_url,
        api_keys="plain",
        admin_api_keys=ADMIN_KEY,
        provider_url=ledger[0],
    )
    app = create_app(settings)
    add_admin_routes(app)
    url, runner = await serve(app)
    try:
        yield url
    finally:
        await runner.cleanup()


async def waiting_payment(db: asyncpg.Connection) -> int:
    payment_id: int = await db.fetchval(
        "INSERT INTO payments (idempotency_key, provider_key, request_fingerprint, amount, "
        "currency) VALUES ($1, $1, 'fp', 100, 'EUR') RETURNING id",
        KEY,
    )
    await db.execute(
        "UPDATE payments SET status = 'needs_reconciliation', fence_token = 0 WHERE id = $1",
        payment_id,
    )
    return payment_id


async def reconcile(url: str, payment_id: int) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http,
        http.post(f"{url}/v1/admin/payments/{payment_id}/reconcile") as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize("status", ["pending", "failed", "refunded", "", "SUCCEEDED"])
async def test_a_ledger_status_other_than_succeeded_or_declined_is_a_422_and_writes_nothing(
    admin_url: str,
    ledger: tuple[str, Callable[[str], None]],
    db: asyncpg.Connection,
    status: str,
) -> None:
    ledger[1](status)
    payment_id = await waiting_payment(db)

    got, problem = await reconcile(admin_url, payment_id)

    assert got == 422, problem
    assert f"status {status!r}" in str(problem["detail"])
    assert "stays needs_reconciliation" in str(problem["detail"])
    row = await db.fetchrow(
        "SELECT status, provider_charge_id FROM payments WHERE id = $1", payment_id
    )
    assert tuple(row) == ("needs_reconciliation", None)
    audit = await db.fetchrow("SELECT action, outcome FROM admin_actions ORDER BY id DESC")
    assert tuple(audit) == ("reconcile", "not_settleable")


@pytest.mark.parametrize("status", ["succeeded", "declined"])
async def test_a_ledger_that_proves_the_outcome_settles_the_payment(
    admin_url: str,
    ledger: tuple[str, Callable[[str], None]],
    db: asyncpg.Connection,
    status: str,
) -> None:
    ledger[1](status)
    payment_id = await waiting_payment(db)

    got, body = await reconcile(admin_url, payment_id)

    assert got == 200, body
    assert body == {"id": payment_id, "status": status, "provider_charge_id": "ch_settle_1"}
    assert await db.fetchval("SELECT status FROM payments WHERE id = $1", payment_id) == status


async def retry(url: str, payment_id: int) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http,
        http.post(f"{url}/v1/admin/payments/{payment_id}/retry") as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_an_operator_write_that_a_new_leader_fences_out_is_a_409_and_changes_nothing(
    admin_url: str, db: asyncpg.Connection, database_url: str
) -> None:
    # Found by the dispatch state machine: an operator's retry reads the fence's token, and a
    # leader raising the fence before the write lands made Postgres refuse it (PDF01): a 500.
    payment_id = await waiting_payment(db)
    before = await db.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id)
    racing_leader = await asyncpg.connect(database_url)
    try:
        token = await racing_leader.fetchval("SELECT max(token) FROM leader_fence") + 1
        async with racing_leader.transaction():
            # The new leader's fence raise holds the fence row until it commits; the
            # operator's write read the old token and waits for that row in its trigger.
            await racing_leader.execute(
                "SELECT paydispatch_raise_fence('payments', $1, 'racing-leader')", token
            )
            answer = asyncio.create_task(retry(admin_url, payment_id))
            await until_waiting_on_a_lock(db)
        got, problem = await answer
    finally:
        await racing_leader.close()

    assert got == 409, problem
    assert problem["title"] == "Leadership changed meanwhile"
    assert "nothing was changed" in str(problem["detail"])
    assert dict(await db.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id)) == dict(
        before
    )


async def until_waiting_on_a_lock(db: asyncpg.Connection, within: float = 5.0) -> None:
    """Wait until some session's statement on payments waits for a lock."""
    deadline = asyncio.get_running_loop().time() + within
    while not await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query ILIKE '%UPDATE payments%'"
    ):
        assert asyncio.get_running_loop().time() < deadline, "the operator's write never waited"
        await asyncio.sleep(0.02)
