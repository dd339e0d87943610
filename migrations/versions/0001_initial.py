"""Initial schema: payments queue, append-only attempts, leader fence enforced in Postgres.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

The fence lives in the database, not in the application: a trigger on every table a leader
writes compares the row's ``fence_token`` with the fence row, read ``FOR SHARE``. Raising the
fence takes the row's update lock, so a write by an old token either commits before the fence
moves or fails after it: under READ COMMITTED a plain read could see the old fence and commit
after the raise.

SQLSTATEs (class "PD", ours): PDF01 stale token, PDF02 leader write without a token,
PDF03 unknown fence, PDT01 terminal state changed, PDI01 immutable request field changed,
PDA01 attempts are append-only. app.store.engine maps them to typed errors.
"""

from __future__ import annotations

import re

from alembic import context, op

from app.settings import FENCE_NAME_PATTERN, NOTIFY_CHANNEL_PATTERN

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("pending", "in_flight", "succeeded", "declined", "failed", "needs_reconciliation")
TERMINAL = ("succeeded", "declined", "failed")
OUTCOMES = ("succeeded", "declined", "failed", "retry", "unknown", "abandoned", "reconciled")


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _plain(value: str, pattern: str, what: str) -> str:
    # Both names are written into the DDL below (trigger arguments cannot be bound): the
    # settings refuse anything else already; this guards the plain `alembic` path too.
    if not re.fullmatch(pattern, value):
        raise ValueError(f"refusing {what} {value!r}: it must match {pattern}")
    return value


