"""The fence guards itself (issue 10, defects 6 and 7).

- No statement lowers, renames or deletes a fence row, not even the table owner's.
- The raise function creates no row: an unknown fence name is an error (PDF03).
- Replicas run as a least-privilege role: no DDL, no direct write to ``leader_fence``, the
  fence raised only through its function (and only upward), only the DML the service needs.
- A replica configured with a fence name the schema's triggers do not enforce refuses to
  start, before it answers anything or campaigns.

Raw SQL on purpose: the point is what the database allows whatever the application does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from app.settings import load_settings
from app.stack.etcd import EtcdCluster
from app.stack.ports import free_port
from app.stack.postgres import PostgresServer
from app.stack.sandbox_process import SandboxProcess
from app.store.engine import create_engine
from app.store.migrate import migrate
from load.loadgen import post_payments
from tests.cluster import TEST_API_KEY, Replicas, cluster_env, running_replicas
from tests.conftest import REPLICA_LOGIN, admin_execute, replica_url


async def raise_fence(conn: asyncpg.Connection, token: int, name: str = "payments") -> int:
    raised: int = await conn.fetchval("SELECT paydispatch_raise_fence($1, $2, 'test')", name, token)
    return raised


async def fence_rows(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    return [tuple(row) for row in await conn.fetch("SELECT name, token FROM leader_fence")]


# --- the guard holds for the owner too ----------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE leader_fence SET token = 0",
        "UPDATE leader_fence SET token = token - 1 WHERE name = 'payments'",
        "UPDATE leader_fence SET name = 'elsewhere'",
        "DELETE FROM leader_fence",
        "DELETE FROM leader_fence WHERE name = 'payments'",
        "TRUNCATE leader_fence",
    ],
)
async def test_no_statement_lowers_renames_or_deletes_the_fence_even_the_owners(
    db: asyncpg.Connection, statement: str
) -> None:
    await raise_fence(db, 500)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await db.execute(statement)
    assert caught.value.sqlstate == "PDF04", caught.value
    assert await fence_rows(db) == [("payments", 500)]


async def test_the_fence_still_moves_up_and_unrelated_columns_may_change(
    db: asyncpg.Connection,
) -> None:
    await raise_fence(db, 5)
    await db.execute("UPDATE leader_fence SET token = 9, holder = 'operator'")
    await db.execute("UPDATE leader_fence SET holder = 'someone'")
    assert await fence_rows(db) == [("payments", 9)]


async def test_raising_an_unknown_fence_is_an_error_and_creates_no_row(
    db: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await raise_fence(db, 500, name="payments-typo")
    assert caught.value.sqlstate == "PDF03"
    assert "payments-typo" in str(caught.value)
    assert await fence_rows(db) == [("payments", 0)]


# --- the replica role ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE leader_fence SET token = 0",
        "UPDATE leader_fence SET token = 999999",  # even upward: only through the function
        "DELETE FROM leader_fence",
        "INSERT INTO leader_fence (name, token) VALUES ('mine', 0)",
        "TRUNCATE leader_fence",
        "SELECT token FROM leader_fence FOR UPDATE",
    ],
)
async def test_the_replica_role_cannot_write_the_fence_table_directly(
    replica_db: asyncpg.Connection, db: asyncpg.Connection, statement: str
) -> None:
    await raise_fence(db, 7)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await replica_db.execute(statement)
    assert await fence_rows(db) == [("payments", 7)]


async def test_the_replica_role_raises_the_fence_only_upward_through_the_function(
    replica_db: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    assert await raise_fence(replica_db, 7) == 7
    assert await raise_fence(replica_db, 7) == 7  # the same leader re-asserting itself
    with pytest.raises(asyncpg.PostgresError) as caught:
        await raise_fence(replica_db, 6)
    assert caught.value.sqlstate == "PDF01"
    with pytest.raises(asyncpg.PostgresError) as caught:
        await raise_fence(replica_db, 8, name="mine")
    assert caught.value.sqlstate == "PDF03"
    assert await fence_rows(db) == [("payments", 7)]


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE mine (id int)",
        "ALTER TABLE leader_fence DISABLE TRIGGER ALL",
        "ALTER TABLE payments DISABLE TRIGGER payments_fence",
        "DROP TRIGGER leader_fence_guard ON leader_fence",
        "DROP TABLE payment_attempts",
        "ALTER TABLE payments ADD COLUMN x int",
        "DROP FUNCTION paydispatch_assert_fence(text, bigint)",
        "CREATE OR REPLACE FUNCTION paydispatch_check_fence() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ],
)
async def test_the_replica_role_cannot_change_the_schema(
    replica_db: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await replica_db.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM payments",
        "TRUNCATE payments",
        "DELETE FROM payment_attempts",
        "DELETE FROM admin_actions",
        "UPDATE admin_actions SET outcome = 'forged'",
        "UPDATE payment_attempts SET outcome = 'succeeded'",
        "SELECT * FROM alembic_version",
    ],
)
async def test_the_replica_role_has_no_dml_beyond_what_the_service_needs(
    replica_db: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await replica_db.execute(statement)


async def test_the_replica_role_can_ingest_lead_and_record(
    replica_db: asyncpg.Connection,
) -> None:
    """The statements a replica does make, in the shape the store makes them."""
    payment_id = await replica_db.fetchval(
        "INSERT INTO payments (idempotency_key, request_fingerprint, amount, currency) "
        "VALUES ('k', 'fp', 100, 'EUR') RETURNING id"
    )
    await raise_fence(replica_db, 3)
    async with replica_db.transaction():
        assert await replica_db.fetchval("SELECT paydispatch_assert_fence('payments', 3)") == 3
        await replica_db.execute(
            "UPDATE payments SET status = 'in_flight', fence_token = 3, attempts = 1 "
            "WHERE id = (SELECT id FROM payments WHERE status = 'pending' "
            "FOR UPDATE SKIP LOCKED LIMIT 1)"
        )
        await replica_db.execute(
            "INSERT INTO payment_attempts (payment_id, attempt, fence_token, node_id, "
            "started_at, finished_at, outcome) VALUES ($1, 1, 3, 'n', now(), now(), 'retry')",
            payment_id,
        )
    await replica_db.execute(
        "INSERT INTO admin_actions (actor, node_id, action, outcome) "
        "VALUES ('key:x', 'n', 'retry', 'refused')"
    )
    assert await replica_db.fetchval("SELECT token FROM leader_fence") == 3


# --- migrate creates and updates the role -------------------------------------------------


@pytest.fixture
async def fresh_database(pg_server: PostgresServer) -> AsyncIterator[str]:
    """An empty database of this test's own (not from the migrated template)."""
    name = f"g_{uuid.uuid4().hex[:12]}"
    await admin_execute(pg_server, f"CREATE DATABASE {name}")
    try:
        yield pg_server.url(name)
    finally:
        await admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_migrate_creates_a_missing_replica_role_and_resets_its_grants(
    pg_server: PostgresServer, fresh_database: str
) -> None:
    role = f"replica_{uuid.uuid4().hex[:8]}"
    settings = load_settings(database_url=fresh_database, replica_role=role)
    conn = await asyncpg.connect(fresh_database)

    async def can(what: str, obj: str, privilege: str, who: str = role) -> bool:
        allowed: bool = await conn.fetchval(
            f"SELECT has_{what}_privilege($1, $2, $3)", who, obj, privilege
        )
        return allowed

    try:
        await migrate(settings)
        row = await conn.fetchrow(
            "SELECT rolcanlogin, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = $1", role
        )
        assert row is not None
        assert tuple(row) == (False, False, False)
        assert await can("table", "payments", "INSERT")
        assert await can("table", "payments", "UPDATE")
        assert not await can("table", "payments", "DELETE")
        assert await can("table", "leader_fence", "SELECT")
        assert not await can("table", "leader_fence", "UPDATE")
        raise_fn = "paydispatch_raise_fence(text, bigint, text)"
        assert await can("function", raise_fn, "EXECUTE")
        assert not await can("function", raise_fn, "EXECUTE", who="public")

        # A privilege granted by hand is taken back by the next migrate: the grants are
        # what this version of paydispatch needs, nothing more.
        await conn.execute(f"GRANT DELETE, TRUNCATE ON payments, leader_fence TO {role}")
        await migrate(settings)
        assert not await can("table", "payments", "DELETE")
        assert not await can("table", "leader_fence", "TRUNCATE")
        assert await can("table", "payments", "INSERT")
    finally:
        await conn.close()
        await admin_execute(
            pg_server,
            f"DROP DATABASE IF EXISTS {fresh_database.rsplit('/', 1)[1]} WITH (FORCE)",
            f"DROP ROLE IF EXISTS {role}",
        )


