"""OpenTelemetry traces: one trace from a payment's ingest to its charge, across replicas
and leader changes.

Spans (names and attributes are a contract: the README lists them, dashboards query them):

- ``POST /v1/payments`` (server), on the replica that took the request; it continues the
  client's W3C ``traceparent`` when that parses, and its own context is stored on the
  payment (``payments.trace_parent``, revision 0005).
- ``dispatch attempt`` (consumer: the payment is a queued message), one per provider call,
  on the leader; its parent is the stored ingest context, read back by the claim. The
  context lives in Postgres, so a payment charged by another leader after a failover is in
  the same trace; a payment stored without one gets a root span.
- ``POST /v1/charges`` (client), the provider call inside an attempt; its ``traceparent``
  goes to the provider in the request headers.

Every span carries ``paydispatch.node_id``; the leader's also ``paydispatch.fencing_token``,
``paydispatch.payment_id`` and ``paydispatch.attempt``, and once known
``paydispatch.outcome`` and ``paydispatch.status``.

Off unless the standard ``OTEL_*`` variables ask for it (``tracing_config``). Off costs
nothing: this module imports no OpenTelemetry code at import time (the SDK and the exporter
are ~4 MB per replica), no span object is made, and the hot paths check one ``None``. On,
spans go to an OTLP/HTTP collector through a BatchSpanProcessor (a thread of its own: the
event loop never waits for an export).

Only ``tracing_config`` reads the variables that decide whether tracing is on; where spans
go and how they are batched (``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``), how they are sampled
(``OTEL_TRACES_SAMPLER``) and extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES``) are
read by the SDK itself, exactly as its documentation says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.domain.payment import Outcome
from app.domain.states import PaymentStatus
from app.errors import ConfigurationError

if TYPE_CHECKING:  # imported for real only once tracing is on (start_tracing)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

SERVICE_NAME = "paydispatch"
# The only protocol the bundled exporter speaks.
PROTOCOL = "http/protobuf"
# The longest traceparent header looked at (W3C version 00 is 55 characters; later versions
# may append fields). Longer ones start a new trace.
MAX_HEADER = 512
# Outcomes of an attempt that settle nothing: its span is marked as an error.
_UNSETTLED = frozenset({"retry", "unknown", "mismatch", "failed"})


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Tracing is on, with these settings (the exporter's own come from ``OTEL_*``)."""

    service_name: str
    node_id: str


