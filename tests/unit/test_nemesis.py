"""The nemesis's partitions name exactly the links they promise (no network is touched: the
builders only name links; applying them is tests/chaos/test_partitions.py)."""

from __future__ import annotations

import random
from typing import cast

from app.stack.nemesis import Nemesis
from app.stack.netns import Network
from load.partitions import PARTITION_SCENARIOS, Plan

ETCD = ["etcd0", "etcd1", "etcd2"]
REPLICAS = ["replica-1", "replica-2", "replica-3"]


def nemesis() -> Nemesis:
    return Nemesis(cast(Network, None), etcd=ETCD, replicas=REPLICAS)


def reachable(links: tuple[tuple[str, str], ...], a: str, b: str) -> bool:
    return (a, b) not in links and (b, a) not in links


def test_isolating_a_node_cuts_it_from_every_other_node_both_ways() -> None:
    links = nemesis().isolate("replica-2").links
    others = [*ETCD, "postgres", "provider", "replica-1", "replica-3", "haproxy"]
    assert set(links) == {(a, b) for o in others for a, b in (("replica-2", o), (o, "replica-2"))}


def test_a_one_way_cut_names_one_direction_only() -> None:
    assert nemesis().cut("replica-1", "postgres", both_ways=False).links == (
        ("replica-1", "postgres"),
    )


def test_cutting_the_leader_from_etcd_leaves_postgres_and_the_provider_reachable() -> None:
    links = nemesis().leader_from("replica-1", "etcd").links
    assert all(not reachable(links, "replica-1", member) for member in ETCD)
    assert reachable(links, "replica-1", "postgres")
    assert reachable(links, "replica-1", "provider")
    assert all(reachable(links, "replica-2", member) for member in ETCD)


def test_the_etcd_minority_holds_the_leader_and_the_majority_the_other_replicas() -> None:
    links = nemesis().etcd_minority("replica-2").links
    assert not reachable(links, "etcd0", "etcd1")
    assert not reachable(links, "etcd0", "etcd2")
    assert reachable(links, "etcd1", "etcd2")
    assert reachable(links, "replica-2", "etcd0")
    assert not reachable(links, "replica-2", "etcd1")
    for follower in ("replica-1", "replica-3"):
        assert not reachable(links, follower, "etcd0")
        assert reachable(links, follower, "etcd1")


def test_the_bridge_node_sees_both_halves_which_cannot_see_each_other() -> None:
    links = nemesis().bridge("replica-1").links
    assert all(reachable(links, "etcd1", node) for node in [*ETCD, *REPLICAS])
    assert not reachable(links, "etcd0", "etcd2")
    assert not reachable(links, "replica-1", "replica-3")
    assert reachable(links, "replica-1", "postgres")


def test_the_chaos_plan_is_the_same_for_the_same_seed_and_bounded() -> None:
    plan = Plan(hold=8, postgres_hold=16, flap_for=15, chaos_steps=5, seed=3)
    assert plan.steps("partition-chaos") == plan.steps("partition-chaos")
    assert len(plan.steps("partition-chaos")) == 5
    assert all(hold <= 16 for _, hold in plan.steps("partition-chaos"))
    assert plan.seconds("flapping") == 4 + 15 + 6


def test_random_cuts_stay_between_the_stacks_own_nodes() -> None:
    rng = random.Random(1)
    n = nemesis()
    for _ in range(200):
        for a, b in n.random_cut(rng).links:
            assert {a, b} <= set(n.nodes)
            assert a != b


def test_every_scenario_the_issue_names_exists() -> None:
    assert set(PARTITION_SCENARIOS) == {
        "partition-leader-etcd",
        "partition-leader-postgres",
        "partition-leader-provider",
        "isolate-leader",
        "etcd-minority",
        "bridge",
        "flapping",
        "partition-chaos",
    }
