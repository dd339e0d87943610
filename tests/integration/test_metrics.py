"""Prometheus /metrics on replicas and on the provider sandbox, scraped from real processes."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.ops.client import http_json
from app.stack.etcd import EtcdCluster
from app.stack.sandbox_process import SandboxProcess
from load.checker import wait_until_settled
from load.loadgen import post_payments
from tests.cluster import TEST_API_KEY, cluster_env, running_replicas

pytestmark = pytest.mark.chaos


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics endpoint (no auth needed)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_replicas_and_provider_export_the_promised_metrics(
    database_url: str, etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> None:
    env = cluster_env(database_url, etcd.endpoints_csv, PAYDISPATCH_PROVIDER_URL=provider.base_url)
    with running_replicas(2, env, tmp_path) as replicas:
        leader_view = replicas.wait_leader()
        leader = replicas.by_id(leader_view["node_id"])
        follower = next(r for r in replicas.all if r is not leader)
        load = await post_payments([leader.url, follower.url], 40, api_key=TEST_API_KEY)
        assert await wait_until_settled(database_url, 30)
        some_id = next(iter(load.acknowledged.values()))
        assert http_json(f"{follower.url}/v1/payments/{some_id}", api_key=TEST_API_KEY)[0] == 200

        led, followed = scrape(leader.url), scrape(follower.url)
    assert value(led, "paydispatch_is_leader") == 1
    assert value(followed, "paydispatch_is_leader") == 0
    assert value(led, "paydispatch_leader_token") == leader_view["token"]
    assert 0 < value(led, "paydispatch_lease_validity_remaining_seconds") <= 2
    assert value(led, "paydispatch_event_loop_lag_seconds") >= 0
    assert value(led, "paydispatch_leadership_transitions_total", reason="elected") == 1
    assert value(led, "paydispatch_provider_calls_total", outcome="succeeded") == 40
    assert value(led, "paydispatch_provider_call_duration_seconds_count") == 40
    assert value(led, "paydispatch_dispatch_batch_size_count") >= 1
    assert value(led, "paydispatch_fence_rejections_total") == 0
    assert value(led, "paydispatch_dispatch_retries_total") == 0
    assert value(followed, "paydispatch_payments", status="succeeded") == 40
    # Route templates, never raw paths with ids in them.
    assert (
        value(
            followed,
            "paydispatch_http_requests_total",
            route="/v1/payments/{id}",
            method="GET",
            status="200",
        )
        == 1
    )
    assert not any("/v1/payments/" + str(some_id) in str(labels) for _, labels in followed)
    assert (
        value(
            followed,
            "paydispatch_http_request_duration_seconds_count",
            route="/v1/payments",
            method="POST",
        )
        >= 1
    )

    sandbox = scrape(provider.base_url)
    assert value(sandbox, "paydispatch_sandbox_charges_total", status="succeeded") == 40
    assert value(sandbox, "paydispatch_sandbox_faults_total", kind="error") == 0
