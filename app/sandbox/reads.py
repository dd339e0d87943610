"""Read-only endpoints of the provider: the ledger listing, one charge, health and stats."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from app.sandbox.models import (
    DEFAULT_LIST_LIMIT,
    MAX_CURSOR,
    MAX_LIST_LIMIT,
    invalid_request,
    orjson_response,
    parse_int_param,
    parse_text_param,
    problem,
)
from app.sandbox.routing import Answer, Request
from app.sandbox.state import SandboxState


async def list_charges(state: SandboxState, request: Request) -> Answer:
    """``GET /v1/charges?after=&limit=&idempotency_key=&reference=``: the ledger, oldest
    first, keyset-paginated by ``sequence``. Pass ``next_after`` as ``after`` to continue."""
    query = request.query
    limit, errors = parse_int_param(
        query, "limit", default=DEFAULT_LIST_LIMIT, minimum=1, maximum=MAX_LIST_LIMIT
    )
    after, more = parse_int_param(query, "after", default=0, minimum=0, maximum=MAX_CURSOR)
    errors.extend(more)
    key, more = parse_text_param(query, "idempotency_key")
    errors.extend(more)
    reference, more = parse_text_param(query, "reference")
    errors.extend(more)
    if errors:
        return invalid_request(errors)
    page = await state.require_ledger().list_charges(
        after=after, limit=limit, idempotency_key=key, reference=reference
    )
    return orjson_response(
        {
            "data": [charge.to_json() for charge in page.charges],
            "has_more": page.has_more,
            # An empty page keeps the cursor, so a poller can simply call again later.
            "next_after": page.charges[-1].sequence if page.charges else after,
        }
    )


async def get_charge(state: SandboxState, request: Request) -> Answer:
    """``GET /v1/charges/{id}``: one charge, or 404."""
    charge_id, errors = parse_text_param(request.path_params, "id")
    charge = await state.require_ledger().get_charge(charge_id) if charge_id else None
    if charge is None or errors:
        return problem(404, "no-such-charge", "No such charge", f"No charge has id {charge_id!r}.")
    return orjson_response(charge.to_json())


async def healthz(state: SandboxState, request: Request) -> Answer:
    """``GET /healthz``: 200 once the ledger is open and the port is bound."""
    state.require_ledger()
    return orjson_response({"status": "ok"})


async def stats(state: SandboxState, request: Request) -> Answer:
    """``GET /v1/stats``: durable ledger counts plus counters since start."""
    counts = await state.require_ledger().counts()
    s = state.stats
    return orjson_response(
        {
            "charges": counts.succeeded + counts.declined,
            "succeeded": counts.succeeded,
            "declines": counts.declined,
            "last_sequence": counts.last_sequence,
            "processing": len(state.processing),
            "key_retention_hours": state.settings.key_retention_hours,
            "started_at": state.started_at,
            "since_start": {
                "requests": s.requests,
                "charges_created": s.charges_created,
                "declines_created": s.declines_created,
                "replays": s.replays,
                "concurrent_conflicts": s.concurrent_conflicts,
                "param_mismatches": s.param_mismatches,
                "invalid_requests": s.invalid_requests,
            },
            "faults": {kind: s.faults[kind] for kind in ("error", "timeout", "conflict", "drop")},
        }
    )


async def metrics(state: SandboxState, request: Request) -> Answer:
    """``GET /metrics``: the provider's own Prometheus counters since start."""
    s = state.stats
    families = [
        CounterMetricFamily(
            "paydispatch_sandbox_requests", "Charge requests received.", value=s.requests
        ),
        CounterMetricFamily(
            "paydispatch_sandbox_charges", "New charges by result.", labels=["status"]
        ),
        CounterMetricFamily(
            "paydispatch_sandbox_replays", "Responses replayed for a key.", value=s.replays
        ),
        CounterMetricFamily(
            "paydispatch_sandbox_conflicts",
            "409s: same key still in progress.",
            value=s.concurrent_conflicts,
        ),
        CounterMetricFamily(
            "paydispatch_sandbox_faults", "Faults injected by kind.", labels=["kind"]
        ),
    ]
    families[1].add_metric(["succeeded"], s.charges_created - s.declines_created)
    families[1].add_metric(["declined"], s.declines_created)
    for kind in ("error", "timeout", "conflict", "drop"):
        families[4].add_metric([kind], s.faults[kind])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return Answer(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
