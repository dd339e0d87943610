"""Audit trail of operator actions (retry, reconcile, leader handover).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Append-only like payment_attempts: the actor is a fingerprint of the admin key used, never
the key itself.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE admin_actions (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at          timestamptz NOT NULL DEFAULT now(),
            actor       text NOT NULL,
            node_id     text NOT NULL,
            action      text NOT NULL,
            payment_id  bigint REFERENCES payments (id),
            outcome     text NOT NULL,
            detail      jsonb NOT NULL DEFAULT '{}'::jsonb
        )
        """
    )
    op.execute(
        "CREATE TRIGGER admin_actions_append_only BEFORE UPDATE OR DELETE ON admin_actions "
        "FOR EACH ROW EXECUTE FUNCTION paydispatch_append_only()"
    )
    op.execute("CREATE INDEX admin_actions_payment_idx ON admin_actions (payment_id)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS admin_actions")
