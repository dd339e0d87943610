"""Partition scenarios (``python -m load partition-leader-etcd`` …): paced load through haproxy
on the partitioned local stack, a nemesis that cuts links, heal, settle, then the exactly-once
verdict and, per partition, when it started and healed, the leadership tokens seen during it
and how long until charging resumed.

Everything is bounded: a fixed number of payments with a deadline, each partition held for a
fixed time, flapping for a fixed time, every wait with a timeout. Traffic stays on the run's
own private addresses (checked before any load is sent). Needs root (network namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from app.dispatch.leader import stall_limit
from app.errors import ConfigurationError
from app.ops.client import http_json
from app.settings import Settings
from app.stack.local import LocalStack
from app.stack.nemesis import Nemesis, Partition
from app.stack.netns import Network, netns_unavailable
from load.checker import check_exactly_once, wait_until_settled
from load.loadgen import post_payments
from load.scenario import ScenarioResult, charge_figures, observed_leader, stale_writes

# Shorter than the defaults (db 3 s, provider 5 s) so a Postgres cut ends a term in 10 s,
# not 16 s: stall limit = 3 x db_timeout + provider_timeout + 2.
PARTITION_ENV = {
    "PAYDISPATCH_DB_TIMEOUT": "2",
    "PAYDISPATCH_PROVIDER_TIMEOUT": "2",
    "PAYDISPATCH_RETRY_MAX_DELAY": "2",
}
WARMUP_S = 4.0  # load before the first cut: a leader charging steadily
GAP_S = 4.0  # between two partitions of a sequence
TAIL_S = 6.0  # load after the last heal
FLAP_MIN_S, FLAP_MAX_S = 1.0, 3.0
SETTLED_TIMEOUT_S = 60.0
WINDOW_AFTER_HEAL_S = 15.0  # how far past a heal charging gaps are looked for


@dataclass(frozen=True)
class PartitionScenario:
    """A named partition plan."""

    name: str
    description: str
    kind: str  # leader-etcd, leader-postgres, …, flapping, chaos


PARTITION_SCENARIOS = {
    s.name: s
    for s in (
        PartitionScenario(
            "partition-leader-etcd", "cut the leader from every etcd member only", "leader-etcd"
        ),
        PartitionScenario(
            "partition-leader-postgres",
            "cut the leader from Postgres only, past the stall limit",
            "leader-postgres",
        ),
        PartitionScenario(
            "partition-leader-provider", "cut the leader from the provider only", "leader-provider"
        ),
        PartitionScenario("isolate-leader", "cut the leader from every node", "isolate-leader"),
        PartitionScenario(
            "etcd-minority",
            "split etcd 1 | 2 with the leader on the minority side",
            "etcd-minority",
        ),
        PartitionScenario(
            "bridge", "two halves joined only through the middle etcd member", "bridge"
        ),
        PartitionScenario("flapping", "random cuts every 1-3 s for --flap-for seconds", "flapping"),
        PartitionScenario(
            "partition-chaos", "a seeded mix of every partition above", "partition-chaos"
        ),
    )
}
CHAOS_KINDS = (
    "leader-etcd",
    "leader-postgres",
    "leader-provider",
    "isolate-leader",
    "etcd-minority",
    "bridge",
    "random",
)


@dataclass
class Plan:
    """How long the partitions of a run hold (seconds)."""

    hold: float
    postgres_hold: float
    flap_for: float
    chaos_steps: int
    seed: int

    def steps(self, kind: str) -> list[tuple[str, float]]:
        """(partition kind, hold) in order; flapping is expanded while it runs."""
        if kind == "flapping":
            return [("flapping", self.flap_for)]
        if kind == "partition-chaos":
            rng = random.Random(self.seed)
            steps = []
            for _ in range(self.chaos_steps):
                chosen = rng.choice(CHAOS_KINDS)
                hold = self.postgres_hold if chosen == "leader-postgres" else rng.uniform(3, 8)
                steps.append((chosen, round(hold, 1)))
            return steps
        return [(kind, self.postgres_hold if kind == "leader-postgres" else self.hold)]

    def seconds(self, kind: str) -> float:
        """Planned load duration: warm-up, every hold and gap, the tail."""
        steps = self.steps(kind)
        return WARMUP_S + sum(h for _, h in steps) + GAP_S * (len(steps) - 1) + TAIL_S


@dataclass
class Sample:
    """The leader as the runner saw it (first replica that confirms one)."""

    at: float  # epoch seconds
    node: str | None
    token: int | None


@dataclass
class Run:
    """What happened, for the report."""

    partitions: list[Partition] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    leadership_settled_s: float | None = None


def _token_at_cut(partition: Partition) -> int:
    """The leader's token when the partition was applied (0 for leaderless cuts)."""
    token = partition.facts.get("token")
    return token if isinstance(token, int) else 0


