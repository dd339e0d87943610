"""The whole system on loopback, in one temp directory: 3-member etcd, PostgreSQL (migrated),
the stand-in provider, N replicas and (when installed) haproxy. Used by the demo, the load
scenarios and the tests. ``stop()`` leaves no process behind, and says so if it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

from app.ops.client import http_json
from app.stack import StackError
from app.stack.etcd import EtcdCluster
from app.stack.haproxy import HaproxyProcess, haproxy_binary
from app.stack.netns import Network
from app.stack.postgres import PostgresServer
from app.stack.provider import ProviderProcess
from app.stack.replica import ReplicaProcess
from app.stack.target import Target

log = logging.getLogger(__name__)

DATABASE = "paydispatch"
# Replicas log in as REPLICA_USER, a member of the least-privilege REPLICA_ROLE (whose grants
# `paydispatch migrate` sets); the migration and the stack's own checks use the owner.
REPLICA_ROLE = "paydispatch_replica"
REPLICA_USER = "paydispatch_app"


def plan_network(etcd_members: int, replicas: int) -> Network:
    """The partitioned stack's nodes: each etcd member, Postgres, the provider, each replica
    and haproxy, in its own namespace (nothing is created until Network.create())."""
    return Network(
        [
            *(f"etcd{i}" for i in range(etcd_members)),
            "postgres",
            "provider",
            *(f"replica-{i + 1}" for i in range(replicas)),
            "haproxy",
        ]
    )


class Placement(TypedDict):
    """Where a process runs: its address and the prefix that enters its namespace."""

    host: str
    exec_prefix: list[str]


def placement(network: Network | None, node: str) -> Placement:
    """``node``'s address and namespace prefix; loopback and none without a network."""
    if network is None:
        return {"host": "127.0.0.1", "exec_prefix": []}
    return {"host": network.node(node).address, "exec_prefix": network.exec_prefix(node)}