async def test_migrate_refuses_a_fence_name_the_schema_does_not_enforce(database_url: str) -> None:
    from app.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        await migrate(load_settings(database_url=database_url, fence_name="payments-typo"))
    message = str(caught.value)
    assert "PAYDISPATCH_FENCE_NAME" in message
    assert "'payments-typo'" in message
    assert "'payments'" in message


# --- a replica with the wrong fence name refuses to start --------------------------------


async def test_the_enforced_fence_name_is_read_from_the_schema(database_url: str) -> None:
    from app.store.fence import enforced_fence_name

    engine = create_engine(load_settings(database_url=replica_url(database_url)))
    try:
        assert await enforced_fence_name(engine) == "payments"
    finally:
        await engine.close()


def test_a_replica_whose_fence_name_the_schema_does_not_enforce_refuses_to_start(
    database_url: str, etcd: EtcdCluster
) -> None:
    env = {
        **os.environ,
        **cluster_env(database_url, etcd.endpoints_csv),
        "PAYDISPATCH_FENCE_NAME": "payments-typo",
        "PAYDISPATCH_NODE_ID": "typo",
        "PAYDISPATCH_PORT": str(free_port()),
    }
    try:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            "the replica started (and would campaign) with a fence name nobody enforces"
        ) from exc
    assert result.returncode != 0
    assert "PAYDISPATCH_FENCE_NAME" in result.stderr
    assert "'payments-typo'" in result.stderr
    assert "'payments'" in result.stderr
    assert "Traceback" not in result.stderr

    async def rows() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(database_url)
        try:
            return await fence_rows(conn)
        finally:
            await conn.close()

    assert asyncio.run(rows()) == [("payments", 0)]


