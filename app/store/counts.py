"""Queue depth by status, cached briefly: dashboards and metrics poll it from every replica,
and a GROUP BY over a big table should not run once per poll."""

from __future__ import annotations

import asyncio
import time

from app.store import payments
from app.store.engine import Engine

CACHE_SECONDS = 2.0


class StatusCounts:
    """``counts()`` → {status: n} for every status, at most CACHE_SECONDS old."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self._at = 0.0
        self._value: dict[str, int] = {}
        self._oldest_unreconciled: float | None = None
        self._oldest_pending: float | None = None
        self._lock = asyncio.Lock()

    def cached(self) -> dict[str, int]:
        """The last counts read (empty before the first read)."""
        return dict(self._value)

    def oldest_unreconciled(self) -> float | None:
        """Seconds the longest-waiting needs_reconciliation payment had waited at the last
        read (None: none waits, or nothing read yet)."""
        return self._oldest_unreconciled

    def oldest_pending(self) -> float | None:
        """Seconds the oldest payment still pending or in flight had waited since it was
        accepted, at the last read (None: the queue was empty, or nothing read yet)."""
        return self._oldest_pending

    async def counts(self) -> dict[str, int]:
        """Fresh enough counts; concurrent callers share one query."""
        async with self._lock:
            if time.monotonic() - self._at > CACHE_SECONDS:
                async with asyncio.timeout(self.timeout), self.engine.connect() as conn:
                    counts = await payments.count_by_status(conn)
                    oldest = await payments.oldest_unreconciled_age(conn)
                    oldest_pending = await payments.oldest_unsettled_age(conn)
                self._oldest_unreconciled = oldest
                self._oldest_pending = oldest_pending
                self._value = {status.value: n for status, n in counts.items()}
                self._at = time.monotonic()
            return dict(self._value)
