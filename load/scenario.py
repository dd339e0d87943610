"""Scenario runner shared by ``paydispatch demo`` and ``python -m load``: steady payment load,
faults at intervals, failover timing, then the exactly-once verdict and a report.

Bounded by construction: a fixed number of payments, a deadline, and waits that give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.ops.client import http_json
from app.stack.target import Target
from load.checker import Verdict, check_exactly_once, wait_until_settled
from load.loadgen import LoadResult, percentile, post_payments

LEADER_FAULTS = ("kill", "stop", "term")
# A fault's window, for what clients saw: from the fault until the first charge after it
# plus this much (the load balancer's and the clients' own recovery), at least FAULT_WINDOW.
FAULT_WINDOW = 3.0
FAULT_WINDOW_TAIL = 1.0
ALL_FAULTS = (*LEADER_FAULTS, "etcd-member", "etcd-quorum", "postgres-restart", "provider-restart")


@dataclass
class Sample:
    """One look at the system while the scenario runs."""

    t: float  # seconds since start
    leader: str | None
    token: int | None
    accepted: int
    charged: int
    queue_depth: int


@dataclass
class Failover:
    """One injected fault and how long charging stopped because of it."""

    fault: str
    at: float  # seconds since start
    old_token: int | None
    seconds: float | None  # fault → next successful charge (by a new leader, for leader faults)
    new_token: int | None = None

    @property
    def window(self) -> tuple[float, float]:
        """(start, end) in seconds since start of the span clients may have felt it."""
        length = max(FAULT_WINDOW, (self.seconds or 0.0) + FAULT_WINDOW_TAIL)
        return self.at, self.at + length


@dataclass
class ScenarioResult:
    """Everything a report needs."""

    load: LoadResult
    verdict: Verdict
    samples: list[Sample] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    charged_per_second: list[tuple[int, int]] = field(default_factory=list)
    # Between consecutive leaders: last charge by the old token → first by the new one.
    token_changes: list[dict[str, float | int]] = field(default_factory=list)
    stale_writes_rejected: int = 0
    throughput_per_s: float = 0.0
    duration_s: float = 0.0

    # Seconds between the scenario's start and the load generator's (its times are its own).
    load_offset: float = 0.0

    def _in_window(self, t: float) -> bool:
        return any(start <= t < end for start, end in (f.window for f in self.failovers))

    def steady_p99(self) -> float:
        """Ingest p99 (ms) of answers sent outside every fault window."""
        return percentile(
            [
                ms
                for t, ms in self.load.timed_latencies
                if not self._in_window(t + self.load_offset)
            ],
            99,
        )

    def fault_client_view(self, failover: Failover) -> dict[str, float | int]:
        """What clients saw inside ``failover``'s window: p99 ingest and failed attempts."""
        start, end = failover.window
        inside = [ms for t, ms in self.load.timed_latencies if start <= t + self.load_offset < end]
        errors = sum(1 for t in self.load.error_times if start <= t + self.load_offset < end)
        return {
            "ingest_p99_ms": round(percentile(inside, 99), 2),
            "client_errors": errors,
            "window_s": round(end - start, 2),
        }

    def per_second(self) -> list[tuple[int, int, float]]:
        """(second, client errors, ingest p99 ms) for every second of the run."""
        errors: dict[int, int] = {}
        latencies: dict[int, list[float]] = {}
        for t in self.load.error_times:
            second = int(t + self.load_offset)
            errors[second] = errors.get(second, 0) + 1
        for t, ms in self.load.timed_latencies:
            latencies.setdefault(int(t + self.load_offset), []).append(ms)
        seconds = sorted(set(errors) | set(latencies))
        return [(s, errors.get(s, 0), percentile(latencies.get(s, []), 99)) for s in seconds]

    def report(self) -> dict[str, Any]:
        """The JSON report (the keys the issue and the README promise)."""
        verdict = self.verdict
        return {
            "exactly_once": verdict.ok,
            "accepted": verdict.accepted,
            "acknowledged": len(self.load.acknowledged),
            "charged": verdict.charged,
            "declined": verdict.declined,
            "duplicates": verdict.duplicates,
            "lost": verdict.lost,
            "mismatched": verdict.mismatched,
            "stuck": verdict.stuck,
            "unexpected": verdict.unexpected,
            "stale_writes_rejected": self.stale_writes_rejected,
            "throughput_per_s": round(self.throughput_per_s, 1),
            "ingest_latency_ms": {
                "p50": round(self.load.percentile(50), 2),
                "p99": round(self.load.percentile(99), 2),
            },
            "ingest_statuses": {str(k): v for k, v in sorted(self.load.statuses.items())},
            # Attempts that ended in a transport error or a 5xx (each retry counts).
            "client_errors": self.load.client_errors,
            "ingest_p99_steady_ms": round(self.steady_p99(), 2),
            "failovers": [
                {
                    "fault": f.fault,
                    "at_s": round(f.at, 2),
                    "seconds": None if f.seconds is None else round(f.seconds, 3),
                    "old_token": f.old_token,
                    "new_token": f.new_token,
                    **self.fault_client_view(f),
                }
                for f in self.failovers
            ],
            "token_changes": self.token_changes,
            "duration_s": round(self.duration_s, 1),
            "examples": verdict.examples,
        }


