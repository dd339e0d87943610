"""Tracing: when the standard OTEL_* variables turn it on, and what the spans say.

The decision is a pure function of the environment. The spans are checked with the SDK's
in-memory exporter on a tracer provider built here (no exporter thread, no socket).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.domain.payment import Outcome
from app.domain.states import PaymentStatus
from app.errors import ConfigurationError, UnknownOutcome
from app.obs.tracing import SERVICE_NAME, Tracing, TracingConfig, tracing_config

ENDPOINT = "http://collector:4318"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


def config(**environ: str) -> TracingConfig | None:
    return tracing_config(environ, node_id="node-a")


# --- the decision -----------------------------------------------------------------------


def test_tracing_is_off_without_otel_variables() -> None:
    assert config() is None
    assert config(OTEL_SERVICE_NAME="shop", OTEL_BSP_SCHEDULE_DELAY="100") is None


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": " OTLP "},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"},
    ],
)
def test_an_otlp_exporter_or_endpoint_turns_tracing_on(environ: dict[str, str]) -> None:
    assert tracing_config(environ, node_id="node-a") == TracingConfig(SERVICE_NAME, "node-a")


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "otlp,none"},
    ],
)
def test_disabling_variables_always_win(environ: dict[str, str]) -> None:
    assert tracing_config(environ, node_id="node-a") is None


def test_the_service_name_defaults_to_paydispatch_and_otel_service_name_overrides() -> None:
    assert config(OTEL_TRACES_EXPORTER="otlp") == TracingConfig("paydispatch", "node-a")
    on = config(OTEL_TRACES_EXPORTER="otlp", OTEL_SERVICE_NAME="payments-eu")
    assert on == TracingConfig("payments-eu", "node-a")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
            },
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_a_setting_this_build_cannot_honour_is_refused_by_name(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        tracing_config(environ, node_id="node-a")


def test_a_traces_specific_protocol_overrides_the_general_one() -> None:
    environ = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",  # for metrics and logs, say
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert tracing_config(environ, node_id="n") == TracingConfig(SERVICE_NAME, "n")


# --- the spans --------------------------------------------------------------------------


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exported: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider(resource=Resource({"service.name": "t"}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return Tracing(provider, "node-a")


def only(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (span,) = [span for span in spans if span.name == name]
    return span


def outcome(attempt_outcome: str, status: PaymentStatus, error: str | None = None) -> Outcome:
    now = datetime.now(UTC)
    return Outcome(7, 1, status, attempt_outcome, None, error, 200, 0.0, now, now)


def test_ingest_continues_the_clients_trace_and_stores_its_own_context(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    with tracing.ingest({"traceparent": CLIENT_PARENT}) as ingest:
        ingest.answered(7, created=True, status=202)
    span = only(exported.get_finished_spans(), "POST /v1/payments")
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == CLIENT_TRACE
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert ingest.trace_parent == f"00-{CLIENT_TRACE}-{span.context.span_id:016x}-01"
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/payments",
        "paydispatch.node_id": "node-a",
        "paydispatch.payment_id": 7,
        "paydispatch.replayed": False,
        "http.response.status_code": 202,
    }


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        f"00-{CLIENT_TRACE}-b7ad6b7169203331-01-extra",  # version 00 has nothing more
        f"00-{'0' * 32}-b7ad6b7169203331-01",  # invalid all-zero trace id
        f"00-{CLIENT_TRACE.upper()}-b7ad6b7169203331-01",  # upper-case hex
        f"00-{CLIENT_TRACE}-b7ad6b7169203331-01" + " " * 600,  # oversized
        "ff-" + CLIENT_PARENT[3:],  # the forbidden version
        "x" * 8000,
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace_and_is_never_stored(
    tracing: Tracing, exported: InMemorySpanExporter, header: str
) -> None:
    with tracing.ingest({"traceparent": header}) as ingest:
        pass
    span = only(exported.get_finished_spans(), "POST /v1/payments")
    assert span.parent is None
    assert format(span.context.trace_id, "032x") != CLIENT_TRACE
    assert ingest.trace_parent is not None
    context = span.context
    assert ingest.trace_parent == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )


def test_a_refused_request_is_recorded_but_is_no_server_error(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    class Refused(Exception):
        status = 422

    with pytest.raises(Refused), tracing.ingest({}):
        raise Refused("bad body")
    span = only(exported.get_finished_spans(), "POST /v1/payments")
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 422
    assert str(span.attributes["error.type"]).endswith("Refused")
    assert span.status.status_code is StatusCode.UNSET


def test_an_attempt_and_its_provider_call_continue_the_stored_ingest_context(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    with tracing.ingest({}) as ingest:
        pass
    with tracing.attempt(
        payment_id=7, trace_parent=ingest.trace_parent, token=42, attempt=3
    ) as attempt:
        with attempt.provider_call("http://provider/v1/charges") as call:
            call.answered(201)
        attempt.settled(outcome("succeeded", PaymentStatus.SUCCEEDED))
    spans = exported.get_finished_spans()
    ingest_span = only(spans, "POST /v1/payments")
    attempt_span = only(spans, "dispatch attempt")
    call_span = only(spans, "POST /v1/charges")
    assert {s.context.trace_id for s in spans} == {ingest_span.context.trace_id}
    assert attempt_span.parent is not None
    assert call_span.parent is not None
    assert attempt_span.parent.span_id == ingest_span.context.span_id
    assert call_span.parent.span_id == attempt_span.context.span_id
    assert attempt_span.kind is SpanKind.CONSUMER
    assert call_span.kind is SpanKind.CLIENT
    context = call_span.context
    assert call.traceparent == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    assert dict(attempt_span.attributes or {}) == {
        "paydispatch.payment_id": 7,
        "paydispatch.fencing_token": 42,
        "paydispatch.node_id": "node-a",
        "paydispatch.attempt": 3,
        "paydispatch.outcome": "succeeded",
        "paydispatch.status": "succeeded",
    }
    assert attempt_span.status.status_code is StatusCode.UNSET
    assert call_span.attributes is not None
    assert call_span.attributes["http.response.status_code"] == 201


def test_a_payment_stored_without_context_gets_a_root_attempt_span(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    # The ingest span is current in this task while the attempt starts: it must not adopt it.
    with (
        tracing.ingest({"traceparent": CLIENT_PARENT}),
        tracing.attempt(payment_id=7, trace_parent=None, token=1, attempt=1) as attempt,
    ):
        attempt.settled(None)
    attempt_span = only(exported.get_finished_spans(), "dispatch attempt")
    assert attempt_span.parent is None
    assert format(attempt_span.context.trace_id, "032x") != CLIENT_TRACE
    assert attempt_span.attributes is not None
    assert attempt_span.attributes["paydispatch.outcome"] == "abandoned"


def test_an_unsettled_attempt_and_a_failed_provider_call_are_errors(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    with tracing.attempt(payment_id=7, trace_parent=None, token=1, attempt=1) as attempt:
        with pytest.raises(UnknownOutcome), attempt.provider_call("http://p/v1/charges"):
            raise UnknownOutcome("proxy said 403", status=403)
        attempt.settled(outcome("unknown", PaymentStatus.PENDING, "proxy said 403"))
    spans = exported.get_finished_spans()
    call_span = only(spans, "POST /v1/charges")
    attempt_span = only(spans, "dispatch attempt")
    assert call_span.status.status_code is StatusCode.ERROR  # a client span's 4xx is an error
    assert call_span.attributes is not None
    assert call_span.attributes["http.response.status_code"] == 403
    assert call_span.attributes["error.type"] == "UnknownOutcome"
    assert attempt_span.status.status_code is StatusCode.ERROR
    assert attempt_span.status.description == "proxy said 403"
