"""The ``paydispatch`` command line. Flags override PAYDISPATCH_* environment variables."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import click

from app.errors import PaydispatchError
from app.obs.logs import configure_logging
from app.settings import load_settings


def _logging(ctx: click.Context, node_id: str | None = None, secrets: tuple[str, ...] = ()) -> None:
    """Configure logging for this command (node id and secrets known once settings are)."""
    configure_logging(ctx.obj["log_level"], node_id=node_id, secrets=secrets)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except PaydispatchError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="info",
    envvar="PAYDISPATCH_LOG_LEVEL",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """paydispatch: exactly-once payment dispatch through leader election and fencing."""
    ctx.obj = {"log_level": log_level}
    configure_logging(log_level)


@main.command()
@click.option("--database-url", help="Overrides PAYDISPATCH_DATABASE_URL.")
def migrate(database_url: str | None) -> None:
    """Upgrade the database schema to head (safe when many replicas run it at once)."""
    from app.store.migrate import migrate as run_migrate

    try:
        settings = load_settings(database_url=database_url)
    except PaydispatchError as exc:
        raise click.ClickException(str(exc)) from None
    before, after = _run(run_migrate(settings))
    click.echo(f"database at revision {after}" + ("" if before == after else f" (was {before})"))


@main.command()
@click.option("--host", help="Listen address (PAYDISPATCH_HOST).")
@click.option("--port", type=int, help="Listen port (PAYDISPATCH_PORT).")
@click.option("--node-id", help="This replica's name (PAYDISPATCH_NODE_ID).")
@click.option("--database-url", help="Overrides PAYDISPATCH_DATABASE_URL.")
@click.option(
    "--no-auth",
    is_flag=True,
    default=None,
    help="Serve /v1/* without authentication (PAYDISPATCH_ALLOW_NO_AUTH).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    node_id: str | None,
    database_url: str | None,
    no_auth: bool | None,
) -> None:
    """Run a replica: HTTP API, leader election and (while leading) the dispatcher."""
    from app.obs.tracing import tracing_config
    from app.replica import serve as run_serve

    try:
        settings = load_settings(
            host=host, port=port, node_id=node_id, database_url=database_url, allow_no_auth=no_auth
        )
        # The standard OpenTelemetry variables, not PAYDISPATCH_*: read here, once, like
        # the settings; off unless they ask for traces.
        tracing = tracing_config(os.environ, node_id=settings.node_id)
    except PaydispatchError as exc:
        raise click.ClickException(str(exc)) from None
    _logging(ctx, settings.node_id, (*settings.api_keys, *settings.admin_api_keys))
    _run(run_serve(settings, tracing=tracing))


@main.command()
@click.option("--host", help="Listen address (PAYDISPATCH_PROVIDER_HOST).")
@click.option("--port", type=int, help="Listen port (PAYDISPATCH_PROVIDER_PORT).")
@click.option("--ledger-path", type=click.Path(dir_okay=False), help="SQLite ledger file.")
@click.option("--latency-ms-min", type=float, help="Lower bound of added latency (ms).")
@click.option("--latency-ms-max", type=float, help="Upper bound of added latency (ms).")
@click.option("--error-rate", type=float, help="Share answered 500/503 (no charge).")
@click.option("--timeout-rate", type=float, help="Share that hang past any client timeout.")
@click.option("--drop-rate", type=float, help="Share charged whose response is dropped.")
@click.option("--conflict-rate", type=float, help="Share answered 409 (no charge).")
@click.option("--decline-rate", type=float, help="Share of new charges declined.")
@click.option("--decline-amounts", help="Comma-separated amounts always declined.")
@click.option("--decline-references", help="Comma-separated references always declined.")
@click.option("--seed", type=int, help="Seed for reproducible fault draws.")
def provider(**options: Any) -> None:
    """Run the stand-in payment provider (idempotency keys, faults, durable ledger).

    Every option also reads PAYDISPATCH_PROVIDER_<NAME>.
    """
    from app.sandbox import SandboxConfigError, load_sandbox_settings, serve

    try:
        settings = load_sandbox_settings(**options)
    except SandboxConfigError as exc:
        raise click.ClickException(str(exc)) from None
    serve(settings)


@main.command()
@click.option("--duration", default=45.0, show_default=True, help="Seconds of load.")
@click.option("--replicas", default=3, show_default=True, type=click.IntRange(2, 9))
@click.option("--rate", default=300.0, show_default=True, help="Payments per second.")
@click.option(
    "--faults",
    default="kill,stop,term",
    show_default=True,
    help="Comma-separated: kill, stop, term, etcd-member, etcd-quorum, "
    "postgres-restart, provider-restart (or 'none').",
)
@click.option(
    "--output",
    default="demo-output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where report.json and the chart go.",
)
def demo(duration: float, replicas: int, rate: float, faults: str, output: str) -> None:
    """The local failover demo: real etcd, Postgres, provider and replicas on loopback;
    the leader is killed with each fault kind while payments flow."""
    from pathlib import Path

    from load.demo import run_demo
    from load.scenario import ALL_FAULTS

    chosen = [] if faults.strip() in ("", "none") else [f.strip() for f in faults.split(",")]
    unknown = [f for f in chosen if f not in ALL_FAULTS]
    if unknown:
        raise click.BadParameter(
            f"unknown {unknown}; choose from {', '.join(ALL_FAULTS)}", param_hint="--faults"
        )
    ok = _run(
        run_demo(
            duration=duration, replicas=replicas, rate=rate, faults=chosen, output=Path(output)
        )
    )
    sys.exit(0 if ok else 1)


# --- operator commands --------------------------------------------------------------------

_url = click.option(
    "--url",
    envvar="PAYDISPATCH_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="A replica or the load balancer.",
)
_key = click.option("--api-key", envvar="PAYDISPATCH_API_KEY", help="Bearer key for /v1/*.")
_admin = click.option(
    "--admin-key",
    envvar="PAYDISPATCH_ADMIN_API_KEY",
    help="Admin bearer key for retry, reconcile, resign.",
)
_json = click.option("--json", "as_json", is_flag=True, help="Raw JSON output for scripts.")


@main.command()
@_url
@_key
@_json
def status(url: str, api_key: str | None, as_json: bool) -> None:
    """Cluster view: leader, token, replicas, queue depth."""
    from app.ops import operator

    operator.emit(
        operator.call("GET", f"{url}/v1/cluster", api_key), as_json, operator.render_status
    )


@main.group()
def payments() -> None:
    """List, show, retry and reconcile payments."""


@payments.command("list")
@_url
@_key
@_json
@click.option("--status", "status_filter", help="Only this status.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--after", type=int, default=0, help="Keyset cursor (next_after).")
def payments_list(
    url: str, api_key: str | None, as_json: bool, status_filter: str | None, limit: int, after: int
) -> None:
    """Payments in id order."""
    from urllib.parse import urlencode

    from app.ops import operator

    query = {"limit": limit, "after": after} | ({"status": status_filter} if status_filter else {})
    operator.emit(
        operator.call("GET", f"{url}/v1/payments?{urlencode(query)}", api_key),
        as_json,
        operator.render_payments,
    )


@payments.command("show")
@click.argument("payment_id", type=int)
@_url
@_key
@_json
def payments_show(payment_id: int, url: str, api_key: str | None, as_json: bool) -> None:
    """One payment."""
    from app.ops import operator

    operator.emit(
        operator.call("GET", f"{url}/v1/payments/{payment_id}", api_key),
        as_json,
        operator.render_payment,
    )


@payments.command("retry")
@click.argument("payment_id", type=int)
@_url
@_admin
@_json
def payments_retry(payment_id: int, url: str, admin_key: str | None, as_json: bool) -> None:
    """Re-queue a pending or needs_reconciliation payment (same idempotency key)."""
    from app.ops import operator

    result = operator.call("POST", f"{url}/v1/admin/payments/{payment_id}/retry", admin_key)
    operator.emit(
        result,
        as_json,
        lambda r: click.echo(
            f"payment {r['id']} re-queued (was {r['previous']}); it is re-sent with its own key"
        ),
    )


@payments.command("reconcile")
@click.argument("payment_id", type=int)
@_url
@_admin
@_json
def payments_reconcile(payment_id: int, url: str, admin_key: str | None, as_json: bool) -> None:
    """Settle a needs_reconciliation payment from the provider's ledger."""
    from app.ops import operator

    result = operator.call("POST", f"{url}/v1/admin/payments/{payment_id}/reconcile", admin_key)
    operator.emit(
        result,
        as_json,
        lambda r: click.echo(
            f"payment {r['id']} is {r['status']} (charge {r['provider_charge_id']})"
        ),
    )


