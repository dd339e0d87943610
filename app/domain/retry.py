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

    def too_old(self, created_at: datetime, now: datetime) -> bool:
        """True when re-sending could outlive the provider's memory of the key."""
        return now - created_at > self.retention * RETENTION_SAFETY

    def should_park(self, attempts: int, created_at: datetime, now: datetime) -> bool:
        """True when the payment must go to reconciliation instead of another send."""
        return attempts >= self.max_attempts or self.too_old(created_at, now)

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempts + 1``: doubling from ``base_delay``,
        capped at ``max_delay``, then jittered to 50-100 % so a failed burst spreads out."""
        # The exponent is capped: past ~60 doublings any base delay is far beyond the cap,
        # and 2.0 ** 1025 would overflow.
        doublings = min(max(0, attempts - 1), 64)
        backoff = min(self.max_delay, self.base_delay * 2.0**doublings)
        jitter: float = (rng or random).uniform(0.5, 1.0)
        return backoff * jitter
