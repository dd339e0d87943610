"""OpenTelemetry traces across real replicas: a payment's ingest on one replica and its
charge on the leader are one trace, also when another leader charges it after a failover.

The issue asks for an in-memory exporter; the replicas are separate processes, so the honest
equivalent is a real OTLP/HTTP collector in the test process (tests/support/otlp.py) that
the replicas' ordinary exporter sends to, configured by the standard OTEL_* variables only,
with a short OTEL_BSP_SCHEDULE_DELAY. A proxy in front of the stand-in provider records
the traceparent each charge request carried, and plays a provider outage on demand.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.ops.client import http_json
from app.stack.etcd import EtcdCluster
from app.stack.replica import ReplicaProcess
from app.stack.sandbox_process import SandboxProcess
from tests.cluster import TEST_API_KEY, Replicas, cluster_env, running_replicas, wait_for
from tests.support.otlp import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_SERVER,
    CollectedSpan,
    RecordingProvider,
    TraceCollector,
    serving,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
STATUS_ERROR = 2


@dataclass(frozen=True)
class Traced:
    """What a tracing test arranges: the replicas' environment (traces on, exported to
    ``spans`` every 100 ms; charges through ``provider``), the collector and the proxy."""

    env: dict[str, str]
    spans: TraceCollector
    provider: RecordingProvider


@pytest.fixture
def traced(
    database_url: str,
    etcd: EtcdCluster,
    provider: SandboxProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Traced]:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)  # replicas inherit ours: only what the test sets counts
    spans = TraceCollector()
    recording = RecordingProvider(provider.base_url)
    with serving(spans.app) as collector_url, serving(recording.app) as provider_url:
        env = cluster_env(
            database_url,
            etcd.endpoints_csv,
            PAYDISPATCH_PROVIDER_URL=provider_url,
            PAYDISPATCH_RETRY_MAX_DELAY="0.5",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector_url,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        yield Traced(env, spans, recording)


def post_payment(url: str, traceparent: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST /v1/payments with a fresh Idempotency-Key (and the given traceparent header)."""
    headers = {
        "Authorization": f"Bearer {TEST_API_KEY}",
        "Content-Type": "application/json",
        "Idempotency-Key": uuid.uuid4().hex,
    }
    if traceparent is not None:
        headers["traceparent"] = traceparent
    body = json.dumps({"amount": 1250, "currency": "EUR"}).encode()
    request = urllib.request.Request(
        f"{url}/v1/payments", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_status(replica: ReplicaProcess, payment_id: int, status: str, timeout: float = 20) -> None:
    wait_for(
        lambda: (
            http_json(f"{replica.url}/v1/payments/{payment_id}", api_key=TEST_API_KEY)[1].get(
                "status"
            )
            == status
        ),
        timeout,
        interval=0.1,
        what=f"payment {payment_id} {status}",
    )


Found = dict[str, list[CollectedSpan]]


def spans_of(
    collector: TraceCollector,
    payment_id: int,
    *,
    expect: dict[str, int] | None = None,
    until: Callable[[Found], bool] = lambda found: True,
    timeout: float = 10,
) -> Found:
    """The payment's spans by name, once at least ``expect[name]`` of each have arrived and
    ``until`` holds: its ingest and attempt spans carry its id; provider calls are children
    of its attempts."""

    def probe() -> Found | None:
        spans = collector.spans()
        own = [s for s in spans if s.attributes.get("paydispatch.payment_id") == payment_id]
        attempts = {s.span_id for s in own if s.name == "dispatch attempt"}
        calls = [s for s in spans if s.name == "POST /v1/charges" and s.parent in attempts]
        found: Found = {}
        for span in [*own, *calls]:
            found.setdefault(span.name, []).append(span)
        enough = all(len(found.get(name, [])) >= n for name, n in (expect or {}).items())
        return found if enough and until(found) else None

    return wait_for(probe, timeout, interval=0.1, what=f"spans of payment {payment_id}")


def leader_and_follower(
    replicas: Replicas,
) -> tuple[dict[str, Any], ReplicaProcess, ReplicaProcess]:
    """Once two replicas run: the leader's /v1/node view, the leader, the other one."""
    view = replicas.wait_leader()
    leader = replicas.by_id(view["node_id"])
    return view, leader, next(r for r in replicas.all if r is not leader)


ALL_THREE = {"POST /v1/payments": 1, "dispatch attempt": 1, "POST /v1/charges": 1}


async def test_a_payment_ingested_on_a_follower_and_charged_by_the_leader_is_one_trace(
    traced: Traced, tmp_path: Path
) -> None:
    spans, recording = traced.spans, traced.provider
    with running_replicas(2, traced.env, tmp_path) as replicas:
        leader_view, leader, follower = leader_and_follower(replicas)

        status, payment = post_payment(follower.url, CLIENT_PARENT)
        assert status == 202
        wait_status(follower, payment["id"], "succeeded")
        found = spans_of(spans, payment["id"], expect=ALL_THREE)

    (ingest,) = found["POST /v1/payments"]
    (attempt,) = found["dispatch attempt"]
    (call,) = found["POST /v1/charges"]
    # One trace: the client's, continued on the follower, charged on the leader.
    assert {ingest.trace_id, attempt.trace_id, call.trace_id} == {CLIENT_TRACE}
    assert ingest.parent == CLIENT_SPAN
    assert attempt.parent == ingest.span_id
    assert call.parent == attempt.span_id
    assert (ingest.kind, attempt.kind, call.kind) == (KIND_SERVER, KIND_CONSUMER, KIND_CLIENT)
    assert ingest.node == follower.node_id
    assert attempt.node == call.node == leader.node_id
    assert ingest.resource["service.name"] == "paydispatch"
    assert ingest.attributes["paydispatch.node_id"] == follower.node_id
    assert ingest.attributes["http.response.status_code"] == 202
    assert attempt.attributes == {
        "paydispatch.payment_id": payment["id"],
        "paydispatch.fencing_token": leader_view["token"],
        "paydispatch.node_id": leader.node_id,
        "paydispatch.attempt": 1,
        "paydispatch.outcome": "succeeded",
        "paydispatch.status": "succeeded",
    }
    assert call.attributes["http.response.status_code"] in (200, 201)
    # The provider was told which span called it.
    sent = [h.get("traceparent", "") for h in recording.charge_headers()]
    assert any(value.startswith(f"00-{CLIENT_TRACE}-{call.span_id}-") for value in sent)


async def test_a_malformed_traceparent_is_accepted_and_starts_a_fresh_trace(
    database_url: str, traced: Traced, tmp_path: Path
) -> None:
    spans = traced.spans
    plain_env = {name: value for name, value in traced.env.items() if not name.startswith("OTEL_")}
    with running_replicas(2, traced.env, tmp_path) as replicas:
        _, _, follower = leader_and_follower(replicas)
        # Started once a traced replica leads, so that it stays a follower.
        plain = ReplicaProcess(node_id="node-plain", env=plain_env, log_dir=tmp_path)
        try:
            plain.start()
            plain.wait_ready()
            malformed = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-and-then-some" + "x" * 3000
            status, odd = post_payment(follower.url, malformed)
            assert status == 202
            status, untraced = post_payment(plain.url, CLIENT_PARENT)
            assert status == 202
            wait_status(follower, odd["id"], "succeeded")
            wait_status(follower, untraced["id"], "succeeded")
            odd_spans = spans_of(
                spans, odd["id"], expect={"POST /v1/payments": 1, "dispatch attempt": 1}
            )
            untraced_spans = spans_of(spans, untraced["id"], expect={"dispatch attempt": 1})
        finally:
            plain.terminate()

    # The malformed header: accepted, not continued, not stored; a new trace all the same.
    (ingest,) = odd_spans["POST /v1/payments"]
    (attempt,) = odd_spans["dispatch attempt"]
    assert ingest.parent == ""
    assert ingest.trace_id != CLIENT_TRACE
    assert attempt.trace_id == ingest.trace_id
    assert attempt.parent == ingest.span_id
    # Tracing off by default: the replica without OTEL_* sent nothing and stored nothing;
    # the leader's attempt for its payment is a root span of a trace of its own.
    assert [s for s in spans.spans() if s.node == "node-plain"] == []
    assert "POST /v1/payments" not in untraced_spans
    (root,) = untraced_spans["dispatch attempt"]
    assert root.parent == ""
    assert root.trace_id != CLIENT_TRACE
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, trace_parent FROM payments WHERE id = ANY($1::bigint[]) ORDER BY id",
            [odd["id"], untraced["id"]],
        )
    finally:
        await conn.close()
    stored = {row["id"]: row["trace_parent"] for row in rows}
    assert stored[untraced["id"]] is None
    assert stored[odd["id"]] == f"00-{ingest.trace_id}-{ingest.span_id}-{stored[odd['id']][-2:]}"


