"""Scenario runner shared by ``paydispatch demo`` and ``python -m load``: steady payment load,
faults at intervals, failover timing, then the exactly-once verdict and a report.

Bounded by construction: a fixed number of payments (load goes on past it only until the last
fault is measured, and never past the deadline), a deadline, and waits that give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from app.ops.client import http_json
from app.stack.target import Target
from load.checker import Verdict, check_exactly_once, wait_until_settled
from load.loadgen import LoadResult, percentile, post_payments

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_FAULTS = ("kill", "stop", "term")
# Seconds between rewrites of the progress report of a long run.
PROGRESS_EVERY = 5.0
# A fault's window, for what clients saw: from the fault until the first charge after it
# plus this much (the load balancer's and the clients' own recovery), at least FAULT_WINDOW.
FAULT_WINDOW = 3.0
FAULT_WINDOW_TAIL = 1.0
# Seconds before a fault whose median queue depth is the level its backlog must drain to.
DRAIN_BASELINE = 10.0
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
    error: str | None = None  # the fault could not be applied or healed

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
    runner_errors: list[str] = field(default_factory=list)

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
                    **failover_figures(f, self.samples, until),
                    "old_token": f.old_token,
                    "new_token": f.new_token,
                    **self.fault_client_view(f),
                }
                for f, until in zip(self.failovers, fault_spans(self.failovers), strict=True)
            ],
            "longest_charging_gap_s": longest_charging_gap(self.samples),
            "queue_depth": queue_depth_figures(self.samples),
            # Drained: nothing pending or in flight at the end (the verdict's stuck count).
            "backlog_drained": verdict.stuck == 0,
            "runner_errors": self.runner_errors,
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
    token above ``above_token`` when given — polling until ``timeout``.

    One connection for all the polls (another only after a failure): a connection set-up
    costs Postgres a process start, and polling every 50 ms with a new one each time put
    the measurement's own CPU into the fault window it measures."""
    deadline = time.monotonic() + timeout
    conn: asyncpg.Connection | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = await asyncpg.connect(database_url, timeout=2)
                row = await conn.fetchrow(
                    "SELECT extract(epoch FROM completed_at)::float8 AS at, fence_token"
                    " FROM payments WHERE completed_at > to_timestamp($1)"
                    " AND status IN ('succeeded', 'declined')"
                    " AND ($2::bigint IS NULL OR fence_token > $2::bigint)"
                    " ORDER BY completed_at LIMIT 1",
                    wall_start,
                    above_token,
                    timeout=2,
                )
                if row is not None:
                    return float(row["at"]), int(row["fence_token"])
            except Exception as exc:  # Postgres may be the thing being restarted
                log.debug("next-charge probe failed: %s", exc)
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(0.05)
        return None
    finally:
        if conn is not None:
            try:
                await conn.close(timeout=1)
            except Exception:
                conn.terminate()


