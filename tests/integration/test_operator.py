"""The operator CLI against real replicas: status, payments list/show/retry/reconcile and
leader resign, every admin action audited; the leader's own reconciliation sweep."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.stack.etcd import EtcdCluster
from app.stack.sandbox_process import SandboxProcess, start_sandbox_process, stop_sandbox_process
from load.loadgen import post_payments
from tests.cluster import (
    TEST_ADMIN_KEY,
    TEST_API_KEY,
    Replicas,
    cluster_env,
    running_replicas,
    wait_for,
)

pytestmark = pytest.mark.chaos


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PAYDISPATCH_URL": url,
        "PAYDISPATCH_API_KEY": TEST_API_KEY,
        "PAYDISPATCH_ADMIN_API_KEY": TEST_ADMIN_KEY,
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli_json(url: str, *args: str) -> Any:
    result = cli(url, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def statuses(database_url: str) -> dict[int, str]:
    conn = await asyncpg.connect(database_url)
    try:
        return dict(await conn.fetch("SELECT id, status FROM payments"))
    finally:
        await conn.close()


async def audit_rows(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM admin_actions ORDER BY id")]
    finally:
        await conn.close()


@pytest.fixture
async def dropping_provider(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    """Charges are made but every response is lost: with one attempt allowed, payments end
    in needs_reconciliation although the provider charged them."""
    sandbox = await start_sandbox_process(tmp_path, drop_rate=1.0)
    try:
        yield sandbox
    finally:
        await stop_sandbox_process(sandbox.process)


@pytest.fixture
def replicas(
    database_url: str, etcd: EtcdCluster, dropping_provider: SandboxProcess, tmp_path: Path
) -> Iterator[Replicas]:
    env = cluster_env(
        database_url,
        etcd.endpoints_csv,
        PAYDISPATCH_PROVIDER_URL=dropping_provider.base_url,
        PAYDISPATCH_MAX_ATTEMPTS="1",
        PAYDISPATCH_PROVIDER_TIMEOUT="1",
        PAYDISPATCH_RECONCILE_INTERVAL="3600",
    )
    with running_replicas(3, env, tmp_path / "r") as group:
        yield group


def test_operator_cli_end_to_end(replicas: Replicas, database_url: str) -> None:
    leader = replicas.wait_leader()
    url = replicas.all[0].url
    load = asyncio.run(post_payments([url], 3, api_key=TEST_API_KEY))
    ids = sorted(load.acknowledged.values())
    wait_for(
        lambda: set(asyncio.run(statuses(database_url)).values()) == {"needs_reconciliation"},
        20,
        what="payments to need reconciliation",
    )

    status = cli_json(url, "status")
    assert status["leader"]["node_id"] == leader["node_id"]
    assert len(status["replicas"]) == 3
    assert status["queue"]["needs_reconciliation"] == 3
    human = cli(url, "status")
    assert human.returncode == 0
    assert leader["node_id"] in human.stdout
    assert "needs_reconciliation 3" in human.stdout

    listed = cli_json(url, "payments", "list", "--status", "needs_reconciliation")
    assert [p["id"] for p in listed["data"]] == ids
    shown = cli_json(url, "payments", "show", str(ids[0]))
    assert shown["status"] == "needs_reconciliation"

    # Reconcile settles from the ledger: the charge was made, only its response was lost.
    settled = cli_json(url, "payments", "reconcile", str(ids[0]))
    assert settled["status"] == "succeeded"
    assert settled["provider_charge_id"].startswith("ch_")
    # A terminal payment can be neither retried nor reconciled.
    refused = cli(url, "payments", "retry", str(ids[0]))
    assert refused.returncode == 1
    assert "only pending and needs_reconciliation" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Retry re-sends with the same key: the provider replays the original charge.
    assert cli_json(url, "payments", "retry", str(ids[1]))["previous"] == "needs_reconciliation"
    wait_for(
        lambda: asyncio.run(statuses(database_url))[ids[1]] == "succeeded",
        20,
        what="the retried payment to succeed",
    )

    # A plain API key is not enough for admin actions.
    env_key_only = cli(url, "payments", "retry", str(ids[2]), "--admin-key", TEST_API_KEY)
    assert env_key_only.returncode == 1
    assert "403" in env_key_only.stderr

    # The leader may be another replica than --url: its address comes from etcd, so the
    # admin key goes there only with --yes (or a confirmation at the prompt).
    resigned = cli_json(url, "leader", "resign", "--yes")
    assert resigned["node_id"] == leader["node_id"]
    assert resigned["handed_over_token"] == leader["token"]
    assert resigned["new_leader"]["node_id"] != leader["node_id"]
    assert resigned["new_leader"]["token"] > leader["token"]
    # The old leader stays up, as a follower.
    assert replicas.by_id(leader["node_id"]).node() is not None

    rows = asyncio.run(audit_rows(database_url))
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("reconcile", "succeeded"),
        ("retry", "refused"),
        ("retry", "requeued"),
        ("leader_resign", "handed_over"),
    ]
    assert all(r["actor"].startswith("key:") for r in rows)
    assert all(TEST_ADMIN_KEY not in json.dumps(r, default=str) for r in rows)
