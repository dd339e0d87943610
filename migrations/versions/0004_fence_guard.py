"""The fence guards itself: it never goes down, is never renamed or deleted, and is raised
only through its function.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Before: ``paydispatch_raise_fence`` was an upsert, so a replica configured with another fence
name created a row of its own that no trigger checks (fencing silently off); and any role with
UPDATE or DELETE on ``leader_fence`` — the owner, or a replica connecting as the owner — could
lower the token or delete the row, letting a superseded leader write again.

After:
- ``leader_fence_guard`` (BEFORE UPDATE OR DELETE, per row) and ``leader_fence_no_truncate``
  (BEFORE TRUNCATE) refuse any statement that lowers a token, renames a fence or removes one,
  whoever runs it (triggers hold for the table owner too): SQLSTATE ``PDF04``.
- ``paydispatch_raise_fence`` no longer creates rows: an unknown name is ``PDF03``. Fence rows
  are made by migrations only, with the name the fence triggers check.
- The functions that touch the fence row (raise, assert, and the fence check trigger) run as
  their owner (SECURITY DEFINER) with a fixed search_path: the replica role needs no UPDATE on
  ``leader_fence`` (``FOR SHARE``/``FOR UPDATE`` would demand it), so it cannot write the row
  except through the raise function, which only moves it up. EXECUTE on the callable ones is
  taken from PUBLIC; ``paydispatch migrate`` grants it to the replica role
  (app/store/roles.py), with the rest of that role's privileges.

What a trigger cannot stop is DDL by the owner (DROP/DISABLE TRIGGER) or a superuser's
``session_replication_role = replica``: replicas run as a role that can do neither, and a
replica refuses to start when the fence triggers are missing or disabled (app/store/fence.py).
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The functions a replica calls; the trigger functions cannot be called directly anyway.
CALLABLE = (
    "paydispatch_raise_fence(text, bigint, text)",
    "paydispatch_assert_fence(text, bigint)",
)


def _schema() -> str:
    """The schema the tables live in, quoted, for the functions' fixed search_path."""
    quoted = op.get_bind().execute(text("SELECT quote_ident(current_schema())")).scalar_one()
    return str(quoted)


def upgrade() -> None:
    schema = _schema()
    op.execute(
        """
        CREATE FUNCTION paydispatch_guard_fence() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            -- A lower token would let a superseded leader write again; a missing or renamed
            -- row would make every fenced write fail (PDF03) or, worse, make a raise create
            -- a fence nobody checks. Only upward, only in place.
            IF TG_OP = 'TRUNCATE' THEN
                RAISE EXCEPTION 'leader_fence cannot be truncated: fences are never removed'
                    USING ERRCODE = 'PDF04';
            ELSIF TG_OP = 'DELETE' THEN
                RAISE EXCEPTION 'fence % cannot be deleted: fences are never removed', OLD.name
                    USING ERRCODE = 'PDF04';
            ELSIF NEW.name IS DISTINCT FROM OLD.name THEN
                RAISE EXCEPTION 'fence % cannot be renamed (to %)', OLD.name, NEW.name
                    USING ERRCODE = 'PDF04';
            ELSIF NEW.token < OLD.token THEN
                RAISE EXCEPTION 'fence % cannot be lowered from % to %',
                    OLD.name, OLD.token, NEW.token
                    USING ERRCODE = 'PDF04',
                          HINT = 'a lower fence would let a superseded leader write again';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER leader_fence_guard BEFORE UPDATE OR DELETE ON leader_fence "
        "FOR EACH ROW EXECUTE FUNCTION paydispatch_guard_fence()"
    )
    op.execute(
        "CREATE TRIGGER leader_fence_no_truncate BEFORE TRUNCATE ON leader_fence "
        "FOR EACH STATEMENT EXECUTE FUNCTION paydispatch_guard_fence()"
    )

    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION paydispatch_raise_fence(
            p_name text, p_token bigint, p_holder text
        )
        RETURNS bigint
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = {schema}, pg_temp
        AS $$
        DECLARE
            current_token bigint;
        BEGIN
            -- The row lock every fenced write's FOR SHARE waits on (and that waits for them).
            SELECT token INTO current_token FROM leader_fence WHERE name = p_name FOR UPDATE;
            IF NOT FOUND THEN
                -- Never create one: the triggers check the fence named in their arguments,
                -- and a fence of another name would guard nothing.
                RAISE EXCEPTION 'no leader_fence row named %', p_name
                    USING ERRCODE = 'PDF03',
                          HINT = 'PAYDISPATCH_FENCE_NAME must be the fence the schema '
                                 'enforces (the argument of trigger payments_fence)';
            END IF;
            -- Only upward; equal is the same leader re-asserting itself.
            IF p_token < current_token THEN
                RAISE EXCEPTION 'cannot raise fence % to %: already at %',
                    p_name, p_token, current_token
                    USING ERRCODE = 'PDF01',
                          HINT = 'a newer leader has taken over; this writer must step down';
            END IF;
            UPDATE leader_fence SET token = p_token, holder = p_holder, updated_at = now()
                WHERE name = p_name;
            RETURN p_token;
        END
        $$
        """
    )
    # FOR SHARE needs UPDATE privilege on the table: as definers they read the fence row on
    # the replica's behalf, so the replica role needs no write privilege on it at all.
    for function in ("paydispatch_assert_fence(text, bigint)", "paydispatch_check_fence()"):
        op.execute(
            f"ALTER FUNCTION {function} SECURITY DEFINER SET search_path = {schema}, pg_temp"
        )
    for function in CALLABLE:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")


def downgrade() -> None:
    for function in CALLABLE:
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
    for function in ("paydispatch_assert_fence(text, bigint)", "paydispatch_check_fence()"):
        op.execute(f"ALTER FUNCTION {function} SECURITY INVOKER RESET search_path")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION paydispatch_raise_fence(
            p_name text, p_token bigint, p_holder text
        )
        RETURNS bigint
        LANGUAGE plpgsql
        SECURITY INVOKER
        AS $$
        DECLARE
            raised bigint;
            current_token bigint;
        BEGIN
            INSERT INTO leader_fence AS f (name, token, holder, updated_at)
                VALUES (p_name, p_token, p_holder, now())
            ON CONFLICT (name) DO UPDATE
                SET token = EXCLUDED.token, holder = EXCLUDED.holder, updated_at = now()
                WHERE f.token <= EXCLUDED.token
            RETURNING token INTO raised;
            IF raised IS NULL THEN
                SELECT token INTO current_token FROM leader_fence WHERE name = p_name;
                RAISE EXCEPTION 'cannot raise fence % to %: already at %',
                    p_name, p_token, current_token
                    USING ERRCODE = 'PDF01',
                          HINT = 'a newer leader has taken over; this writer must step down';
            END IF;
            RETURN raised;
        END
        $$
        """
    )
    op.execute("ALTER FUNCTION paydispatch_raise_fence(text, bigint, text) RESET search_path")
    op.execute("DROP TRIGGER IF EXISTS leader_fence_no_truncate ON leader_fence")
    op.execute("DROP TRIGGER IF EXISTS leader_fence_guard ON leader_fence")
    op.execute("DROP FUNCTION IF EXISTS paydispatch_guard_fence()")
