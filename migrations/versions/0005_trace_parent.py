"""The trace context of the request that created a payment (OpenTelemetry traces).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``trace_parent`` holds the ingest span's context as a W3C ``traceparent`` string, written at
ingest when tracing is on, so that the leader that charges the payment — whichever replica
that is, after any number of failovers — parents its dispatch spans to the request that
created it. NULL when tracing was off at ingest (and for every row from before this
revision): the leader then starts a root span.

A rolling upgrade, unlike 0003: the column is nullable with no default (no table rewrite, no
backfill), old replicas name their columns in every INSERT and RETURNING and so never see
it, and no trigger reads it. Run ``paydispatch migrate`` before rolling the new version out
(its ingest writes the column). The CHECK admits only the one form a replica writes
(version 00, lower-case hex, 55 characters): whatever a client sent in its own header never
reaches the row verbatim. It is added NOT VALID: every existing row is NULL, so there is
nothing to scan, and new rows are checked all the same.

Downgrade drops the column (the traces already exported keep their links).
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE payments
            ADD COLUMN trace_parent text,
            ADD CONSTRAINT payments_trace_parent_form CHECK (
                trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
            ) NOT VALID
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE payments DROP COLUMN trace_parent")
