"""Cluster routes: who leads, every campaigning replica, this replica's own view."""

from __future__ import annotations

import logging

from aiohttp import web

from app.web.problems import problem
from app.web.schemas import (
    Cluster,
    Node,
    QueueDepth,
    Replica,
    dispatch_stats_body,
    json_response,
    leader_body,
)
from app.web.state import (
    DISPATCH_STATS,
    ELECTOR,
    FAILOVER_STATS,
    OBSERVER,
    SETTINGS,
    STATUS_COUNTS,
    WATCHDOG,
)

log = logging.getLogger(__name__)


async def get_leader(request: web.Request) -> web.Response:
    """GET /v1/leader — the leader as this replica observes it; 503 while there is none, and
    503 "Leader unknown" while etcd has not confirmed this replica's view for a lease TTL (a
    replica cut off from etcd must not keep naming a leader it can no longer confirm)."""
    view = request.app[OBSERVER].view()
    if not view.confirmed:
        return problem(
            503,
            "Leader unknown",
            f"this replica has not been able to confirm the leader with etcd since "
            f"{view.unknown_since}; ask another replica",
            headers={"Retry-After": "1"},
        )
    if view.leader is None:
        return problem(
            503, "No leader", "no replica holds leadership right now", headers={"Retry-After": "1"}
        )
    return json_response(leader_body(view.leader))


async def get_cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster — the cluster as this replica sees it: leader, every campaigning
    replica, recent leadership changes and queue depth by status."""
    observer = request.app[OBSERVER]
    view = observer.view()
    leader = view.leader
    counts: dict[str, int] | None
    try:
        counts = await request.app[STATUS_COUNTS].counts()
    except Exception as exc:  # the cluster view still answers while Postgres is away
        log.warning("queue depth unavailable: %s", exc)
        counts = None
    return json_response(
        Cluster(
            observed_by=request.app[SETTINGS].node_id,
            leader=leader_body(leader) if leader else None,
            leader_unknown_since=view.unknown_since,
            replicas=[
                Replica(
                    node_id=c.node_id,
                    url=c.url,
                    candidate_revision=c.token,
                    leading=leader is not None and c.token == leader.token,
                )
                for c in view.candidates
            ],
            leadership_changes=[leader_body(change) for change in reversed(observer.changes)],
            queue=QueueDepth.model_validate(counts) if counts is not None else None,
        )
    )


async def get_node(request: web.Request) -> web.Response:
    """GET /v1/node — this replica's own view: role, term, counters, event-loop lag."""
    elector = request.app[ELECTOR]
    watchdog = request.app[WATCHDOG]
    term = elector.acting_term
    observed = request.app[OBSERVER].confirmed_leader()
    counters = request.app[DISPATCH_STATS]
    return json_response(
        Node(
            node_id=request.app[SETTINGS].node_id,
            url=request.app[SETTINGS].public_url,
            is_leader=elector.is_leader,
            token=term.token if term else None,
            validity_remaining_s=round(term.remaining(), 3) if term else None,
            lease_renewed_ago_s=round(term.renewed_ago(), 3) if term else None,
            leader=leader_body(observed) if observed else None,
            terms=elector.stats.terms,
            transitions=elector.stats.transitions,
            # Served at the top level, where clients have always read it.
            stale_writes_rejected=counters.stale_writes_rejected,
            dispatch=dispatch_stats_body(counters),
            failover=dict(request.app[FAILOVER_STATS].outcomes),
            event_loop_lag_s=round(watchdog.lag, 4),
            event_loop_max_lag_s=round(watchdog.max_lag, 4),
        )
    )


def add_cluster_routes(app: web.Application) -> None:
    """Register /v1/leader, /v1/node and /v1/cluster."""
    app.router.add_get("/v1/leader", get_leader)
    app.router.add_get("/v1/node", get_node)
    app.router.add_get("/v1/cluster", get_cluster)
