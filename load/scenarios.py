"""The named scenarios: which faults, and how the stack is configured for them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

PROVIDER_FAULTS_20 = {
    "error_rate": 0.2,
    "timeout_rate": 0.2,
    "drop_rate": 0.2,
    "conflict_rate": 0.2,
    "hang_seconds": 2,
}

# Quick timeouts and retries so that provider faults cost little wall time in a short run.
FAST_RETRIES = {
    "PAYDISPATCH_PROVIDER_TIMEOUT": "0.5",
    "PAYDISPATCH_RETRY_BASE_DELAY": "0.05",
    "PAYDISPATCH_RETRY_MAX_DELAY": "0.5",
    "PAYDISPATCH_MAX_ATTEMPTS": "200",
}


@dataclass(frozen=True)
class Scenario:
    """A scenario: a fault plan and the stack settings it needs."""

    name: str
    description: str
    faults: tuple[str, ...] = ()
    repeat: bool = False  # the fault repeats --kills times
    provider: dict[str, Any] = field(default_factory=dict)
    replica_env: dict[str, str] = field(default_factory=dict)

    def plan(self, kills: int, seed: int = 1) -> list[str]:
        """The faults to inject, in order."""
        if self.name == "chaos":
            rng = random.Random(seed)
            return [rng.choice(self.faults) for _ in range(max(1, kills))]
        if self.repeat:
            return list(self.faults) * max(1, kills)
        return list(self.faults)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("steady", "steady load, no faults"),
        Scenario("kill-leader", "SIGKILL the leader --kills times", ("kill",), repeat=True),
        Scenario(
            "pause-leader",
            "SIGSTOP the leader past its lease, then SIGCONT",
            ("stop",),
            repeat=True,
        ),
        Scenario("term-leader", "SIGTERM the leader (graceful handover)", ("term",), repeat=True),
        Scenario(
            "etcd-member-loss", "kill one of three etcd members, restart it", ("etcd-member",)
        ),
        Scenario(
            "etcd-quorum-loss", "kill two of three etcd members, restart them", ("etcd-quorum",)
        ),
        Scenario("postgres-restart", "restart PostgreSQL under load", ("postgres-restart",)),
        Scenario(
            "provider-faults",
            "20% each of 5xx, hangs, dropped responses and 409s, plus a provider crash",
            ("provider-restart",),
            provider=PROVIDER_FAULTS_20,
            replica_env=FAST_RETRIES,
        ),
        Scenario(
            "chaos",
            "a seeded random mix of every fault",
            ("kill", "stop", "term", "etcd-member", "postgres-restart", "provider-restart"),
            replica_env=FAST_RETRIES,
        ),
    )
}
