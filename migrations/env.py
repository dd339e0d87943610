"""Alembic environment (async engine on asyncpg).

``paydispatch migrate`` (app.store.migrate) runs Alembic inside ``AsyncConnection.run_sync`` and
hands over the synchronous connection that holds the migration advisory lock; the plain
``alembic`` path (URL in the config) is kept for developers.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def _run(connection: Connection) -> None:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported; use paydispatch migrate")
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: run migrations with `paydispatch migrate`")
    asyncio.run(_run_with_own_engine(url))


_main()