def upgrade() -> None:
    attributes = context.config.attributes
    fence_name = _plain(
        str(attributes.get("fence_name", "payments")), FENCE_NAME_PATTERN, "fence name"
    )
    channel = _plain(
        str(attributes.get("notify_channel", "paydispatch_payments")),
        NOTIFY_CHANNEL_PATTERN,
        "notify channel",
    )

    op.execute(
        """
        CREATE TABLE leader_fence (
            name        text PRIMARY KEY,
            token       bigint NOT NULL CHECK (token >= 0),
            holder      text,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(f"INSERT INTO leader_fence (name, token) VALUES ('{fence_name}', 0)")

    op.execute(
        f"""
        CREATE TABLE payments (
            id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            idempotency_key     text NOT NULL UNIQUE
                                CHECK (length(idempotency_key) BETWEEN 1 AND 255),
            request_fingerprint text NOT NULL,
            amount              bigint NOT NULL CHECK (amount > 0),
            currency            text NOT NULL CHECK (currency ~ '^[A-Z]{{3}}$'),
            reference           text CHECK (length(reference) <= 255),
            description         text CHECK (length(description) <= 1000),
            metadata            jsonb NOT NULL DEFAULT '{{}}'::jsonb
                                CHECK (jsonb_typeof(metadata) = 'object'
                                       AND octet_length(metadata::text) <= 8192),
            status              text NOT NULL DEFAULT 'pending'
                                CHECK (status IN ({_sql_list(STATUSES)})),
            attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            next_attempt_at     timestamptz NOT NULL DEFAULT now(),
            fence_token         bigint,
            provider_charge_id  text,
            last_error          text,
            created_at          timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now(),
            completed_at        timestamptz,
            CONSTRAINT payments_completed_iff_terminal
                CHECK ((status IN ({_sql_list(TERMINAL)})) = (completed_at IS NOT NULL)),
            CONSTRAINT payments_succeeded_has_charge
                CHECK (status <> 'succeeded' OR provider_charge_id IS NOT NULL)
        )
        """
    )
    # The claim query: runnable rows, oldest first. Partial, so it stays small however many
    # completed payments pile up.
    op.execute(
        "CREATE INDEX payments_runnable_idx ON payments (next_attempt_at, id) "
        "WHERE status = 'pending'"
    )
    # Takeover recovery: rows left in flight by an older token.
    op.execute(
        "CREATE INDEX payments_in_flight_idx ON payments (fence_token) WHERE status = 'in_flight'"
    )
    # GET /v1/payments?status=&after= keyset pagination.
    op.execute("CREATE INDEX payments_status_id_idx ON payments (status, id)")

    op.execute(
        f"""
        CREATE TABLE payment_attempts (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            payment_id       bigint NOT NULL REFERENCES payments (id),
            attempt          integer NOT NULL CHECK (attempt >= 1),
            fence_token      bigint NOT NULL,
            node_id          text NOT NULL,
            started_at       timestamptz NOT NULL,
            finished_at      timestamptz NOT NULL,
            outcome          text NOT NULL CHECK (outcome IN ({_sql_list(OUTCOMES)})),
            provider_status  integer,
            error            text,
            CONSTRAINT payment_attempts_one_row_per_call UNIQUE (payment_id, attempt)
        )
        """
    )
    op.execute("CREATE INDEX payment_attempts_token_idx ON payment_attempts (fence_token)")

    op.execute(
        """
        CREATE FUNCTION paydispatch_check_fence() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            current_token bigint;
        BEGIN
            IF NEW.fence_token IS NULL THEN
                -- Only ingest inserts a payment without a token; every other write is a
                -- leader's and must say which leader it is.
                IF TG_OP = 'INSERT' AND TG_TABLE_NAME = 'payments' THEN
                    RETURN NEW;
                END IF;
                RAISE EXCEPTION 'leader write to % without a fencing token', TG_TABLE_NAME
                    USING ERRCODE = 'PDF02';
            END IF;
            SELECT token INTO current_token FROM leader_fence WHERE name = TG_ARGV[0]
                FOR SHARE;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no leader_fence row named %', TG_ARGV[0]
                    USING ERRCODE = 'PDF03';
            END IF;
            IF NEW.fence_token < current_token THEN
                RAISE EXCEPTION 'stale fencing token % on %: fence % is at %',
                    NEW.fence_token, TG_TABLE_NAME, TG_ARGV[0], current_token
                    USING ERRCODE = 'PDF01',
                          HINT = 'a newer leader has taken over; this writer must step down';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER payments_fence BEFORE INSERT OR UPDATE ON payments
            FOR EACH ROW EXECUTE FUNCTION paydispatch_check_fence('{fence_name}')
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER payment_attempts_fence BEFORE INSERT ON payment_attempts
            FOR EACH ROW EXECUTE FUNCTION paydispatch_check_fence('{fence_name}')
        """
    )

    op.execute(
        f"""
        CREATE FUNCTION paydispatch_guard_payment() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.status IN ({_sql_list(TERMINAL)}) AND NEW IS DISTINCT FROM OLD THEN
                RAISE EXCEPTION 'payment % is % (terminal) and can no longer change',
                    OLD.id, OLD.status USING ERRCODE = 'PDT01';
            END IF;
            IF (NEW.idempotency_key, NEW.request_fingerprint, NEW.amount, NEW.currency,
                NEW.reference, NEW.description, NEW.metadata, NEW.created_at)
               IS DISTINCT FROM
               (OLD.idempotency_key, OLD.request_fingerprint, OLD.amount, OLD.currency,
                OLD.reference, OLD.description, OLD.metadata, OLD.created_at) THEN
                -- Retries must send identical parameters under the same key.
                RAISE EXCEPTION 'payment % request fields are immutable', OLD.id
                    USING ERRCODE = 'PDI01';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER payments_guard BEFORE UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION paydispatch_guard_payment()"
    )

    op.execute(
        """
        CREATE FUNCTION paydispatch_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'PDA01';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER payment_attempts_append_only BEFORE UPDATE OR DELETE "
        "ON payment_attempts FOR EACH ROW EXECUTE FUNCTION paydispatch_append_only()"
    )

    # Empty payload: Postgres folds identical notifications of one transaction into one, so a
    # batch insert wakes the dispatcher once.
    op.execute(
        """
        CREATE FUNCTION paydispatch_notify_runnable() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_ARGV[0], '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER payments_notify AFTER INSERT ON payments
            FOR EACH ROW WHEN (NEW.status = 'pending')
            EXECUTE FUNCTION paydispatch_notify_runnable('{channel}')
        """
    )

    op.execute(
        """
        CREATE FUNCTION paydispatch_raise_fence(p_name text, p_token bigint, p_holder text)
        RETURNS bigint
        LANGUAGE plpgsql AS $$
        DECLARE
            raised bigint;
            current_token bigint;
        BEGIN
            -- Only upward (equal is the same leader re-asserting itself); the upsert takes
            -- the row lock every fenced write waits on.
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
    op.execute(
        """
        CREATE FUNCTION paydispatch_assert_fence(p_name text, p_token bigint) RETURNS bigint
        LANGUAGE plpgsql AS $$
        DECLARE
            current_token bigint;
        BEGIN
            -- The guard a leader transaction opens with: fails fast when stale even if the
            -- statements after it would touch no row (and so fire no trigger), and holds the
            -- share lock on the fence row until the transaction ends.
            SELECT token INTO current_token FROM leader_fence WHERE name = p_name FOR SHARE;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no leader_fence row named %', p_name USING ERRCODE = 'PDF03';
            END IF;
            IF p_token < current_token THEN
                RAISE EXCEPTION 'stale fencing token %: fence % is at %',
                    p_token, p_name, current_token
                    USING ERRCODE = 'PDF01',
                          HINT = 'a newer leader has taken over; this writer must step down';
            END IF;
            RETURN current_token;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS payment_attempts")
    op.execute("DROP TABLE IF EXISTS payments")
    op.execute("DROP TABLE IF EXISTS leader_fence")
    for function in (
        "paydispatch_check_fence()",
        "paydispatch_guard_payment()",
        "paydispatch_append_only()",
        "paydispatch_notify_runnable()",
        "paydispatch_raise_fence(text, bigint, text)",
        "paydispatch_assert_fence(text, bigint)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