def tracing_config(environ: Mapping[str, str], *, node_id: str) -> TracingConfig | None:
    """Whether the standard variables in ``environ`` turn tracing on, and with what.

    On when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); never when
    ``OTEL_SDK_DISABLED=true`` or the exporter is ``none``. A setting this build cannot
    honour (another exporter, another OTLP protocol) is a ConfigurationError, not silence.
    Pure: reads only ``environ``.
    """

    def value(name: str) -> str:
        return environ.get(name, "").strip()

    if value("OTEL_SDK_DISABLED").lower() == "true":
        return None
    exporters = {
        name.strip().lower() for name in value("OTEL_TRACES_EXPORTER").split(",") if name.strip()
    }
    if "none" in exporters:
        return None
    if exporters - {"otlp"}:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={value('OTEL_TRACES_EXPORTER')!r}: paydispatch exports "
            "traces with otlp only (or none)"
        )
    endpoint = value("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or value("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporters and not endpoint:
        return None  # the default: off (the SDK's own default, otlp, is not ours)
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = value(name)
        if protocol:
            if protocol != PROTOCOL:
                raise ConfigurationError(
                    f"{name}={protocol!r}: paydispatch's exporter speaks {PROTOCOL} only "
                    "(the collector's OTLP/HTTP port, usually 4318)"
                )
            break  # the traces-specific variable wins over the general one
    return TracingConfig(
        service_name=value("OTEL_SERVICE_NAME") or SERVICE_NAME,
        node_id=node_id,
    )


def start_tracing(config: TracingConfig) -> Tracing:
    """Build the tracer provider, its OTLP exporter and batch processor (the SDK and the
    exporter are imported here, and only here). The owner calls ``Tracing.shutdown``."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {"service.name": config.service_name, "service.instance.id": config.node_id}
    )
    # No atexit hook: the replica shuts the provider down itself, off the event loop.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, config.node_id)


def format_traceparent(span: Span) -> str | None:
    """The W3C ``traceparent`` of ``span``'s context (version 00), or None if invalid.

    Made from the parsed context, never copied from a header: what is stored is always the
    55-character form revision 0005's CHECK admits."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


class Tracing:
    """A replica's tracer (built by ``start_tracing``). Handlers and the dispatcher hold
    ``Tracing | None``; None means off."""

    def __init__(self, provider: TracerProvider, node_id: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("paydispatch")
        # W3C trace context only, as an instance: the global propagator is configured by
        # OTEL_PROPAGATORS, which could add formats we never store.
        self._propagator = TraceContextTextMapPropagator()
        self.node_id = node_id

    @contextmanager
    def ingest(self, headers: Mapping[str, str]) -> Iterator[IngestTrace]:
        """The server span of one POST /v1/payments, continuing the client's
        ``traceparent`` if it parses (a malformed or oversized one starts a new trace)."""
        from opentelemetry.trace import SpanKind

        # An oversized header is dropped here, quietly: the propagator would log a warning
        # for each one, and the header is the client's to fill.
        traceparent = headers.get("traceparent")
        carrier = headers if traceparent is None or len(traceparent) <= MAX_HEADER else {}
        parent = self._propagator.extract(carrier)
        with (
            self._tracer.start_as_current_span(
                "POST /v1/payments",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": "POST",
                    "http.route": "/v1/payments",
                    "paydispatch.node_id": self.node_id,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _ended_by(span, server=True),
        ):
            yield IngestTrace(span)

    @contextmanager
    def attempt(
        self, *, payment_id: int, trace_parent: str | None, token: int, attempt: int
    ) -> Iterator[AttemptTrace]:
        """The span of one dispatch attempt, child of the payment's stored ingest context
        (``trace_parent``; a root span without one)."""
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        # A fresh Context either way: never whatever the calling task had current.
        parent = (
            self._propagator.extract({"traceparent": trace_parent}) if trace_parent else Context()
        )
        with (
            self._tracer.start_as_current_span(
                "dispatch attempt",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={
                    "paydispatch.payment_id": payment_id,
                    "paydispatch.fencing_token": token,
                    "paydispatch.node_id": self.node_id,
                    "paydispatch.attempt": attempt,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _ended_by(span, server=False),
        ):
            yield AttemptTrace(self, span)

    async def shutdown(self) -> None:
        """Export what is buffered and stop the batch thread. In a worker thread: the flush
        is blocking HTTP (bounded by the exporter's timeout), never on the event loop."""
        await asyncio.to_thread(self._provider.shutdown)


class IngestTrace:
    """The ingest span, as the handler sees it."""

    __slots__ = ("_span", "trace_parent")

    def __init__(self, span: Span) -> None:
        self._span = span
        # What the payment row stores for the leader's spans.
        self.trace_parent = format_traceparent(span)

    def answered(self, payment_id: int, created: bool, status: int) -> None:
        """The payment this request created (or replayed) and the HTTP status answered."""
        self._span.set_attributes(
            {
                "paydispatch.payment_id": payment_id,
                "paydispatch.replayed": not created,
                "http.response.status_code": status,
            }
        )


class AttemptTrace:
    """A dispatch attempt's span, as the dispatcher sees it."""

    __slots__ = ("_span", "_tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self._span = span

    @contextmanager
    def provider_call(self, url: str) -> Iterator[ProviderCallTrace]:
        """The client span of the provider call, child of this attempt."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        with (
            self._tracing._tracer.start_as_current_span(
                "POST /v1/charges",
                context=set_span_in_context(self._span),
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": "POST",
                    "url.full": url,
                    "paydispatch.node_id": self._tracing.node_id,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _ended_by(span, server=False),
        ):
            yield ProviderCallTrace(span)

    def settled(self, outcome: Outcome | None) -> None:
        """What the attempt led to; None: it was abandoned (the term ended before the call)."""
        from opentelemetry.trace import StatusCode

        if outcome is None:
            self._span.set_attribute("paydispatch.outcome", "abandoned")
            return
        self._span.set_attributes(
            {
                "paydispatch.outcome": outcome.attempt_outcome,
                "paydispatch.status": outcome.status.value,
            }
        )
        if outcome.attempt_outcome in _UNSETTLED or outcome.status in (
            PaymentStatus.NEEDS_RECONCILIATION,
            PaymentStatus.FAILED,
        ):
            self._span.set_status(StatusCode.ERROR, outcome.error or outcome.attempt_outcome)


class ProviderCallTrace:
    """The provider call's span: its ``traceparent`` for the request headers."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, span: Span) -> None:
        self._span = span
        self.traceparent = format_traceparent(span)

    def answered(self, status: int | None) -> None:
        """The HTTP status the provider answered with."""
        if status is not None:
            self._span.set_attribute("http.response.status_code", status)


@contextmanager
def _ended_by(span: Span, *, server: bool) -> Iterator[None]:
    """Record an exception leaving ``span``: its type, the HTTP status it carries (our
    errors and aiohttp's have ``status``), and an error status — except, on a server span,
    for a client's 4xx (a refused request is the server working, not failing)."""
    from opentelemetry.trace import StatusCode

    try:
        yield
    except BaseException as exc:
        status = getattr(exc, "status", None)
        span.set_attribute("error.type", type(exc).__qualname__)
        if isinstance(status, int):
            span.set_attribute("http.response.status_code", status)
        if not (server and isinstance(status, int) and 400 <= status < 500):
            span.set_status(StatusCode.ERROR, str(exc)[:200] or type(exc).__qualname__)
        raise
