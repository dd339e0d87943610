"""``paydispatch migrate``: Alembic upgrade to head, serialised by a Postgres advisory lock.

Five replicas starting at once all call this; the first takes the lock and migrates, the
others wait on the lock and then find nothing left to do. All of them succeed.

The one place besides the tests that loads SQLAlchemy and Alembic: the ``migrate`` command
imports this module lazily, and nothing a running replica imports reaches it
(tests/unit/test_architecture.py holds that).
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import migrations
from app.settings import Settings
from app.store.engine import Connection as DriverConnection
from app.store.engine import engine_url, typed_errors
from app.store.fence import check_fence_name, read_enforced_fence_name
from app.store.roles import sync_replica_role

log = logging.getLogger(__name__)

# Arbitrary but fixed: "paydispatch migrate" as a 64-bit advisory lock key.
MIGRATION_LOCK_KEY = 0x7061796D6967


def alembic_config(settings: Settings) -> Config:
    """An Alembic config pointing at the packaged ``migrations`` directory."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", engine_url(settings.database_url).replace("%", "%%"))
    config.attributes["fence_name"] = settings.fence_name
    config.attributes["notify_channel"] = settings.notify_channel
    return config


def head_revision(settings: Settings) -> str:
    """The newest revision shipped with this version of paydispatch."""
    head = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    assert head is not None, "migrations directory has no revisions"
    return head


async def migrate(settings: Settings) -> tuple[str | None, str]:
    """Upgrade the database to head and set the replica role's privileges (creating the
    role if missing). Returns (revision before, revision after).

    Run it as the schema owner. Raises DatabaseUnavailable when Postgres cannot be reached,
    ConfigurationError when the role cannot be set up or PAYDISPATCH_FENCE_NAME is not the
    fence the schema enforces (the schema is upgraded all the same).
    """
    with typed_errors():
        return await _migrate(settings)


async def _migrate(settings: Settings) -> tuple[str | None, str]:
    config = alembic_config(settings)
    engine = create_async_engine(engine_url(settings.database_url), pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            # Session-level lock on its own connection, held across Alembic's transactions.
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await conn.commit()
            try:
                before = await conn.run_sync(_current_revision)
                await conn.run_sync(_upgrade, config)
                await conn.commit()
                await sync_replica_role(conn, settings.replica_role)
                await conn.commit()
                after = await conn.run_sync(_current_revision)
                # After the commit: the schema is fine; this configuration is not, and every
                # replica started with it would refuse to start (say so now, once).
                # The store's reads take the driver's connection, as a replica's do.
                raw = await conn.get_raw_connection()
                enforced = await read_enforced_fence_name(DriverConnection(raw.driver_connection))
                check_fence_name(settings.fence_name, enforced)
            finally:
                await conn.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
                await conn.commit()
    finally:
        await engine.dispose()
    if after is None:
        raise RuntimeError("migration finished without a current revision")
    return before, after


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
