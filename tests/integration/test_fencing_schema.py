"""The rules that live in Postgres itself: fencing, terminal states, append-only audit, NOTIFY.

These use raw SQL on purpose: the point is that the database enforces them whatever the
application does.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.settings import Settings


async def insert_payment(db: asyncpg.Connection, key: str = "k") -> int:
    payment_id: int = await db.fetchval(
        "INSERT INTO payments (idempotency_key, request_fingerprint, amount, currency) "
        "VALUES ($1, 'fp', 100, 'EUR') RETURNING id",
        key,
    )
    return payment_id


async def raise_fence(db: asyncpg.Connection, token: int, holder: str = "node") -> int:
    raised: int = await db.fetchval(
        "SELECT paydispatch_raise_fence('payments', $1, $2)", token, holder
    )
    return raised


async def claim(db: asyncpg.Connection, payment_id: int, token: int) -> None:
    await db.execute(
        "UPDATE payments SET status = 'in_flight', fence_token = $2, attempts = attempts + 1 "
        "WHERE id = $1",
        payment_id,
        token,
    )


async def test_write_with_a_token_below_the_fence_is_rejected(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 10)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await claim(db, payment_id, 9)
    assert caught.value.sqlstate == "PDF01"
    assert "stale fencing token 9" in str(caught.value)
    row = await db.fetchrow("SELECT status, fence_token FROM payments WHERE id = $1", payment_id)
    assert (row["status"], row["fence_token"]) == ("pending", None)


@pytest.mark.parametrize("token", [10, 11])
async def test_write_with_an_equal_or_higher_token_is_accepted(
    db: asyncpg.Connection, token: int
) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 10)
    await claim(db, payment_id, token)
    assert await db.fetchval("SELECT fence_token FROM payments WHERE id = $1", payment_id) == token


async def test_attempt_rows_are_fenced_too(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 5)
    insert = (
        "INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at, "
        "finished_at, outcome) VALUES ($1, $2, $3, 'n', now(), now(), 'retry')"
    )
    with pytest.raises(asyncpg.PostgresError) as caught:
        await db.execute(insert, payment_id, 1, 4)
    assert caught.value.sqlstate == "PDF01"
    await db.execute(insert, payment_id, 1, 5)


async def test_leader_update_without_a_token_is_rejected(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await db.execute("UPDATE payments SET attempts = 1 WHERE id = $1", payment_id)
    assert caught.value.sqlstate == "PDF02"


async def test_fence_only_moves_upward(db: asyncpg.Connection) -> None:
    assert await raise_fence(db, 7, "a") == 7
    assert await raise_fence(db, 7, "a") == 7  # the same leader re-asserting itself
    with pytest.raises(asyncpg.PostgresError) as caught:
        await raise_fence(db, 6, "old")
    assert caught.value.sqlstate == "PDF01"
    row = await db.fetchrow("SELECT token, holder FROM leader_fence WHERE name = 'payments'")
    assert (row["token"], row["holder"]) == (7, "a")


async def test_old_token_write_commits_before_the_raise_or_fails_after(
    database_url: str, db: asyncpg.Connection
) -> None:
    """The FOR SHARE read in the trigger orders an old leader's write against the raise."""
    payment_id = await insert_payment(db)
    await raise_fence(db, 1)
    old_leader = await asyncpg.connect(database_url)
    new_leader = await asyncpg.connect(database_url)
    try:
        tx = old_leader.transaction()
        await tx.start()
        await claim(old_leader, payment_id, 1)  # holds a share lock on the fence row

        raising = asyncio.create_task(raise_fence(new_leader, 2, "new"))
        done, _ = await asyncio.wait({raising}, timeout=0.5)
        assert not done, "the raise must wait for the old leader's open transaction"

        await tx.commit()  # the old write lands first…
        assert await asyncio.wait_for(raising, 5) == 2
        with pytest.raises(asyncpg.PostgresError) as caught:  # …and fails after the raise
            await old_leader.execute(
                "UPDATE payments SET status = 'pending', fence_token = 1 WHERE id = $1",
                payment_id,
            )
        assert caught.value.sqlstate == "PDF01"
    finally:
        await old_leader.close()
        await new_leader.close()
    row = await db.fetchrow("SELECT status, fence_token FROM payments WHERE id = $1", payment_id)
    assert (row["status"], row["fence_token"]) == ("in_flight", 1)


@pytest.mark.parametrize("terminal", ["succeeded", "declined", "failed"])
async def test_terminal_states_never_change(db: asyncpg.Connection, terminal: str) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 3)
    await db.execute(
        "UPDATE payments SET status = $2, fence_token = 3, completed_at = now(), "
        "provider_charge_id = 'ch_1' WHERE id = $1",
        payment_id,
        terminal,
    )
    for change in (
        "status = 'pending', completed_at = NULL",
        "provider_charge_id = 'ch_2'",
        "attempts = attempts + 1",
    ):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await db.execute(
                f"UPDATE payments SET {change}, fence_token = 3 WHERE id = $1", payment_id
            )
        assert caught.value.sqlstate == "PDT01"
    assert await db.fetchval("SELECT status FROM payments WHERE id = $1", payment_id) == terminal


async def test_request_fields_are_immutable(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 1)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await db.execute(
            "UPDATE payments SET amount = 1, fence_token = 1 WHERE id = $1", payment_id
        )
    assert caught.value.sqlstate == "PDI01"


async def test_attempts_are_append_only(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    await raise_fence(db, 1)
    await db.execute(
        "INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, started_at, "
        "finished_at, outcome) VALUES ($1, 1, 1, 'n', now(), now(), 'succeeded')",
        payment_id,
    )
    for statement in (
        "UPDATE payment_attempts SET outcome = 'failed'",
        "DELETE FROM payment_attempts",
    ):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await db.execute(statement)
        assert caught.value.sqlstate == "PDA01"


async def test_database_checks_reject_what_the_api_also_rejects(db: asyncpg.Connection) -> None:
    for amount, currency in ((0, "EUR"), (5, "eur")):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(
                "INSERT INTO payments (idempotency_key, request_fingerprint, amount, currency) "
                "VALUES ('x', 'fp', $1, $2)",
                amount,
                currency,
            )


async def test_insert_of_a_runnable_payment_notifies_the_channel(
    settings: Settings, database_url: str, db: asyncpg.Connection
) -> None:
    listener = await asyncpg.connect(database_url)
    woke: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(settings.notify_channel, lambda *args: woke.put_nowait(args[2]))
        await insert_payment(db, "notify-me")
        assert await asyncio.wait_for(woke.get(), 5) == settings.notify_channel
    finally:
        await listener.close()
