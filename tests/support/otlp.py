"""What the tracing tests run in the test process: an OTLP/HTTP trace collector and a
provider proxy that records the headers of each charge request.

Both are real aiohttp servers on 127.0.0.1, each served from its own event loop on a thread
of its own: the cluster helpers (tests/cluster.py) block the test's loop while they poll
replicas, and a replica's exporter must still be answered meanwhile.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from app.stack.ports import free_port

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_SERVER, KIND_CLIENT, KIND_CONSUMER = 2, 3, 5


@dataclass(frozen=True)
class CollectedSpan:
    """One exported span, ids as lower-case hex (``parent`` empty for a root span)."""

    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int  # opentelemetry.proto.trace.v1.Status.StatusCode: 0 unset, 2 error

    @property
    def node(self) -> Any:
        """The replica that made the span (resource ``service.instance.id``)."""
        return self.resource.get("service.instance.id")


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class TraceCollector:
    """Accepts ``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``) and keeps every
    span. Serve it with ``serving(collector.app)``; that URL is the replicas'
    OTEL_EXPORTER_OTLP_ENDPOINT."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[CollectedSpan] = []

    def spans(self) -> list[CollectedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)

    async def export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        received = [
            CollectedSpan(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent=span.parent_span_id.hex(),
                kind=span.kind,
                attributes=_attributes(span.attributes),
                resource=_attributes(resource_spans.resource.attributes),
                status=span.status.code,
            )
            for resource_spans in message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self._spans.extend(received)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/traces", self.export)
        return app


class RecordingProvider:
    """A proxy in front of the stand-in provider: records each charge request's headers,
    and answers 503 (a retryable error: nothing charged) while ``down`` is set."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.down = threading.Event()
        self._lock = threading.Lock()
        self._charges: list[dict[str, str]] = []
        self._http: aiohttp.ClientSession | None = None

    def charge_headers(self) -> list[dict[str, str]]:
        """Headers of every charge request forwarded (not those answered 503)."""
        with self._lock:
            return list(self._charges)

    async def forward(self, request: web.Request) -> web.Response:
        if request.method == "POST" and self.down.is_set():
            return web.json_response({"error": "down for the test"}, status=503)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if request.method == "POST":
            with self._lock:
                self._charges.append(dict(request.headers))
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("idempotency-key", "content-type")
        }
        async with self._http.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            data=await request.read(),
            headers=headers,
            allow_redirects=False,
        ) as answer:
            return web.Response(
                body=await answer.read(),
                status=answer.status,
                content_type=answer.content_type,
            )

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/charges", self.forward)
        app.router.add_route("*", "/v1/charges/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)
        return app


@contextmanager
def serving(make_app: Callable[[], web.Application]) -> Iterator[str]:
    """Serve ``make_app()`` on a free loopback port from a thread with its own event loop;
    yields its base URL, stops and joins the thread afterwards."""
    port = free_port()
    loop = asyncio.new_event_loop()
    runner_ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except BaseException as exc:
            failure.append(exc)
            runner_ready.set()
            raise
        runner_ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    runner_ready.wait(10)
    if failure:
        raise failure[0]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
