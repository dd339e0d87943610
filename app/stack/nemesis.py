"""The nemesis: named, healable network partitions of the partitioned local stack.

A :class:`Partition` is a set of directed links to cut (blackhole routes, see
:mod:`app.stack.netns`) plus when it was applied and healed. The builders below only *name*
the links; :meth:`Nemesis.apply` and :meth:`Nemesis.heal` change the network. Cuts are
counted per link, so overlapping partitions heal independently.

The runner (the root namespace: load, checks, probes) is never cut: it is the observer that
sees every node through the whole run.

Blocking (``ip`` subprocesses): async callers go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from app.stack.netns import Network

Link = tuple[str, str]  # (from, to): packets from the first to the second are dropped


@dataclass
class Partition:
    """One applied fault: the links it cuts and its timeline (wall clock, epoch seconds)."""

    kind: str
    description: str
    links: tuple[Link, ...]
    applied_at: float | None = None
    healed_at: float | None = None
    # Free-form facts the scenario wants in its report (the leader at the cut, sides, ...).
    facts: dict[str, object] = field(default_factory=dict)


def _both(pairs: Iterable[Link]) -> tuple[Link, ...]:
    """Every pair in both directions, without duplicates, in a stable order."""
    links: list[Link] = []
    for a, b in pairs:
        for link in ((a, b), (b, a)):
            if link not in links:
                links.append(link)
    return tuple(links)


class Nemesis:
    """Builds and applies partitions between the stack's nodes."""

    def __init__(
        self,
        network: Network,
        *,
        etcd: Sequence[str],
        replicas: Sequence[str],
        postgres: str = "postgres",
        provider: str = "provider",
        balancer: str | None = "haproxy",
    ) -> None:
        self.network = network
        self.etcd = list(etcd)
        self.replicas = list(replicas)
        self.postgres = postgres
        self.provider = provider
        self.balancer = balancer
        self.nodes = [*self.etcd, postgres, provider, *self.replicas]
        if balancer is not None:
            self.nodes.append(balancer)
        self.history: list[Partition] = []

    # --- builders ---------------------------------------------------------------------------

    def isolate(self, node: str) -> Partition:
        """``node`` can reach no other node and no other node can reach it."""
        others = [n for n in self.nodes if n != node]
        return Partition(
            "isolate", f"isolate {node}", _both((node, other) for other in others), facts={}
        )

    def cut(self, a: str, b: str, *, both_ways: bool = True) -> Partition:
        """Cut ``a`` from ``b``: both directions, or only packets from ``a`` to ``b``."""
        links = _both([(a, b)]) if both_ways else ((a, b),)
        arrow = "<->" if both_ways else "->"
        return Partition("cut", f"cut {a} {arrow} {b}", links)

    def leader_from(self, leader: str, what: str) -> Partition:
        """Cut the leader from every etcd member, from Postgres, or from the provider only."""
        targets = {
            "etcd": self.etcd,
            "postgres": [self.postgres],
            "provider": [self.provider],
        }.get(what)
        if targets is None:
            raise ValueError(f"cut the leader from etcd, postgres or provider, not {what!r}")
        return Partition(
            f"leader-{what}",
            f"cut leader {leader} from {what} only",
            _both((leader, target) for target in targets),
            facts={"leader": leader},
        )

    def etcd_minority(self, leader: str) -> Partition:
        """Split etcd into a minority (the first member) and a majority (the rest), with the
        leader on the minority side and every other replica on the majority side."""
        minority, majority = self.etcd[:1], self.etcd[1:]
        followers = [r for r in self.replicas if r != leader]
        pairs = [
            *itertools.product(minority, majority),
            *((leader, member) for member in majority),
            *itertools.product(followers, minority),
        ]
        return Partition(
            "etcd-minority",
            f"etcd split {minority} | {majority}; leader {leader} with the minority",
            _both(pairs),
            facts={"leader": leader, "minority": [*minority, leader], "majority": majority},
        )

    def bridge(self, leader: str) -> Partition:
        """Two halves that cannot see each other and one node that sees both (Jepsen's
        bridge): the etcd members split first | middle | last, the middle one the bridge; the
        leader sits with the first, the other replicas with the last. Postgres, the provider
        and the load balancer see everyone."""
        if len(self.etcd) < 3:
            raise ValueError("a bridge needs at least 3 etcd members")
        left = [self.etcd[0], leader]
        right = [*self.etcd[2:], *(r for r in self.replicas if r != leader)]
        return Partition(
            "bridge",
            f"halves {left} | {right}, bridged by {self.etcd[1]}",
            _both(itertools.product(left, right)),
            facts={"leader": leader, "left": left, "right": right, "bridge": self.etcd[1]},
        )

    def random_cut(self, rng: random.Random) -> Partition:
        """For flapping: isolate a random node, or cut a random pair (maybe one way only)."""
        if rng.random() < 0.4:
            return self.isolate(rng.choice(self.nodes))
        a, b = rng.sample(self.nodes, 2)
        return self.cut(a, b, both_ways=rng.random() < 0.7)

    # --- actions ----------------------------------------------------------------------------

    def apply(self, partition: Partition) -> Partition:
        """Cut every link of ``partition``; on a failure, undo the links already cut."""
        done: list[Link] = []
        try:
            for src, dst in partition.links:
                self.network.block(src, dst)
                done.append((src, dst))
        except BaseException:
            for src, dst in done:
                self.network.unblock(src, dst)
            raise
        partition.applied_at = time.time()
        self.history.append(partition)
        return partition

    def heal(self, partition: Partition) -> None:
        """Undo ``partition`` (links other partitions also cut stay cut)."""
        if partition.applied_at is None or partition.healed_at is not None:
            return
        for src, dst in partition.links:
            self.network.unblock(src, dst)
        partition.healed_at = time.time()

    def heal_all(self) -> None:
        """Undo every partition still applied, and any route left behind."""
        for partition in self.history:
            if partition.healed_at is None:
                self.heal(partition)
        self.network.heal_all()