@pytest.mark.chaos
async def test_the_next_leader_charges_a_payment_under_the_trace_of_its_ingest(
    traced: Traced, tmp_path: Path
) -> None:
    spans, recording = traced.spans, traced.provider
    with running_replicas(2, traced.env, tmp_path) as replicas:
        first_view, first, second = leader_and_follower(replicas)
        # The provider fails (503, nothing charged): the first leader's attempts only retry.
        recording.down.set()
        status, payment = post_payment(first.url, CLIENT_PARENT)
        assert status == 202
        spans_of(spans, payment["id"], expect={"POST /v1/payments": 1, "dispatch attempt": 1})
        # SIGTERM: the leader hands over, and flushes its spans on the way out.
        first.terminate()
        second_view = replicas.wait_leader([second], above=first_view["token"])
        recording.down.clear()
        wait_status(second, payment["id"], "succeeded")
        found = spans_of(
            spans,
            payment["id"],
            expect=ALL_THREE,
            # The successful attempt by the second leader and its call (the second leader
            # may also have called while the provider was still down: a retry).
            until=lambda found: succeeded_call_of(found, second.node_id),
        )

    (ingest,) = found["POST /v1/payments"]
    attempts = found["dispatch attempt"]
    assert ingest.node == first.node_id
    assert {s.trace_id for s in [ingest, *attempts, *found["POST /v1/charges"]]} == {CLIENT_TRACE}
    assert {a.parent for a in attempts} == {ingest.span_id}
    by_first = [a for a in attempts if a.node == first.node_id]
    by_second = [a for a in attempts if a.node == second.node_id]
    assert by_first
    assert by_second
    assert all(a.attributes["paydispatch.fencing_token"] == first_view["token"] for a in by_first)
    assert all(a.attributes["paydispatch.outcome"] == "retry" for a in by_first)
    assert all(a.status == STATUS_ERROR for a in by_first)
    (charged,) = [a for a in by_second if a.attributes["paydispatch.outcome"] == "succeeded"]
    assert charged.attributes["paydispatch.fencing_token"] == second_view["token"]
    assert charged.attributes["paydispatch.node_id"] == second.node_id
    assert charged.attributes["paydispatch.attempt"] > max(
        a.attributes["paydispatch.attempt"] for a in by_first
    )
    # Every provider call is its attempt's child; the charge is the successful attempt's.
    calls = found["POST /v1/charges"]
    assert {c.parent for c in calls} <= {a.span_id for a in attempts}
    (charge,) = [c for c in calls if c.parent == charged.span_id]
    assert charge.attributes["http.response.status_code"] in (200, 201)
    assert charge.node == second.node_id


def succeeded_call_of(found: Found, node_id: str) -> bool:
    """True once ``node_id``'s successful attempt and its provider call have both arrived."""
    attempts = [
        a
        for a in found.get("dispatch attempt", [])
        if a.node == node_id and a.attributes.get("paydispatch.outcome") == "succeeded"
    ]
    calls = {c.parent for c in found.get("POST /v1/charges", [])}
    return any(a.span_id in calls for a in attempts)
