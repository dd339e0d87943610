"""Scrape-time metrics of a replica: state already counted elsewhere (election and dispatch
stats, lease validity, loop lag, queue depth) read when Prometheus asks, so each number has
one source of truth."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.dispatch.dispatcher import DispatchStats
from app.leadership.elector import Elector
from app.leadership.keepalive import LoopWatchdog
from app.obs.metrics import gauge, labelled_counter
from app.store.counts import StatusCounts

log = logging.getLogger(__name__)


def refresh_counts(counts: StatusCounts) -> Callable[[], Awaitable[object]]:
    async def refresh() -> object:
        try:
            return await counts.counts()
        except Exception as exc:  # a scrape still answers while Postgres is away
            log.warning("payments-by-status gauge not refreshed: %s", exc)
            return None

    return refresh


def collect_replica(
    elector: Elector, watchdog: LoopWatchdog, dispatch: DispatchStats, counts: StatusCounts
) -> Iterator[Metric]:
    """Scrape-time view of state counted elsewhere (one source of truth per number)."""
    term = elector.acting_term
    yield gauge(
        "paydispatch_is_leader",
        "1 while this replica holds a valid term.",
        1.0 if elector.is_leader else 0.0,
    )
    yield gauge(
        "paydispatch_leader_token",
        "Fencing token of this replica's term (NaN when not leading).",
        term.token if term else None,
    )
    yield gauge(
        "paydispatch_lease_validity_remaining_seconds",
        "Seconds this leader may still act without a confirmed renewal.",
        max(0.0, term.remaining()) if term else None,
    )
    yield gauge(
        "paydispatch_event_loop_lag_seconds",
        "Lateness of the last event-loop beat.",
        watchdog.lag,
    )
    yield labelled_counter(
        "paydispatch_leadership_transitions",
        "Leadership transitions by reason (elected, resigned, lost, fenced, ...).",
        "reason",
        elector.stats.transitions,
    )
    yield CounterMetricFamily(
        "paydispatch_fence_rejections",
        "Writes of this replica rejected by the Postgres fence.",
        value=dispatch.stale_writes_rejected,
    )
    yield CounterMetricFamily(
        "paydispatch_dispatch_retries",
        "Provider calls scheduled for retry.",
        value=dispatch.retries,
    )
    yield CounterMetricFamily(
        "paydispatch_dispatch_recovered",
        "Payments re-queued at takeover.",
        value=dispatch.recovered,
    )
    yield gauge(
        "paydispatch_oldest_unreconciled_seconds",
        "How long the longest-waiting needs_reconciliation payment has waited (NaN: none).",
        counts.oldest_unreconciled(),
    )
    yield gauge(
        "paydispatch_oldest_pending_seconds",
        "Age of the oldest payment accepted but not yet settled (pending or in flight; NaN: none).",
        counts.oldest_pending(),
    )
    cached = counts.cached()
    if cached:
        family = GaugeMetricFamily(
            "paydispatch_payments",
            "Payments by status (cached query, at most a few seconds old).",
            labels=["status"],
        )
        for status, count in sorted(cached.items()):
            family.add_metric([status], count)
        yield family
