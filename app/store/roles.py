"""The least-privilege role replicas run as, kept in step by ``paydispatch migrate``.

A replica needs to ingest, read, claim and record payments, append attempts and admin actions,
read the fence and raise it through ``paydispatch_raise_fence``. It needs no DDL, no DELETE
anywhere, and no direct write to ``leader_fence``: with those, a bug or a stolen password could
lower or remove the fence and let a superseded leader write again.

Every migrate resets the role's privileges on this schema to exactly the list below, so a
privilege granted by hand, or needed by an older version only, does not linger. The role is a
group (NOLOGIN): operators create login users in it (README "Database roles").

Only ``paydispatch migrate`` (``app.store.migrate``) uses this module, on its SQLAlchemy
connection: a running replica never imports it.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection as Connection

from app.errors import ConfigurationError
from app.settings import ROLE_NAME_PATTERN
from app.store.engine import sqlstate_of

log = logging.getLogger(__name__)

# table → privileges, and why each is needed (statements in app/store/payments.py, fence.py).
TABLE_PRIVILEGES = {
    # ingest INSERT; reads; the claim's FOR UPDATE SKIP LOCKED and every leader write UPDATE
    "payments": "SELECT, INSERT, UPDATE",
    # append-only audit trails (a trigger refuses UPDATE and DELETE anyway)
    "payment_attempts": "SELECT, INSERT",
    "admin_actions": "SELECT, INSERT",
    # read only: moved by paydispatch_raise_fence, locked by paydispatch_assert_fence (definers)
    "leader_fence": "SELECT",
}
FUNCTIONS = (
    "paydispatch_raise_fence(text, bigint, text)",
    "paydispatch_assert_fence(text, bigint)",
)

_ROLE_EXISTS = text("SELECT 1 FROM pg_roles WHERE rolname = :role")
_SCHEMA = text("SELECT quote_ident(current_schema()) AS quoted, current_schema() AS name")
_PUBLIC_MAY_CREATE = text("SELECT has_schema_privilege('public', current_schema(), 'CREATE')")

INSUFFICIENT_PRIVILEGE = "42501"
DUPLICATE_OBJECT = "42710"
UNIQUE_VIOLATION = "23505"


def grant_statements(role: str, schema: str) -> list[str]:
    """The statements that set ``role``'s privileges on ``schema`` (quoted) to exactly the
    replica's needs. ``role`` must match ROLE_NAME_PATTERN (it is written into the SQL)."""
    if not re.fullmatch(ROLE_NAME_PATTERN, role) or role.startswith("pg_"):
        raise ConfigurationError(f"refusing role name {role!r}: not a plain identifier")
    statements = [
        # Start from nothing: what an older version granted, or someone granted by hand, goes.
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {role}",
        f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM {role}",
        f"REVOKE CREATE ON SCHEMA {schema} FROM {role}",
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
    ]
    statements += [
        f"GRANT {privileges} ON {schema}.{table} TO {role}"
        for table, privileges in TABLE_PRIVILEGES.items()
    ]
    statements += [f"GRANT EXECUTE ON FUNCTION {schema}.{fn} TO {role}" for fn in FUNCTIONS]
    return statements


async def _create_role(conn: Connection, role: str) -> None:
    # Roles belong to the whole server, while the migration lock is per database: a migrate
    # of another database may create the same role at the same moment. Its win is ours.
    try:
        async with conn.begin_nested():
            await conn.execute(text(f"CREATE ROLE {role} NOLOGIN"))
    except Exception as exc:
        if sqlstate_of(exc) not in (DUPLICATE_OBJECT, UNIQUE_VIOLATION):
            raise
    else:
        log.info("created the replica role %s", role)


async def sync_replica_role(conn: Connection, role: str) -> None:
    """Create ``role`` (NOLOGIN) if missing and set its privileges; runs as the schema owner,
    inside the caller's transaction.

    Raises ConfigurationError, saying what to do, when the migrating user may not create the
    role (no CREATEROLE, as on some managed Postgres set-ups) or does not own the tables.
    """
    schema = (await conn.execute(_SCHEMA)).one()
    try:
        if (await conn.execute(_ROLE_EXISTS, {"role": role})).first() is None:
            await _create_role(conn, role)
        for statement in grant_statements(role, schema.quoted):
            await conn.execute(text(statement))
    except Exception as exc:
        if sqlstate_of(exc) != INSUFFICIENT_PRIVILEGE:
            raise
        raise ConfigurationError(
            f"cannot set up the replica role {role!r}: the user running `paydispatch migrate` "
            "must own the paydispatch tables and either hold CREATEROLE or find the role "
            f"already created (as an administrator: CREATE ROLE {role} NOLOGIN;). "
            "See README, 'Database roles'"
        ) from exc
    if (await conn.execute(_PUBLIC_MAY_CREATE)).scalar_one():
        # Postgres before 15 lets every role create objects in "public": then the replica
        # role could run DDL after all. Owners of the schema can close that.
        log.warning(
            "every role may create objects in schema %s (Postgres < 15 default): run "
            "REVOKE CREATE ON SCHEMA %s FROM PUBLIC as its owner so replicas cannot run DDL",
            schema.name,
            schema.quoted,
        )
