"""Real network partitions (issue 12): every process of the stack in its own network namespace,
a nemesis that cuts links with blackhole routes, and the behaviour the failure matrix promises.

Needs network namespaces (root, iproute2). The suite checks once; where they cannot be made
these tests — and only these — are skipped with the reason. CI runs as root and runs them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.ops.client import http_json
from app.stack.local import LocalStack
from app.stack.nemesis import Nemesis
from app.stack.netns import Network, leftovers, netns_unavailable, reap_stale
from load.partitions import PARTITION_ENV, partitioned_stack, run_partition_scenario

pytestmark = pytest.mark.chaos

TTL = 2.0  # the replicas' lease TTL (default)
RATE = 60.0  # payments/s: enough to see charging stop and resume on 2 shared cores


@functools.cache
def _why_no_netns() -> str | None:
    return netns_unavailable()


@pytest.fixture(scope="module", autouse=True)
def netns_available() -> None:
    """Checked once per run: skip (only) these tests, saying why, where namespaces fail."""
    reason = _why_no_netns()
    if reason is not None:
        pytest.skip(
            f"network namespaces are not available here ({reason}): the partition tests "
            "are skipped; run them as root on Linux with iproute2 (CI does)"
        )


@pytest.fixture(scope="module")
def stack(netns_available: None) -> Iterator[LocalStack]:
    """One partitioned stack for the module: every test heals what it cuts."""
    before = set(leftovers())
    stack = partitioned_stack(3, say=lambda _: None)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        assert set(leftovers()) <= before, "the stack left namespaces or links behind"


def _nemesis(stack: LocalStack) -> Nemesis:
    assert stack.network is not None
    return Nemesis(
        stack.network,
        etcd=[m.name for m in stack.etcd.members],
        replicas=[n.node_id for n in stack.nodes],
    )


def _ok(report: dict[str, Any]) -> None:
    summary = {k: report[k] for k in ("exactly_once", "duplicates", "lost", "stuck", "mismatched")}
    assert summary == {
        "exactly_once": True,
        "duplicates": 0,
        "lost": 0,
        "stuck": 0,
        "mismatched": 0,
    }, json.dumps(report, indent=2)


def test_a_crashed_runner_leaves_nothing_the_reaper_does_not_remove() -> None:
    # A runner that creates its network and dies by SIGKILL, before any clean-up.
    code = (
        "import os, signal\n"
        "from app.stack.netns import Network\n"
        "net = Network(['a', 'b']).create()\n"
        "print(net.run, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    run = crashed.stdout.strip()
    assert crashed.returncode == -9, crashed.stderr
    assert any(run in name for name in leftovers()), "the crash left its namespaces behind"
    assert run in reap_stale()
    assert not any(run in name for name in leftovers())


def test_cuts_are_counted_per_link_and_heal_independently(stack: LocalStack) -> None:
    network = stack.network
    assert isinstance(network, Network)
    nemesis = _nemesis(stack)
    first = nemesis.apply(nemesis.cut("replica-1", "postgres"))
    second = nemesis.apply(nemesis.isolate("postgres"))
    nemesis.heal(second)
    assert network.blocked() == [("postgres", "replica-1"), ("replica-1", "postgres")]
    nemesis.heal(first)
    assert network.blocked() == []


def test_a_replica_cut_from_etcd_names_no_leader_until_healed(stack: LocalStack) -> None:
    leader = stack.wait_leader()
    nemesis = _nemesis(stack)
    partition = nemesis.apply(nemesis.leader_from(leader.node_id, "etcd"))
    try:
        deadline = time.monotonic() + TTL + 3
        status, body = 0, dict[str, Any]()
        while time.monotonic() < deadline:
            status, body = http_json(f"{leader.url}/v1/leader", timeout=1, api_key=stack.api_key)
            if status == 503 and body.get("title") == "Leader unknown":
                break
            time.sleep(0.1)
        assert (status, body.get("title")) == (503, "Leader unknown"), body
        status, cluster = http_json(f"{leader.url}/v1/cluster", timeout=3, api_key=stack.api_key)
        assert status == 200
        assert cluster["leader"] is None
        assert cluster["leader_unknown_since"]
        assert not any(r["leading"] for r in cluster["replicas"])
        # Readiness is about taking payments (Postgres), which this replica still can.
        assert http_json(f"{leader.url}/readyz", timeout=2)[0] == 200
        successor = stack.wait_leader(exclude=leader.node_id, timeout=TTL + 5)
    finally:
        nemesis.heal(partition)
    deadline = time.monotonic() + 15
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, seen = http_json(f"{leader.url}/v1/leader", timeout=1, api_key=stack.api_key)
        if status == 200:
            break
        time.sleep(0.2)
    assert seen.get("node_id") == successor.node_id


def _scenario(stack: LocalStack, name: str, **options: Any) -> dict[str, Any]:
    _, report = asyncio.run(
        run_partition_scenario(stack, name, rate=RATE, say=lambda _: None, **options)
    )
    return report


def test_a_leader_cut_from_etcd_stops_before_its_lease_and_the_majority_elects(
    stack: LocalStack,
) -> None:
    report = _scenario(stack, "partition-leader-etcd", hold=6)
    _ok(report)
    (cut,) = report["partitions"]
    # The old leader's last provider call falls before its validity deadline (TTL - margin
    # after its last renewal, which came before the cut).
    assert cut["old_token_last_provider_call_s"] is not None
    assert cut["old_token_last_provider_call_s"] < TTL
    # A replica on the majority side leads with a newer token; charging resumes within
    # TTL + 1 s on an idle machine (measured ~2.6 s); 2 s of slack for shared CI cores.
    assert cut["token_changes"], cut
    assert cut["first_charge_by_newer_token_s"] < TTL + 1 + 2
    assert cut["old_token_last_provider_call_s"] < cut["first_charge_by_newer_token_s"]


def test_a_leader_with_the_etcd_minority_stops_before_the_majority_side_leads(
    stack: LocalStack,
) -> None:
    report = _scenario(stack, "etcd-minority", hold=8)
    _ok(report)
    (cut,) = report["partitions"]
    assert cut["token_changes"], cut
    # Slower than a plain etcd cut when etcd's raft leader sits in the minority (it renews
    # leases until check-quorum demotes it; the new raft leader re-arms them), but the old
    # leader's last provider call always comes before the new leader's first charge.
    assert cut["old_token_last_provider_call_s"] is not None
    assert cut["first_charge_by_newer_token_s"] is not None
    assert cut["old_token_last_provider_call_s"] < cut["first_charge_by_newer_token_s"]
    # Budget: check-quorum (1 election timeout) + a majority raft election (1-2 s) + leases
    # re-armed to election timeout + TTL + the 0.5 s expiry scan; measured 3.9-9.3 s.
    assert cut["first_charge_by_newer_token_s"] < 15


def test_a_leader_cut_from_postgres_steps_down_within_the_stall_limit(stack: LocalStack) -> None:
    report = _scenario(stack, "partition-leader-postgres")
    _ok(report)
    (cut,) = report["partitions"]
    limit = report["stall_limit_s"]
    assert float(PARTITION_ENV["PAYDISPATCH_DB_TIMEOUT"]) == 2
    assert limit == 10  # 3 x db_timeout + provider_timeout + 2
    # The bound: the cut leader ends its term after the stall limit (plus one progress check,
    # 0.5 s) and revokes its lease, so the next candidate leads at once (measured 11.2-11.7 s
    # with a 10 s limit); TTL of slack for the loaded cores.
    assert cut["token_changes"], cut
    assert cut["token_changes"][0]["at_s"] < limit + TTL
    # The new leader then charges; its first claim has been seen to time out once right
    # after recovery (first charge 1.6-6.6 s after its election): a looser bound, on purpose.
    assert cut["first_charge_by_newer_token_s"] is not None, cut
    assert cut["first_charge_by_newer_token_s"] < limit + TTL + 8


def test_a_leader_cut_from_the_provider_charges_nothing_twice(stack: LocalStack) -> None:
    report = _scenario(stack, "partition-leader-provider", hold=6)
    _ok(report)
    (cut,) = report["partitions"]
    # Policy: the leader keeps its term (a provider outage looks the same from every
    # replica) and retries with the same keys; charging resumes after the heal.
    assert cut["charging_resumed_s"] is not None


def test_flapping_ends_exactly_once_and_leadership_settles(stack: LocalStack) -> None:
    report = _scenario(stack, "flapping", flap_for=10, seed=7)
    _ok(report)
    assert len(report["partitions"]) >= 3
    assert report["leadership_settled_s"] is not None
    assert report["leadership_settled_s"] < 20
