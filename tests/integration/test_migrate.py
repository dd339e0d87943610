"""`paydispatch migrate` run by several replicas at once: one migrates, all succeed."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import asyncpg

from app.settings import load_settings
from app.stack.postgres import PostgresServer
from app.store.migrate import head_revision
from tests.conftest import admin_execute


async def test_five_concurrent_migrate_processes_all_succeed_and_migrate_once(
    pg_server: PostgresServer,
) -> None:
    name = f"m_{uuid.uuid4().hex[:12]}"
    await admin_execute(pg_server, f"CREATE DATABASE {name}")
    url = pg_server.url(name)
    env = {**os.environ, "PAYDISPATCH_DATABASE_URL": url}
    try:
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app.cli",
                "migrate",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(5)
        ]
        results = await asyncio.gather(*(proc.communicate() for proc in processes))
        for proc, (_out, err) in zip(processes, results, strict=True):
            assert proc.returncode == 0, err.decode()
        outputs = [out.decode() for out, _ in results]
        head = head_revision(load_settings(database_url=url))
        assert all(f"at revision {head}" in out for out in outputs)
        # Exactly one process saw the empty database and migrated it.
        assert sum("(was None)" in out for out in outputs) == 1

        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetch("SELECT version_num FROM alembic_version") == [(head,)]
            fence = await conn.fetch("SELECT name, token FROM leader_fence")
            assert [tuple(row) for row in fence] == [("payments", 0)]
        finally:
            await conn.close()
    finally:
        await admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_migrate_reports_an_unreachable_database_clearly() -> None:
    env = {**os.environ, "PAYDISPATCH_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "migrate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert b"Traceback" not in err
    assert b"Postgres" in err or b"connect" in err.lower()