def _rel(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 3)


async def _leader(stack: LocalStack) -> tuple[str, int]:
    """The acting leader (per its own /v1/node) and its token; waits up to 30 s."""
    node = await asyncio.to_thread(stack.wait_leader, None, 30.0)
    view = await asyncio.to_thread(node.node, 1.0)
    token = int(view["token"]) if view and view.get("token") else 0
    return node.node_id, token


def _build(nemesis: Nemesis, kind: str, leader: str, rng: random.Random) -> Partition:
    if kind.startswith("leader-"):
        return nemesis.leader_from(leader, kind.removeprefix("leader-"))
    if kind == "isolate-leader":
        return nemesis.isolate(leader)
    if kind == "etcd-minority":
        return nemesis.etcd_minority(leader)
    if kind == "bridge":
        return nemesis.bridge(leader)
    if kind == "random":
        return nemesis.random_cut(rng)
    raise ValueError(f"unknown partition kind {kind!r}")


async def _flap(nemesis: Nemesis, seconds: float, rng: random.Random, run: Run) -> None:
    """Random cuts, each held 1-3 s, for ``seconds`` (bounded: ends by then). Half of them
    aim at the leader of the moment (cut from etcd, Postgres or the provider, or isolated):
    uniform picks over ten nodes would rarely touch the one that matters most."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen = run.samples[-1] if run.samples else None
        if seen is not None and seen.node is not None and rng.random() < 0.5:
            target = rng.choice(("etcd", "postgres", "provider", "isolate"))
            partition = (
                nemesis.isolate(seen.node)
                if target == "isolate"
                else nemesis.leader_from(seen.node, target)
            )
            partition.facts |= {"leader": seen.node, "token": seen.token}
        else:
            partition = nemesis.random_cut(rng)
        partition.facts["flap"] = True
        await asyncio.to_thread(nemesis.apply, partition)
        run.partitions.append(partition)
        hold = min(rng.uniform(FLAP_MIN_S, FLAP_MAX_S), max(0.0, end - time.monotonic()))
        try:
            await asyncio.sleep(hold)
        finally:
            await asyncio.to_thread(nemesis.heal, partition)


async def _partitions(
    stack: LocalStack, nemesis: Nemesis, plan: Plan, kind: str, run: Run, say: Callable[[str], None]
) -> None:
    rng = random.Random(plan.seed)
    await asyncio.sleep(WARMUP_S)
    for i, (step, hold) in enumerate(plan.steps(kind)):
        if i:
            await asyncio.sleep(GAP_S)
        if step == "flapping":
            say(f"flapping for {hold:.0f} s")
            await _flap(nemesis, hold, rng, run)
            continue
        leader, token = await _leader(stack)
        partition = _build(nemesis, step, leader, rng)
        # etcd's own raft leader matters: one left in a minority keeps renewing leases until
        # check-quorum demotes it, and a new one re-arms every lease (see the README).
        raft = await asyncio.to_thread(stack.etcd.raft_leader, 1.0)
        partition.facts |= {
            "leader": leader,
            "token": token,
            "hold_s": hold,
            "etcd_raft_leader": raft.name if raft else None,
        }
        await asyncio.to_thread(nemesis.apply, partition)
        run.partitions.append(partition)
        say(f"{partition.description} (token {token}) for {hold:.1f} s")
        try:
            await asyncio.sleep(hold)
        finally:
            await asyncio.to_thread(nemesis.heal, partition)
        say(f"healed: {partition.description}")


async def _sample(stack: LocalStack, run: Run, done: asyncio.Event) -> None:
    """The leader every 0.25 s until ``done`` (from replicas that can confirm one)."""
    urls = [node.url for node in stack.nodes]
    while not done.is_set():
        seen = await asyncio.to_thread(observed_leader, urls, stack.api_key)
        run.samples.append(
            Sample(
                time.time(),
                str(seen["node_id"]) if seen else None,
                int(seen["token"]) if seen else None,
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.25)


def _agreed_leader(stack: LocalStack) -> int | None:
    """The token of the leader every replica confirms, if that replica says it leads."""
    tokens = set()
    for node in stack.nodes:
        status, body = http_json(f"{node.url}/v1/leader", timeout=0.5, api_key=stack.api_key)
        if status != 200 or not isinstance(body, dict):
            return None
        tokens.add((str(body["node_id"]), int(body["token"])))
    if len(tokens) != 1:
        return None
    ((node_id, token),) = tokens
    view = stack.node(node_id).node(timeout=0.5)
    return token if view and view.get("is_leader") and view.get("token") == token else None


async def _charged_since(database_url: str, token: int, since: float) -> bool:
    """True once ``token`` completed a charge after ``since`` (epoch), or nothing is open."""
    with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
        conn = await asyncpg.connect(database_url, timeout=2)
        try:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM payments WHERE fence_token = $1"
                    " AND completed_at > to_timestamp($2))"
                    " OR NOT EXISTS (SELECT 1 FROM payments"
                    " WHERE status IN ('pending', 'in_flight'))",
                    token,
                    since,
                )
            )
        finally:
            await conn.close()
    return False


async def _wait_settled_leadership(stack: LocalStack, since: float) -> float | None:
    """Seconds from ``since`` (epoch) until every replica confirms one leader, that replica
    says it leads, and it has charged since (a leader that all agree on but that does not
    work has not settled anything)."""
    deadline = time.monotonic() + SETTLED_TIMEOUT_S
    while time.monotonic() < deadline:
        token = await asyncio.to_thread(_agreed_leader, stack)
        if token is not None and await _charged_since(stack.database_url, token, since):
            return round(time.time() - since, 3)
        await asyncio.sleep(0.1)
    return None


async def _charging_figures(
    database_url: str, partition: Partition, window_end: float
) -> dict[str, Any]:
    """From the rows: the longest charging gap around the partition, when charging resumed,
    the first charge by a newer token, the old token's last provider call, and the tokens
    that charged during it."""
    assert partition.applied_at is not None
    start = partition.applied_at
    end = window_end
    token = _token_at_cut(partition)
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        done = await conn.fetch(
            "SELECT extract(epoch FROM completed_at)::float8 AS at FROM payments"
            " WHERE status IN ('succeeded', 'declined')"
            " AND completed_at BETWEEN to_timestamp($1) AND to_timestamp($2)"
            " ORDER BY completed_at",
            start,
            end,
        )
        # A stall that begins inside the window may end after it: the first charge past
        # the window closes the last gap.
        next_after = await conn.fetchval(
            "SELECT extract(epoch FROM min(completed_at))::float8 FROM payments"
            " WHERE status IN ('succeeded', 'declined') AND completed_at > to_timestamp($1)",
            end,
        )
        first_new = await conn.fetchval(
            "SELECT extract(epoch FROM min(completed_at))::float8 FROM payments"
            " WHERE status IN ('succeeded', 'declined') AND fence_token > $1"
            " AND completed_at >= to_timestamp($2)",
            token,
            start,
        )
        last_old_call = await conn.fetchval(
            "SELECT extract(epoch FROM max(started_at))::float8 FROM payment_attempts"
            " WHERE fence_token = $1",
            token,
        )
        tokens = await conn.fetch(
            "SELECT fence_token, count(*) AS n FROM payments"
            " WHERE status IN ('succeeded', 'declined')"
            " AND completed_at BETWEEN to_timestamp($1) AND to_timestamp($2)"
            " GROUP BY fence_token ORDER BY fence_token",
            start,
            end,
        )
        # Provider calls started during the cut by outcome: "retry" and "unknown" are the
        # calls whose answer never came (same key next time), "reconciled" settled by lookup.
        outcomes = await conn.fetch(
            "SELECT outcome, count(*) AS n FROM payment_attempts"
            " WHERE started_at BETWEEN to_timestamp($1) AND to_timestamp($2)"
            " GROUP BY outcome ORDER BY outcome",
            start,
            partition.healed_at or start,
        )
    finally:
        await conn.close()
    times = [start, *(float(r["at"]) for r in done)]
    if next_after is not None:
        times.append(float(next_after))
    gaps = [(b - a, b) for a, b in itertools.pairwise(times)]
    longest = max(gaps, default=(None, None))
    return {
        "longest_charging_gap_s": None if longest[0] is None else round(longest[0], 3),
        "charging_resumed_s": _rel(longest[1], start),
        "first_charge_by_newer_token_s": _rel(first_new, start),
        "old_token_last_provider_call_s": _rel(last_old_call, start)
        if token and last_old_call
        else None,
        "charged_by_token": {str(r["fence_token"]): int(r["n"]) for r in tokens},
        "attempts_during_cut": {str(r["outcome"]): int(r["n"]) for r in outcomes},
    }


def _window_end(partitions: list[Partition], i: int) -> float:
    """Where partition ``i``'s figures stop: WINDOW_AFTER_HEAL_S past its heal, or the next
    partition's start if that comes first (so a sequence does not count one cut twice)."""
    partition = partitions[i]
    end = (partition.healed_at or partition.applied_at or 0.0) + WINDOW_AFTER_HEAL_S
    later = [p.applied_at for p in partitions[i + 1 :] if p.applied_at is not None]
    return min([end, *later[:1]])


