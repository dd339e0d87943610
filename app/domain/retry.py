"""When to send a payment again, and when to stop sending and reconcile instead. Pure: the
caller passes the clock reading and the random source, so the policy is testable as is."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

# A payment older than this share of the provider's key retention is never re-sent: by the
# time the call lands the provider may have forgotten the key and would charge again.
RETENTION_SAFETY = 0.9


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, an attempt budget and a key-retention horizon."""

    max_attempts: int
    base_delay: float
    max_delay: float
    retention: timedelta

    @property
    def horizon(self) -> timedelta:
        """How long after a provider key was first issued it may still be sent."""
        return self.retention * RETENTION_SAFETY

    def too_old(self, key_issued_at: datetime, now: datetime) -> bool:
        """True when re-sending could outlive the provider's memory of the key."""
        return now - key_issued_at > self.horizon

    def should_park(self, attempts: int, key_issued_at: datetime, now: datetime) -> bool:
        """True when the payment must go to reconciliation instead of another send."""
        return attempts >= self.max_attempts or self.too_old(key_issued_at, now)

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempts + 1``: doubling from ``base_delay``,
        capped at ``max_delay``, then jittered to 50-100 % so a failed burst spreads out."""
        # The exponent is capped: past ~60 doublings any base delay is far beyond the cap,
        # and 2.0 ** 1025 would overflow.
        doublings = min(max(0, attempts - 1), 64)
        backoff = min(self.max_delay, self.base_delay * 2.0**doublings)
        jitter: float = (rng or random).uniform(0.5, 1.0)
        return backoff * jitter