@dataclass
class LocalStack:
    """Everything paydispatch needs, as real processes on 127.0.0.1."""

    replicas: int = 3
    etcd_members: int = 3
    provider_settings: dict[str, Any] = field(default_factory=dict)
    replica_env: dict[str, str] = field(default_factory=dict)
    use_haproxy: bool | None = None  # None: when haproxy is on PATH
    base_dir: Path | None = None
    say: Callable[[str], None] = log.info
    # Every process in its own network namespace on one bridge, addressed by its private
    # address (app.stack.netns), so the nemesis can cut links. Needs root.
    partitioned: bool = False

    def __post_init__(self) -> None:
        self._owns_dir = self.base_dir is None
        self.dir = self.base_dir or Path(tempfile.mkdtemp(prefix="paydispatch-stack-"))
        self.network: Network | None = None
        if self.partitioned:
            self.network = plan_network(self.etcd_members, self.replicas)
        place = functools.partial(placement, self.network)
        self.postgres = PostgresServer(
            base_dir=self.dir / "postgres",
            **place("postgres"),
            trusted_network=str(self.network.subnet) if self.network else None,
        )
        self.etcd = EtcdCluster(
            size=self.etcd_members,
            base_dir=self.dir / "etcd",
            placement=[
                (kw["host"], kw["exec_prefix"])
                for kw in (place(f"etcd{i}") for i in range(self.etcd_members))
            ]
            if self.network
            else None,
        )
        self.provider = ProviderProcess(
            self.dir / "provider", dict(self.provider_settings), **place("provider")
        )
        self.nodes: list[ReplicaProcess] = []
        # Fresh keys per stack: nothing secret is baked into the code or the demo.
        self.api_key = f"pd_{secrets.token_urlsafe(18)}"
        self.admin_api_key = f"pd_admin_{secrets.token_urlsafe(18)}"
        self.haproxy: HaproxyProcess | None = None

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """URL of the stack's database as its owner (migrations, checks, the load tools)."""
        return self.postgres.url(DATABASE)

    @property
    def replica_database_url(self) -> str:
        """URL of the stack's database as the replicas' least-privilege login."""
        return self.postgres.url(DATABASE, user=REPLICA_USER)

    @property
    def ingress(self) -> list[str]:
        """Where clients send payments: haproxy if running, else every replica."""
        if self.haproxy is not None:
            return [self.haproxy.url]
        return [node.url for node in self.nodes]

    def env(self) -> dict[str, str]:
        """Environment shared by every replica (`paydispatch migrate` swaps in the owner)."""
        return {
            "PAYDISPATCH_DATABASE_URL": self.replica_database_url,
            "PAYDISPATCH_REPLICA_ROLE": REPLICA_ROLE,
            "PAYDISPATCH_ETCD_ENDPOINTS": self.etcd.endpoints_csv,
            "PAYDISPATCH_PROVIDER_URL": self.provider.url,
            "PAYDISPATCH_CLUSTER_NAME": f"local-{uuid.uuid4().hex[:8]}",
            "PAYDISPATCH_TEST_HOOKS": "false",
            "PAYDISPATCH_API_KEYS": self.api_key,
            "PAYDISPATCH_ADMIN_API_KEYS": self.admin_api_key,
            **self.replica_env,
        }

    def start(self) -> LocalStack:
        """Bring everything up, in dependency order. On failure, tears down what started."""
        try:
            self.say(f"stack directory {self.dir}")
            if self.network is not None:
                self.network.create()
                self.say(
                    f"network namespaces of run {self.network.run} on bridge "
                    f"{self.network.bridge} ({self.network.subnet})"
                )
            self.postgres.start()
            self._create_database()
            self.say(f"postgres ready on {self.postgres.host}:{self.postgres.port}")
            self.etcd.start()
            self.say(f"etcd cluster of {self.etcd_members} ready: {self.etcd.endpoints_csv}")
            self.provider.start()
            self.say(f"provider ready at {self.provider.url}")
            env = self.env()
            self._migrate(env)
            self.say("schema migrated")
            self.nodes = [
                ReplicaProcess(
                    node_id=f"replica-{i + 1}",
                    env=env,
                    log_dir=self.dir / "replicas",
                    **placement(self.network, f"replica-{i + 1}"),
                )
                for i in range(self.replicas)
            ]
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_ready()
            self.say(
                f"{self.replicas} replicas ready: " + ", ".join(node.url for node in self.nodes)
            )
            want_haproxy = (
                self.use_haproxy if self.use_haproxy is not None else bool(haproxy_binary())
            )
            if want_haproxy:
                self.haproxy = HaproxyProcess(
                    self.dir / "haproxy",
                    [(n.node_id, n.port) for n in self.nodes],
                    backend_hosts={n.node_id: n.host for n in self.nodes},
                    **placement(self.network, "haproxy"),
                )
                self.haproxy.start()
                self.say(f"haproxy load balancer at {self.haproxy.url}")
            else:
                self.say(
                    "haproxy is not on PATH: the load generator spreads requests over "
                    "the replicas itself"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _create_database(self) -> None:
        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(self.postgres.url("postgres"))
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE
                )
                if not exists:
                    await conn.execute(f"CREATE DATABASE {DATABASE}")
                # As an operator would, once: the group role (migrate sets its grants) and a
                # login in it for the replicas.
                for role, options in ((REPLICA_ROLE, "NOLOGIN"), (REPLICA_USER, "LOGIN")):
                    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                        await conn.execute(f"CREATE ROLE {role} {options}")
                await conn.execute(f"GRANT {REPLICA_ROLE} TO {REPLICA_USER}")
            finally:
                await conn.close()

        asyncio.run(create())

    def _migrate(self, env: dict[str, str]) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            # Migrations run as the owner; replicas never could (no DDL in their role).
            env={**os.environ, **env, "PAYDISPATCH_DATABASE_URL": self.database_url},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"migrate failed: {result.stderr.strip()}")

    def stop(self) -> None:
        """Stop everything (replicas resign first) and check that nothing is left running."""
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.nodes:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.terminate(timeout=10), self.nodes))
        self.provider.stop()
        with contextlib.suppress(StackError):
            self.etcd.stop()
        self.postgres.stop()
        left = self.running_pids()
        if self.network is not None:
            # After the processes: a namespace outlives its name while anything runs in it,
            # and remove() kills whatever still does.
            self.network.remove()
        if left:
            raise StackError(f"processes still running after stop: {left}")
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def running_pids(self) -> list[int]:
        """PIDs of this stack's processes that are still alive."""
        pids = [node.pid for node in self.nodes]
        pids += [self.provider.pid, self.postgres.pid]
        pids += [member.pid for member in self.etcd.members]
        if self.haproxy is not None:
            pids.append(self.haproxy.pid)
        return [pid for pid in pids if pid is not None]

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- observation ------------------------------------------------------------------------

    def leader(self) -> tuple[ReplicaProcess, dict[str, Any]] | None:
        """The replica that leads right now, per its own /v1/node (None while none does)."""
        for node in self.nodes:
            if node.pid is None:
                continue
            view = node.node(timeout=0.5)
            if view is not None and view.get("is_leader"):
                return node, view
        return None

    def observed_leader(self) -> dict[str, Any] | None:
        """GET /v1/leader from the first replica that answers."""
        for node in self.nodes:
            status, body = http_json(f"{node.url}/v1/leader", timeout=0.5, api_key=self.api_key)
            if status == 200:
                return dict(body)
        return None

    def node(self, node_id: str) -> ReplicaProcess:
        """The replica named ``node_id``."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    # --- faults -----------------------------------------------------------------------------

    def wait_leader(self, exclude: str | None = None, timeout: float = 20.0) -> ReplicaProcess:
        """Wait until a replica (other than ``exclude``) leads; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.leader()
            if found is not None and found[0].node_id != exclude:
                return found[0]
            time.sleep(0.05)
        raise StackError(f"no leader (other than {exclude}) after {timeout}s")

    def inject(self, fault: str) -> None:
        """Apply one fault by name and heal it, leaving the stack whole again (blocking).

        kill: SIGKILL the leader, restart it once another leads. stop: SIGSTOP the leader
        until another leads (past its lease), then SIGCONT. term: SIGTERM (graceful
        handover), then restart. etcd-member: kill one etcd member, restart it after 3 s.
        etcd-quorum: kill two members for a lease TTL and a half, restart them.
        postgres-restart: fast shutdown, 1.5 s down, start. provider-restart: SIGKILL and
        restart on the same ledger.
        """
        if fault in ("kill", "stop", "term"):
            victim = self.wait_leader()
            if fault == "kill":
                victim.kill()
                self.wait_leader(exclude=victim.node_id)
                victim.start()
                victim.wait_ready()
            elif fault == "stop":
                victim.pause()
                try:
                    self.wait_leader(exclude=victim.node_id)
                finally:
                    victim.resume()
            else:
                victim.signal(signal.SIGTERM)
                self.wait_leader(exclude=victim.node_id)
                victim.terminate()
                victim.start()
                victim.wait_ready()
        elif fault == "etcd-member":
            member = self.etcd.members[0]
            member.kill()
            time.sleep(3)
            member.start()
            self.etcd.wait_healthy()
        elif fault == "etcd-quorum":
            members = self.etcd.members[:2]
            for member in members:
                member.kill()
            time.sleep(3)
            for member in members:
                member.start()
            self.etcd.wait_healthy()
        elif fault == "postgres-restart":
            self.postgres.restart(down_for=1.5)
        elif fault == "provider-restart":
            self.provider.restart()
        else:
            raise ValueError(f"unknown fault {fault!r}")

    def target(self) -> Target:
        """This stack as a scenario target (load through the ingress, faults by inject())."""
        return Target(
            ingress=self.ingress,
            database_url=self.database_url,
            provider_url=self.provider.url,
            node_urls=[node.url for node in self.nodes],
            inject=self.inject,
            api_key=self.api_key,
        )

    def stale_writes_rejected(self) -> int:
        """Sum of fence rejections reported by the replicas that answer."""
        total = 0
        for node in self.nodes:
            view = node.node(timeout=0.5)
            if view is not None:
                total += int(view.get("stale_writes_rejected", 0))
        return total
