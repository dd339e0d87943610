"""The operator side of the CLI: read the cluster, list and show payments, retry, reconcile,
hand leadership over. Talks to a replica's HTTP API like any client; human-readable output,
or the raw JSON with --json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import click

from app.ops.client import http_json


class ApiError(click.ClickException):
    """A non-2xx answer, shown as the problem's title and detail."""


def call(method: str, url: str, key: str | None, timeout: float = 10.0) -> Any:
    """One request; ApiError on anything but 2xx."""
    status, body = http_json(url, timeout, method=method, api_key=key)
    if status == 0:
        raise ApiError(f"no answer from {url} (is the replica running? --url / PAYDISPATCH_URL)")
    if 300 <= status < 400:
        # Not followed (app.ops.client): keys go only to the URL the operator configured.
        raise ApiError(
            f"{url} answered with a redirect ({status}), which is not followed: keys are sent "
            "only to the URL you configured. Point --url / PAYDISPATCH_URL at a replica or "
            "the load balancer itself"
        )
    if not 200 <= status < 300:
        detail = body.get("detail", "") if isinstance(body, dict) else ""
        title = body.get("title", "") if isinstance(body, dict) else ""
        raise ApiError(f"{status} {title}: {detail}".strip())
    return body


def emit(data: Any, as_json: bool, render: Any) -> None:
    """Print ``data`` as JSON or through ``render``."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers], *[[("" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_status(cluster: dict[str, Any]) -> None:
    """The cluster view of ``paydispatch status``."""
    leader = cluster.get("leader")
    if leader:
        click.echo(
            f"leader    {leader['node_id']}  token {leader['token']}  "
            f"since {leader['since']}  ({leader['url']})"
        )
    else:
        click.echo("leader    none (an election is under way or etcd is unreachable)")
    click.echo("replicas")
    for replica in cluster.get("replicas", []):
        mark = "  ← leads" if replica["leading"] else ""
        click.echo(f"  {replica['node_id']:<20} {replica['url']}{mark}")
    queue = cluster.get("queue")
    if queue is None:
        click.echo("queue     unknown (Postgres unavailable)")
    else:
        click.echo("queue     " + "  ".join(f"{status} {count}" for status, count in queue.items()))


def render_payments(page: dict[str, Any]) -> None:
    """``paydispatch payments list``."""
    rows = [
        (
            p["id"],
            p["status"],
            p["amount"],
            p["currency"],
            p["reference"],
            p["attempts"],
            p["updated_at"][:19],
        )
        for p in page["data"]
    ]
    click.echo(table(rows, ["id", "status", "amount", "cur", "reference", "tries", "updated"]))
    if page.get("has_more"):
        click.echo(f"… more: --after {page['next_after']}")


# Fields of a payment that `payments show` leaves to --json (they do not fit on one line).
NOT_SHOWN = frozenset({"metadata", "links"})


def render_payment(payment: dict[str, Any]) -> None:
    """``paydispatch payments show``: every field of the answer, in the order the API writes
    them (app/web/schemas.py's Payment), so this keeps no copy of the shape. The field
    names come from the answer rather than an import of that module, which would load the
    whole server (aiohttp, SQLAlchemy) into every CLI call."""
    for key, value in payment.items():
        if key not in NOT_SHOWN:
            click.echo(f"{key:<19} {value}")


def same_origin(a: str, b: str) -> bool:
    """True when both URLs name the same scheme, host and port."""
    left, right = urlsplit(a), urlsplit(b)
    return (left.scheme, left.hostname, left.port) == (right.scheme, right.hostname, right.port)


def resign_leader(
    url: str,
    key: str | None,
    admin_key: str | None,
    *,
    confirm: Callable[[dict[str, Any]], bool],
    wait: float = 5.0,
) -> dict[str, Any]:
    """Ask the current leader to hand over; wait (bounded) to report who leads next.

    The resign must reach the leader itself, whose address comes from its etcd record (via
    /v1/leader): anyone who can write to etcd can plant one. Unless it is the configured
    ``url``, the admin key goes there only if ``confirm(leader)`` says so.
    """
    leader = call("GET", f"{url}/v1/leader", key)
    target = str(leader.get("url", ""))
    if urlsplit(target).scheme not in ("http", "https"):
        raise ApiError(f"the leader advertises {target!r}, which is not an http(s) URL")
    if not same_origin(target, url) and not confirm(leader):
        raise ApiError(
            f"not sent: the leader {leader.get('node_id')} advertises {target}, which is not "
            f"the configured URL {url}; the admin key goes there only once you confirm "
            "(answer y, pass --yes, or run with --url set to the leader's address)"
        )
    result = call("POST", f"{target}/v1/admin/leader/resign", admin_key)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status, body = http_json(f"{url}/v1/leader", 1.0, api_key=key)
        if status == 200 and body["token"] != leader["token"]:
            return {**result, "new_leader": body}
        time.sleep(0.05)
    return {**result, "new_leader": None}
