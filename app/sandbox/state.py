"""State the provider's handlers share (one per application)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

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
    """Everything the handlers share; one per application."""

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


SANDBOX_STATE = web.AppKey("sandbox_state", SandboxState)


def now_iso() -> str:
    """The current UTC time as the API shows it (ISO 8601, milliseconds, Z)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