def _partition_report(
    partition: Partition, run: Run, origin: float, window_end: float, figures: dict[str, Any]
) -> dict[str, Any]:
    start = partition.applied_at or 0.0
    changes: list[dict[str, Any]] = []
    before = [s.token for s in run.samples if s.at < start and s.token is not None]
    last: int | None = _token_at_cut(partition) or (before[-1] if before else None)
    for sample in run.samples:
        if start <= sample.at <= window_end and sample.token not in (
            None,
            last,
        ):
            changes.append(
                {"at_s": round(sample.at - start, 3), "node": sample.node, "token": sample.token}
            )
            last = sample.token
    return {
        "kind": partition.kind,
        "description": partition.description,
        "started_at_s": _rel(partition.applied_at, origin),
        "healed_at_s": _rel(partition.healed_at, origin),
        "held_s": _rel(partition.healed_at, start),
        "leader_at_cut": partition.facts.get("leader"),
        "etcd_raft_leader_at_cut": partition.facts.get("etcd_raft_leader"),
        "token_at_cut": partition.facts.get("token"),
        "links_cut": len(partition.links),
        "token_changes": changes,
        **figures,
    }


def partitioned_stack(
    replicas: int, say: Callable[[str], None], keep_dir: Path | None = None
) -> LocalStack:
    """The stack every partition scenario runs on (ConfigurationError if namespaces are not
    usable). With ``keep_dir`` its logs and data stay there after the run."""
    reason = netns_unavailable()
    if reason is not None:
        raise ConfigurationError(f"partition scenarios need network namespaces: {reason}")
    return LocalStack(
        replicas=replicas,
        replica_env=dict(PARTITION_ENV),
        partitioned=True,
        say=say,
        base_dir=keep_dir,
    )