def observed_leader(node_urls: Sequence[str], api_key: str | None = None) -> dict[str, Any] | None:
    """GET /v1/leader from the first replica that answers 200."""
    for url in node_urls:
        status, body = http_json(f"{url}/v1/leader", timeout=0.5, api_key=api_key)
        if status == 200 and isinstance(body, dict):
            return body
    return None


def stale_writes(node_urls: Sequence[str], api_key: str | None = None) -> int:
    """Fence rejections reported by the replicas that answer."""
    total = 0
    for url in node_urls:
        status, body = http_json(f"{url}/v1/node", timeout=0.5, api_key=api_key)
        if status == 200 and isinstance(body, dict):
            total += int(body.get("stale_writes_rejected", 0))
    return total


async def _counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) AS accepted,"
        " count(*) FILTER (WHERE status IN ('succeeded', 'declined')) AS charged,"
        " count(*) FILTER (WHERE status IN ('pending', 'in_flight')) AS depth"
        " FROM payments"
    )
    return int(row["accepted"]), int(row["charged"]), int(row["depth"])


async def _next_charge_after(
    database_url: str, wall_start: float, above_token: int | None, timeout: float
) -> tuple[float, int] | None:
    """(epoch seconds, token) of the first charge completed after ``wall_start`` — by a
    token above ``above_token`` when given — polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url, timeout=2)
            try:
                row = await conn.fetchrow(
                    "SELECT extract(epoch FROM completed_at)::float8 AS at, fence_token"
                    " FROM payments WHERE completed_at > to_timestamp($1)"
                    " AND status IN ('succeeded', 'declined')"
                    " AND ($2::bigint IS NULL OR fence_token > $2::bigint)"
                    " ORDER BY completed_at LIMIT 1",
                    wall_start,
                    above_token,
                )
            finally:
                await conn.close()
            if row is not None:
                return float(row["at"]), int(row["fence_token"])
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass  # Postgres may be the thing being restarted
        await asyncio.sleep(0.05)
    return None


async def run_scenario(
    target: Target,
    *,
    rate: float,
    duration: float,
    faults: Sequence[str] = (),
    settle_timeout: float = 60.0,
    on_sample: Callable[[Sample, list[Failover]], None] | None = None,
    concurrency: int = 64,
) -> ScenarioResult:
    """Drive ``rate`` payments/s for ``duration`` s; inject ``faults`` evenly spaced."""
    unknown = [fault for fault in faults if fault not in ALL_FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {', '.join(ALL_FAULTS)}")
    if faults and target.inject is None:
        raise ValueError("this target cannot inject faults (no injector configured)")
    count = max(1, int(rate * duration))
    started = time.monotonic()
    wall_started = time.time()  # the chart puts charges and faults on one time axis
    samples: list[Sample] = []
    failovers: list[Failover] = []
    done = asyncio.Event()

    load_task = asyncio.create_task(
        post_payments(
            target.ingress,
            count,
            rate=rate,
            concurrency=concurrency,
            deadline_s=duration + settle_timeout,
            api_key=target.api_key,
            allow_remote=target.allow_remote,
        )
    )

    async def sample_loop() -> None:
        conn = None
        while not done.is_set():
            leader = await asyncio.to_thread(observed_leader, target.node_urls, target.api_key)
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(target.database_url, timeout=1)
                accepted, charged, depth = await _counts(conn)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                conn = None  # Postgres is down or restarting: repeat the last counts
                last = samples[-1] if samples else None
                accepted, charged, depth = (
                    (last.accepted, last.charged, last.queue_depth) if last else (0, 0, 0)
                )
            sample = Sample(
                round(time.monotonic() - started, 2),
                leader["node_id"] if leader else None,
                leader["token"] if leader else None,
                accepted,
                charged,
                depth,
            )
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample, failovers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
        if conn is not None:
            await conn.close()

    async def fault_loop() -> None:
        spacing = duration / (len(faults) + 1)
        for i, fault in enumerate(faults):
            await asyncio.sleep(max(0.0, started + spacing * (i + 1) - time.monotonic()))
            leader = await asyncio.to_thread(observed_leader, target.node_urls, target.api_key)
            old = leader["token"] if leader else None
            record = Failover(fault, time.monotonic() - started, old, None)
            failovers.append(record)
            wall = time.time()
            assert target.inject is not None
            injecting = asyncio.create_task(asyncio.to_thread(target.inject, fault))
            found = await _next_charge_after(
                target.database_url,
                wall,
                old if fault in LEADER_FAULTS else None,
                timeout=30,
            )
            if found is not None:
                record.seconds = found[0] - wall
                record.new_token = found[1]
            await injecting

    sampler = asyncio.create_task(sample_loop())
    try:
        await fault_loop()
        load = await load_task
        await wait_until_settled(target.database_url, settle_timeout)
    finally:
        done.set()
        await sampler
        if not load_task.done():
            load_task.cancel()
    verdict = await check_exactly_once(target.database_url, target.provider_url, load.acknowledged)
    result = ScenarioResult(
        load=load,
        verdict=verdict,
        samples=samples,
        failovers=failovers,
        load_offset=load.started - started,
    )
    result.duration_s = time.monotonic() - started
    result.stale_writes_rejected = await asyncio.to_thread(
        stale_writes, target.node_urls, target.api_key
    )
    conn = await asyncpg.connect(target.database_url)
    try:
        rows = await conn.fetch(
            "SELECT floor(extract(epoch FROM completed_at))::bigint AS s, count(*) AS n"
            " FROM payments WHERE status IN ('succeeded', 'declined') GROUP BY s ORDER BY s"
        )
        per_token = await conn.fetch(
            "SELECT fence_token AS token,"
            " extract(epoch FROM min(completed_at))::float8 AS first,"
            " extract(epoch FROM max(completed_at))::float8 AS last"
            " FROM payments WHERE status IN ('succeeded', 'declined')"
            " GROUP BY fence_token ORDER BY fence_token"
        )
        span = await conn.fetchrow(
            "SELECT extract(epoch FROM min(created_at))::float8 AS first,"
            " extract(epoch FROM max(completed_at))::float8 AS last, count(*) AS n"
            " FROM payments WHERE status IN ('succeeded', 'declined')"
        )
    finally:
        await conn.close()
    result.token_changes = [
        {
            "from_token": int(old["token"]),
            "to_token": int(new["token"]),
            "gap_seconds": round(float(new["first"]) - float(old["last"]), 3),
        }
        for old, new in itertools.pairwise(per_token)
    ]
    result.charged_per_second = [(int(r["s"]) - int(wall_started), int(r["n"])) for r in rows]
    if span["n"] and span["last"] and span["first"] and span["last"] > span["first"]:
        result.throughput_per_s = int(span["n"]) / (span["last"] - span["first"])
    return result
