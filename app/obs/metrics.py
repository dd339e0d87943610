"""Prometheus metrics. One registry per application (no process-global state): event-time
instruments (histograms, counters) live on ``Metrics``; everything that is already counted
elsewhere (election and dispatch stats, lease validity, loop lag, queue depth) is read at
scrape time by a collector, so there is one source of truth for each number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The instruments one replica (or the provider sandbox) observes as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "paydispatch_http_requests",
            "HTTP requests answered, by route template.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "paydispatch_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provider_latency = Histogram(
            "paydispatch_provider_call_duration_seconds",
            "Provider call latency.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provider_calls = Counter(
            "paydispatch_provider_calls",
            "Provider calls by outcome (succeeded, declined, failed, retry, unknown).",
            ["outcome"],
            registry=self.registry,
        )
        self.concurrency_limit = Gauge(
            "paydispatch_dispatch_concurrency_limit",
            "Payments the leader may keep in flight now (ramping up at a term's start; "
            "0 when not leading).",
            registry=self.registry,
        )
        self.batch_sizes = Histogram(
            "paydispatch_dispatch_batch_size",
            "Payments per claimed batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a scrape-time collector."""
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> list[Metric]:
        return []  # families are only known at scrape time


def gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    """An unlabelled gauge family (NaN when the value is unknown)."""
    return GaugeMetricFamily(name, documentation, value=float("nan") if value is None else value)


def labelled_counter(
    name: str, documentation: str, label: str, values: dict[str, int]
) -> CounterMetricFamily:
    """A counter family with one label."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def http_metrics_middleware(metrics: Metrics) -> Middleware:
    """Count and time every request by *route template* (never the raw path: ids in paths
    would make unbounded label sets)."""
    # The labelled children, made once per label set: ``labels()`` takes a lock and builds
    # a key on every call, which showed up on the ingest profile. Bounded like the label
    # sets themselves (route templates x methods x statuses).
    counters: dict[tuple[str, str, int], Counter] = {}
    timers: dict[tuple[str, str], Histogram] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = request.match_info.route.resource
            template = route.canonical if route is not None else "unmatched"
            method = request.method
            counter = counters.get((template, method, status))
            if counter is None:
                counter = metrics.http_requests.labels(template, method, str(status))
                counters[template, method, status] = counter
            timer = timers.get((template, method))
            if timer is None:
                timer = timers[template, method] = metrics.http_latency.labels(template, method)
            counter.inc()
            timer.observe(time.perf_counter() - started)

    return middleware