@main.group()
def leader() -> None:
    """Leadership actions."""


@leader.command("resign")
@_url
@_key
@_admin
@_json
@click.option(
    "--yes",
    is_flag=True,
    help="Send the admin key to the leader's advertised URL without asking (it comes from "
    "etcd, not from you).",
)
def leader_resign(
    url: str, api_key: str | None, admin_key: str | None, as_json: bool, yes: bool
) -> None:
    """Ask the leader to hand over now (graceful, like SIGTERM, but it stays a follower).

    The request must go to the leader's own address, read from its leader record; when that
    is not --url, you are asked before the admin key is sent there.
    """
    from app.ops import operator

    def confirm(found: dict[str, Any]) -> bool:
        if yes:
            return True
        try:
            return click.confirm(
                f"The leader {found.get('node_id')} advertises {found.get('url')}, which is "
                f"not {url}. Send the admin key there?",
                default=False,
                err=True,
            )
        except click.Abort:  # no answer (no terminal, end of input): not confirmed
            return False

    def render(r: dict[str, Any]) -> None:
        new = r.get("new_leader")
        click.echo(
            f"{r['node_id']} handed over token {r['handed_over_token']}; new leader: "
            + (f"{new['node_id']} (token {new['token']})" if new else "not yet known")
        )

    operator.emit(
        operator.resign_leader(url, api_key, admin_key or api_key, confirm=confirm),
        as_json,
        render,
    )


if __name__ == "__main__":
    main()
