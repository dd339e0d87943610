"""Payment states. The diagram lives in ../README.md ("Payment states").

pending ──claim──▶ in_flight ──▶ succeeded | declined | failed        (terminal)
   ▲                   │
   └──retry (backoff)──┘──▶ needs_reconciliation ──reconcile──▶ terminal
"""

from __future__ import annotations

from enum import StrEnum


class PaymentStatus(StrEnum):
    """Where a payment is in its life. Terminal members never change again (the database
    enforces it)."""

    PENDING = "pending"  # accepted and durable, waiting for the leader to claim it
    IN_FLIGHT = "in_flight"  # claimed by the leader whose fence_token it carries; call under way
    SUCCEEDED = "succeeded"  # the provider charged it; provider_charge_id is set
    DECLINED = "declined"  # the provider definitively declined it
    FAILED = "failed"  # the provider rejected the request as invalid; no charge
    NEEDS_RECONCILIATION = "needs_reconciliation"  # outcome unknown past budget; look it up

    @property
    def is_terminal(self) -> bool:
        """True for states that can never change again."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({PaymentStatus.SUCCEEDED, PaymentStatus.DECLINED, PaymentStatus.FAILED})