async def _retrying(what: str, op: Callable[[], Awaitable[T]], attempts: int = 20) -> T:
    """``op()`` until it succeeds: the system under test may be restarting any part of
    itself, and the runner must outlive whatever it does. The last error is raised after
    ``attempts`` tries (about ``attempts`` seconds)."""
    for attempt in range(attempts):
        try:
            return await op()
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.debug("%s failed (%s); retrying", what, exc)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def run_scenario(
    target: Target,
    *,
    rate: float,
    duration: float,
    faults: Sequence[str] = (),
    settle_timeout: float = 60.0,
    on_sample: Callable[[Sample, list[Failover]], None] | None = None,
    concurrency: int = 64,
    progress_path: Path | None = None,
) -> ScenarioResult:
    """Drive ``rate`` payments/s for ``duration`` s; inject ``faults`` evenly spaced.

    Load keeps flowing until the last fault has been measured, so every fault meets
    traffic. The run survives anything the system does: a sampler or fault error is logged
    and skipped, a runner failure is reported as ``runner_error``, and the verdict is
    computed from the ledger and the tables all the same. With ``progress_path`` the report
    so far is rewritten there every few seconds, so a killed run still leaves its figures.
    """
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
    faults_done = not faults
    runner_errors: list[str] = []

    load_task = asyncio.create_task(
        post_payments(
            target.ingress,
            count,
            rate=rate,
            concurrency=concurrency,
            deadline_s=duration + settle_timeout,
            api_key=target.api_key,
            allow_remote=target.allow_remote,
            keep_going=lambda: not faults_done,
        )
    )

    async def sample_loop() -> None:
        conn = None
        last_written = 0.0
        while not done.is_set():
            leader = None
            try:
                leader = await asyncio.to_thread(observed_leader, target.node_urls, target.api_key)
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(target.database_url, timeout=1)
                accepted, charged, depth = await asyncio.wait_for(_counts(conn), 2)
            except Exception as exc:  # any driver or transport error: no sample this tick
                log.debug("no sample this tick: %s", exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                conn = None
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
            if progress_path is not None and sample.t - last_written >= PROGRESS_EVERY:
                last_written = sample.t
                await asyncio.to_thread(
                    _write_progress, progress_path, samples, failovers, runner_errors
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def fault_loop() -> None:
        nonlocal faults_done
        spacing = duration / (len(faults) + 1)
        try:
            for i, fault in enumerate(faults):
                await asyncio.sleep(max(0.0, started + spacing * (i + 1) - time.monotonic()))
                await one_fault(fault)
        finally:
            faults_done = True

    async def one_fault(fault: str) -> None:
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
        try:
            await injecting
        except Exception as exc:  # a fault that failed to apply or heal: say so, go on
            record.error = f"{type(exc).__name__}: {exc}"
            runner_errors.append(f"fault {fault}: {record.error}")

    sampler = asyncio.create_task(sample_loop())
    load: LoadResult | None = None
    try:
        await fault_loop()
        load = await load_task
        if not await wait_until_settled(target.database_url, settle_timeout):
            runner_errors.append(f"not settled within {settle_timeout:.0f}s")
    except Exception as exc:
        log.exception("scenario runner failed; computing the verdict all the same")
        runner_errors.append(f"runner: {type(exc).__name__}: {exc}")
    finally:
        done.set()
        await sampler
        if not load_task.done():
            load_task.cancel()
        with contextlib.suppress(BaseException):
            load = load or await load_task
    load = load or LoadResult(started=started)
    verdict = await _retrying(
        "the exactly-once check",
        lambda: check_exactly_once(target.database_url, target.provider_url, load.acknowledged),
    )
    result = ScenarioResult(
        load=load,
        verdict=verdict,
        samples=samples,
        failovers=failovers,
        load_offset=load.started - started,
        runner_errors=runner_errors,
    )
    result.duration_s = time.monotonic() - started
    result.stale_writes_rejected = await asyncio.to_thread(
        stale_writes, target.node_urls, target.api_key
    )
    figures = await _retrying("the charge figures", lambda: charge_figures(target.database_url))
    result.token_changes = figures.token_changes
    result.throughput_per_s = figures.throughput_per_s
    result.charged_per_second = [
        (second - int(wall_started), n) for second, n in figures.charged_per_second
    ]
    if progress_path is not None:
        await asyncio.to_thread(_write_json, progress_path, {"status": "done", **result.report()})
    return result


@dataclass
class ChargeFigures:
    """What the payments table says about charging over a run."""

    # (epoch second, charges completed in it)
    charged_per_second: list[tuple[int, int]]
    # Between consecutive leaders: last charge by the old token → first by the new one.
    token_changes: list[dict[str, float | int]]
    throughput_per_s: float  # charges / (first ingest → last charge)


async def charge_figures(database_url: str) -> ChargeFigures:
    """Charging per second, the gap at each leader change and the throughput, from the
    payments table (what a remote run without fault injection can still report)."""
    conn = await asyncpg.connect(database_url, timeout=5)
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
    throughput = 0.0
    if span["n"] and span["last"] and span["first"] and span["last"] > span["first"]:
        throughput = int(span["n"]) / (float(span["last"]) - float(span["first"]))
    return ChargeFigures(
        charged_per_second=[(int(r["s"]), int(r["n"])) for r in rows],
        token_changes=[
            {
                "from_token": int(old["token"]),
                "to_token": int(new["token"]),
                "gap_seconds": round(float(new["first"]) - float(old["last"]), 3),
            }
            for old, new in itertools.pairwise(per_token)
        ],
        throughput_per_s=throughput,
    )


def _write_progress(
    path: Path, samples: list[Sample], failovers: list[Failover], errors: list[str]
) -> None:
    """The run so far, for a reader who cannot wait for the end (or whose run was killed)."""
    last = samples[-1] if samples else None
    _write_json(
        path,
        {
            "status": "running",
            "elapsed_s": last.t if last else 0.0,
            "accepted": last.accepted if last else 0,
            "charged": last.charged if last else 0,
            "queue_depth": queue_depth_figures(samples),
            "failovers": [
                failover_figures(f, samples, until)
                for f, until in zip(failovers, fault_spans(failovers), strict=True)
            ],
            "runner_errors": errors,
        },
    )


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)  # atomic: a reader never sees half a report


def queue_depth_figures(samples: Sequence[Sample]) -> dict[str, float]:
    """Queue depth over the run: its maximum and p99 over the samples."""
    depths = [float(s.queue_depth) for s in samples]
    return {"max": max(depths, default=0.0), "p99": round(percentile(depths, 99), 1)}


def longest_charging_gap(samples: Sequence[Sample]) -> float:
    """The longest stretch (seconds) in which charged did not move while the queue held
    payments: what a merchant would have called an outage of charging."""
    longest = 0.0
    since: float | None = None
    previous: Sample | None = None
    for sample in samples:
        stalled = (
            previous is not None and sample.charged == previous.charged and previous.queue_depth > 0
        )
        if stalled and previous is not None:
            since = previous.t if since is None else since
            longest = max(longest, sample.t - since)
        else:
            since = None
        previous = sample
    return round(longest, 2)


def fault_spans(failovers: Sequence[Failover]) -> list[float]:
    """For each fault, when the next one struck (the last one's span runs to the end)."""
    return [nxt.at for nxt in failovers[1:]] + [math.inf] if failovers else []


def failover_figures(
    failover: Failover, samples: Sequence[Sample], until: float | None = None
) -> dict[str, Any]:
    """A fault's own figures from the samples: token changes from it until ``until`` (the
    next fault, or the end of the run; at least its window), the longest charging gap in
    that span, and how long until the backlog it caused was gone: the queue back at or
    below its usual depth before the fault (the median of the DRAIN_BASELINE seconds before
    it), or at 5.

    Until the next fault, not just its window: a fault can stop charging later than it
    struck (an etcd member loss that took etcd's raft leader: leases ran out ~1 s on, and
    the leader changed twice 4 s on, outside a 3 s window that had looked clean).

    Not the one sample at the fault: under load the queue's depth moves from sample to
    sample (payments in flight and batched), and a fault that struck at a low moment was
    reported as draining for 10-20 s while the queue had long been back to its usual level.
    """
    before = [s for s in samples if s.t <= failover.at]
    usual = [s.queue_depth for s in before if s.t >= failover.at - DRAIN_BASELINE]
    baseline = statistics.median(usual) if usual else 0
    after = [s for s in samples if s.t > failover.at]
    start, end = failover.window
    span_end = max(end, until) if until is not None else end
    # From the token that led when the fault struck, through every token seen in its span.
    first = [before[-1].token] if before and before[-1].token is not None else []
    tokens = first + [s.token for s in samples if start <= s.t < span_end and s.token is not None]
    changes = sum(1 for a, b in itertools.pairwise(tokens) if a != b)
    gap = longest_charging_gap(before[-1:] + [s for s in after if s.t < span_end])
    peak = max((s.queue_depth for s in after if s.t < end + 30), default=baseline)
    drained = next(
        (s.t - failover.at for s in after if s.t >= end and s.queue_depth <= max(baseline, 5)),
        None,
    )
    return {
        "fault": failover.fault,
        "at_s": round(failover.at, 2),
        "seconds": None if failover.seconds is None else round(failover.seconds, 3),
        "token_changes": changes,
        "charging_gap_s": gap,
        "backlog_peak": peak,
        "drain_s": None if drained is None else round(drained, 2),
        "error": failover.error,
    }
