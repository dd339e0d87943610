"""A provider key of our own for every payment, and when it was first issued.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

The provider de-duplicates by the key we send. Sending the client's Idempotency-Key as is
lets a key repeat across deployments sharing a provider account, or after the payments table
was reset while the provider's ledger survived: the provider would then replay an old charge
for a new payment. From now on each payment gets a key that is unique for all time (a UUID,
generated at ingest), and ``provider_key_issued_at`` is when it started to be used — the
provider's key retention counts from there.

Rows that may already have reached the provider keep the key they were sent with (the
client's key), or a retry after the upgrade would be a new charge. Rows never sent get a
fresh UUID.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A volatile default is evaluated per row when the column is added: every existing row
    # gets its own UUID without an UPDATE (and without waking the payments triggers).
    op.execute(
        "ALTER TABLE payments "
        "ADD COLUMN provider_key text NOT NULL DEFAULT gen_random_uuid()::text, "
        "ADD COLUMN provider_key_issued_at timestamptz NOT NULL DEFAULT now()"
    )
    # The backfill below must not trip the leader-only and terminal-state triggers: it is a
    # schema change made by the owner, not a payment state change.
    op.execute("ALTER TABLE payments DISABLE TRIGGER payments_fence")
    op.execute("ALTER TABLE payments DISABLE TRIGGER payments_guard")
    op.execute(
        """
        UPDATE payments
        SET provider_key = CASE WHEN attempts > 0 OR status <> 'pending'
                                THEN idempotency_key ELSE provider_key END,
            provider_key_issued_at = created_at
        """
    )
    op.execute("ALTER TABLE payments ENABLE TRIGGER payments_guard")
    op.execute("ALTER TABLE payments ENABLE TRIGGER payments_fence")
    op.execute(
        "ALTER TABLE payments ADD CONSTRAINT payments_provider_key_unique UNIQUE (provider_key)"
    )
    op.execute(
        "ALTER TABLE payments ADD CONSTRAINT payments_provider_key_length "
        "CHECK (length(provider_key) BETWEEN 1 AND 255)"
    )
    # 'mismatch': the provider answered with a charge that is not this payment's.
    op.execute("ALTER TABLE payment_attempts DROP CONSTRAINT payment_attempts_outcome_check")
    op.execute(
        "ALTER TABLE payment_attempts ADD CONSTRAINT payment_attempts_outcome_check CHECK "
        "(outcome IN ('succeeded', 'declined', 'failed', 'retry', 'unknown', 'abandoned', "
        "'reconciled', 'mismatch'))"
    )


def downgrade() -> None:
    # Rows already sent under their own provider key would be re-sent under the client's key
    # by the old code: a second charge. Refuse rather than drop the key they were sent with.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM payments
                       WHERE provider_key <> idempotency_key
                         AND (attempts > 0 OR status <> 'pending')) THEN
                RAISE EXCEPTION 'cannot downgrade below 0003: payments were already sent '
                    'under their own provider key, and the old code would send them again '
                    'under the client key (a second charge)';
            END IF;
        END
        $$
        """
    )
    op.execute("ALTER TABLE payment_attempts DROP CONSTRAINT payment_attempts_outcome_check")
    op.execute(
        "ALTER TABLE payment_attempts ADD CONSTRAINT payment_attempts_outcome_check CHECK "
        "(outcome IN ('succeeded', 'declined', 'failed', 'retry', 'unknown', 'abandoned', "
        "'reconciled'))"
    )
    op.execute("ALTER TABLE payments DROP COLUMN provider_key, DROP COLUMN provider_key_issued_at")
