"""State the provider's handlers share (one per application)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from app.sandbox.faults import FaultInjector
from app.sandbox.ledger import Ledger
from app.sandbox.records import ChargeParams, LedgerClosed
from app.sandbox.settings import SandboxSettings


@dataclass
class SandboxStats:
    """Counters since the process started (the ledger holds the durable counts)."""

    requests: int = 0
    charges_created: int = 0
    declines_created: int = 0
    replays: int = 0
    concurrent_conflicts: int = 0
    param_mismatches: int = 0
    invalid_requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)


@dataclass
class SandboxState:
    """Everything the handlers share; one per provider."""

    settings: SandboxSettings
    faults: FaultInjector
    stats: SandboxStats = field(default_factory=SandboxStats)
    # Keys whose first request is under way, with the parameters they were sent with.
    processing: dict[str, ChargeParams] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ledger: Ledger | None = None
    started_at: str = ""

    def require_ledger(self) -> Ledger:
        """The open ledger; LedgerClosed (answered 503) outside the app's lifetime."""
        if self.ledger is None:
            raise LedgerClosed("the provider ledger is not open")
        return self.ledger


class _Clock:
    """``now_iso``'s formatting, with the seconds part formatted once per second."""

    second = -1
    prefix = ""

    def now_iso(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        return f"{self.prefix}.{min(int((now - second) * 1000), 999):03d}Z"


_clock = _Clock()


def now_iso() -> str:
    """The current UTC time as the API shows it (ISO 8601, milliseconds, Z), e.g.
    ``2026-11-30T08:40:01.123Z``. Formatted once per second, not through a datetime per
    charge (that was a visible share of the provider's work per charge)."""
    return _clock.now_iso()