# --- a whole replica under the role --------------------------------------------------------


@pytest.fixture
def replicas(
    database_url: str, etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> Iterator[Replicas]:
    env = cluster_env(database_url, etcd.endpoints_csv, PAYDISPATCH_PROVIDER_URL=provider.base_url)
    assert REPLICA_LOGIN in env["PAYDISPATCH_DATABASE_URL"]
    with running_replicas(2, env, tmp_path / "replicas") as group:
        yield group


async def test_replicas_under_the_replica_role_ingest_lead_and_charge(
    replicas: Replicas, database_url: str
) -> None:
    leader = await asyncio.to_thread(replicas.wait_leader)
    load = await post_payments([r.url for r in replicas.all], 20, api_key=TEST_API_KEY)
    assert len(load.acknowledged) == 20
    conn = await asyncpg.connect(database_url)
    try:

        async def succeeded() -> int:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM payments WHERE status = 'succeeded'"
            )
            return count

        deadline = asyncio.get_running_loop().time() + 30
        while await succeeded() < 20:
            assert asyncio.get_running_loop().time() < deadline, "payments did not succeed"
            await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT token FROM leader_fence") == leader["token"]
        users = {
            row["usename"]
            for row in await conn.fetch(
                "SELECT usename FROM pg_stat_activity "
                "WHERE application_name LIKE 'paydispatch:%' AND datname = current_database()"
            )
        }
        assert users == {REPLICA_LOGIN}
    finally:
        await conn.close()
