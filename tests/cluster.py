"""Test helpers: several real ``paydispatch serve`` processes against real etcd and Postgres."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from app.ops.client import http_json
from app.stack.replica import ReplicaProcess
from tests.conftest import replica_url

T = TypeVar("T")

TEST_API_KEY = "test-api-key"
TEST_ADMIN_KEY = "test-admin-key"


def wait_for(
    probe: Callable[[], T | None], timeout: float, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Replicas:
    """A set of replica processes of one cluster, with observation helpers."""

    def __init__(self, replicas: list[ReplicaProcess]) -> None:
        self.all = replicas

    def alive(self) -> list[ReplicaProcess]:
        return [r for r in self.all if r.pid is not None]

    def nodes(self, among: list[ReplicaProcess] | None = None) -> dict[str, dict[str, Any]]:
        """node_id → /v1/node of every replica that answers."""
        views = {}
        for replica in among if among is not None else self.all:
            node = replica.node(timeout=0.5)
            if node is not None:
                views[replica.node_id] = node
        return views

    def leaders(self, among: list[ReplicaProcess] | None = None) -> list[dict[str, Any]]:
        """/v1/node of every answering replica that believes it leads."""
        return [n for n in self.nodes(among).values() if n["is_leader"]]

    def by_id(self, node_id: str) -> ReplicaProcess:
        return next(r for r in self.all if r.node_id == node_id)

    def wait_leader(
        self, among: list[ReplicaProcess] | None = None, *, above: int = 0, timeout: float = 15
    ) -> dict[str, Any]:
        """Wait for exactly one leader (among ``among``) with a token above ``above``."""

        def probe() -> dict[str, Any] | None:
            found = self.leaders(among)
            if len(found) == 1 and found[0]["token"] > above:
                return found[0]
            return None

        return wait_for(probe, timeout, what=f"one leader with token > {above}")

    def observed_leader(self, replica: ReplicaProcess) -> dict[str, Any] | None:
        status, body = http_json(f"{replica.url}/v1/leader", timeout=0.5, api_key=TEST_API_KEY)
        return body if status == 200 else None

    def stop_all(self) -> None:
        with ThreadPoolExecutor(len(self.all)) as pool:
            list(pool.map(lambda r: r.terminate(timeout=10), self.all))


@contextmanager
def running_replicas(
    count: int, env: dict[str, str], log_dir: Path, prefix: str = "node"
) -> Iterator[Replicas]:
    """Start ``count`` replicas in parallel, wait until all are ready, stop them after."""
    replicas = [
        ReplicaProcess(node_id=f"{prefix}-{i}", env=env, log_dir=log_dir) for i in range(count)
    ]
    group = Replicas(replicas)
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        yield group
    finally:
        group.stop_all()
        leftovers = [r.node_id for r in replicas if r.pid is not None]
        assert not leftovers, f"replicas still running: {leftovers}"


def cluster_env(database_url: str, etcd_endpoints: str, **extra: str) -> dict[str, str]:
    """Environment for replicas of one fresh election namespace. ``database_url`` is the
    owner's; the replicas log in as the least-privilege replica user, as in production."""
    env = {
        "PAYDISPATCH_DATABASE_URL": replica_url(database_url),
        "PAYDISPATCH_ETCD_ENDPOINTS": etcd_endpoints,
        "PAYDISPATCH_CLUSTER_NAME": f"test-{uuid.uuid4().hex[:10]}",
        "PAYDISPATCH_LEASE_TTL": "2",
        "PAYDISPATCH_TEST_HOOKS": "true",
        "PAYDISPATCH_LOG_LEVEL": "info",
        "PAYDISPATCH_DB_POOL_SIZE": "5",
        "PAYDISPATCH_API_KEYS": TEST_API_KEY,
        "PAYDISPATCH_ADMIN_API_KEYS": TEST_ADMIN_KEY,
    }
    env.update(extra)
    return env