def _check_private(network: Network, urls: list[str]) -> None:
    """Load goes only to the run's own addresses (never anywhere else)."""
    for url in urls:
        host = urlsplit(url).hostname or ""
        if not network.contains(host):
            raise ConfigurationError(f"{url} is not an address of this run's network")


async def run_partition_scenario(
    stack: LocalStack,
    name: str,
    *,
    rate: float,
    hold: float = 8.0,
    flap_for: float = 15.0,
    chaos_steps: int = 4,
    seed: int = 1,
    settle_timeout: float = 60.0,
    say: Callable[[str], None] = print,
) -> tuple[ScenarioResult, dict[str, Any]]:
    """Run the partition scenario ``name`` on a started partitioned ``stack``; returns the
    usual result and the full JSON report (with the ``partitions`` figures)."""
    scenario = PARTITION_SCENARIOS[name]
    network = stack.network
    if network is None:
        raise ConfigurationError("partition scenarios need LocalStack(partitioned=True)")
    nemesis_for = Nemesis(
        network,
        etcd=[m.name for m in stack.etcd.members],
        replicas=[n.node_id for n in stack.nodes],
        balancer="haproxy" if stack.haproxy is not None else None,
    )
    _check_private(network, list(stack.ingress))
    settings = Settings.model_validate(
        {
            "database_url": stack.replica_database_url,
            "etcd_endpoints": stack.etcd.endpoints_csv,
            "provider_url": stack.provider.url,
            "db_timeout": float(PARTITION_ENV["PAYDISPATCH_DB_TIMEOUT"]),
            "provider_timeout": float(PARTITION_ENV["PAYDISPATCH_PROVIDER_TIMEOUT"]),
        }
    )
    limit = stall_limit(settings)
    plan = Plan(
        hold=hold,
        postgres_hold=max(hold, limit + 6),
        flap_for=flap_for,
        chaos_steps=chaos_steps,
        seed=seed,
    )
    duration = plan.seconds(scenario.kind)
    count = max(1, int(rate * duration))
    say(f"{name}: {count} payments at {rate:g}/s over ~{duration:.0f} s; stall limit {limit:g} s")
    run = Run()
    origin = time.time()
    started = time.monotonic()
    done = asyncio.Event()
    sampler = asyncio.create_task(_sample(stack, run, done))
    load_task = asyncio.create_task(
        post_payments(
            stack.ingress,
            count,
            rate=rate,
            concurrency=64,
            deadline_s=duration + settle_timeout,
            api_key=stack.api_key,
            # The ingress is this run's own private address (checked above), not a remote.
            allow_remote=True,
        )
    )
    try:
        await _partitions(stack, nemesis_for, plan, scenario.kind, run, say)
        last_heal = max((p.healed_at or origin for p in run.partitions), default=origin)
        run.leadership_settled_s = await _wait_settled_leadership(stack, last_heal)
        say(f"leadership settled {run.leadership_settled_s} s after the last heal")
        load = await load_task
        settled = await wait_until_settled(stack.database_url, settle_timeout)
        say("every payment terminal" if settled else "not settled in time")
    finally:
        await asyncio.to_thread(nemesis_for.heal_all)
        done.set()
        await sampler
        if not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
    verdict = await check_exactly_once(stack.database_url, stack.provider.url, load.acknowledged)
    result = ScenarioResult(load=load, verdict=verdict)
    result.duration_s = time.monotonic() - started
    result.stale_writes_rejected = await asyncio.to_thread(
        stale_writes, [n.url for n in stack.nodes], stack.api_key
    )
    charging_overall = await charge_figures(stack.database_url)
    result.token_changes = charging_overall.token_changes
    result.throughput_per_s = charging_overall.throughput_per_s
    figures = []
    for i, partition in enumerate(run.partitions):
        end = _window_end(run.partitions, i)
        charging = await _charging_figures(stack.database_url, partition, end)
        figures.append(_partition_report(partition, run, origin, end, charging))
    report: dict[str, Any] = {
        "scenario": name,
        **result.report(),
        "client_gave_up": len(load.gave_up),
        "leadership_changes": len({s.token for s in run.samples if s.token is not None}) - 1,
        "leadership_settled_s": run.leadership_settled_s,
        "stall_limit_s": limit,
        "lease_ttl_s": settings.lease_ttl,
        "partitions": figures,
    }
    return result, report


async def run_partition_cli(
    name: str,
    *,
    rate: float,
    replicas: int,
    hold: float,
    flap_for: float,
    chaos_steps: int,
    seed: int,
    settle_timeout: float,
    say: Callable[[str], None],
    keep_dir: Path | None = None,
) -> tuple[ScenarioResult, dict[str, Any]]:
    """Start the partitioned stack, run ``name``, stop the stack (namespaces removed; the
    directory kept when ``keep_dir`` names it)."""
    stack = partitioned_stack(replicas, say, keep_dir)
    await asyncio.to_thread(stack.start)
    try:
        return await run_partition_scenario(
            stack,
            name,
            rate=rate,
            hold=hold,
            flap_for=flap_for,
            chaos_steps=chaos_steps,
            seed=seed,
            settle_timeout=settle_timeout,
            say=say,
        )
    finally:
        await asyncio.to_thread(stack.stop)
