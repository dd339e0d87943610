"""Queue depth by status, cached briefly: dashboards and metrics poll it from every replica,
and a GROUP BY over a big table should not run once per poll."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.states import PaymentStatus
from app.store import payments as queue

CACHE_SECONDS = 2.0


class StatusCounts:
    """``counts()`` → {status: n} for every status, at most CACHE_SECONDS old."""

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self._at = 0.0
        self._value: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def cached(self) -> dict[str, int]:
        """The last counts read (empty before the first read)."""
        return dict(self._value)

    async def counts(self) -> dict[str, int]:
        """Fresh enough counts; concurrent callers share one query."""
        async with self._lock:
            if time.monotonic() - self._at > CACHE_SECONDS:
                async with asyncio.timeout(self.timeout), self.engine.connect() as conn:
                    rows = (await conn.execute(queue.COUNT_BY_STATUS)).all()
                found = {str(status): int(n) for status, n in rows}
                self._value = {s.value: found.get(s.value, 0) for s in PaymentStatus}
                self._at = time.monotonic()
            return dict(self._value)
