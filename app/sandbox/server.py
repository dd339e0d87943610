"""HTTP server of the stand-in provider: a card processor with idempotency keys and faults.

Contract of ``POST /v1/charges`` (header ``Idempotency-Key``, body ``amount, currency,
reference`` plus optional ``description``, ``metadata``):

- 201 a new charge that succeeded, 402 a new charge that was declined; body: the charge.
- Same key, same amount/currency/reference, after completion: the stored answer again
  (same status and body) with ``Idempotent-Replayed: true``. No latency, never dropped.
- Same key, different parameters: 422 (whatever state the key is in).
- Same key while its first request is still processing: 409 with ``Retry-After``.
- Invalid header or body: 400 problem+json listing the offending fields. Validation comes
  first, so bad input is a 400 even when faults are configured.
- Injected faults, drawn for every valid request (new or replay): 500/503 (``error_rate``),
  hang ``hang_seconds`` then 504 (``timeout_rate``), 409 (``conflict_rate``); none of them
  records anything. ``drop_rate`` applies to new charges only: the charge is recorded, then
  the connection is closed without an answer. Answers to injected faults carry the header
  ``X-Sandbox-Fault`` so humans can tell them apart; clients must not rely on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from app.sandbox.faults import FaultDraw, FaultInjector
from app.sandbox.ledger import Ledger
from app.sandbox.models import (
    ChargeRequest,
    FieldError,
    check_idempotency_key,
    invalid_request,
    orjson_response,
    parse_charge_body,
    problem,
)
from app.sandbox.reads import get_charge, healthz, list_charges, metrics, stats
from app.sandbox.records import (
    AlreadyCharged,
    Charge,
    ChargeParams,
    InProgress,
    LedgerClosed,
    NewCharge,
    ReserveResult,
)
from app.sandbox.settings import SandboxSettings
from app.sandbox.state import SANDBOX_STATE, SandboxState, now_iso

log = logging.getLogger("paydispatch.provider")

# The collector's young generation once serving (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000
REPLAYED_HEADER = "Idempotent-Replayed"
FAULT_HEADER = "X-Sandbox-Fault"


def _charge_response(charge: Charge, *, replayed: bool) -> web.Response:
    # Real processors answer a decline with 402 and the declined charge.
    status = 201 if charge.status == "succeeded" else 402
    headers = {"Location": f"/v1/charges/{charge.id}"}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return orjson_response(charge.to_json(), status=status, headers=headers)


def _conflict(key: str, *, injected: bool) -> web.Response:
    headers = {"Retry-After": "1"}
    if injected:
        headers[FAULT_HEADER] = "conflict"
    return problem(
        409,
        "request-in-progress",
        "Request in progress",
        f"A request with Idempotency-Key {key!r} is still being processed; "
        "retry later with the same key to get its result.",
        headers=headers,
    )


def _mismatch(key: str, sent: ChargeParams, bound: ChargeParams) -> web.Response:
    differing = [
        name
        for name in ("amount", "currency", "reference")
        if getattr(sent, name) != getattr(bound, name)
    ]
    return problem(
        422,
        "idempotency-key-reused",
        "Idempotency key reused with different parameters",
        f"Idempotency-Key {key!r} was first used with different {', '.join(differing)}; "
        "use a new key for a different charge.",
        errors=[
            FieldError(name, "differs from the first request with this key") for name in differing
        ],
    )


async def post_charge(request: web.Request) -> web.StreamResponse:
    """``POST /v1/charges``: create a charge once per idempotency key (see module doc)."""
    state = request.app[SANDBOX_STATE]
    state.stats.requests += 1
    key, errors = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body, body_errors = parse_charge_body(await request.read())
    errors.extend(body_errors)
    if key is None or body is None or errors:
        state.stats.invalid_requests += 1
        return invalid_request(errors)

    draw = state.faults.draw()
    if draw.error_status is not None:
        state.stats.faults["error"] += 1
        return problem(
            draw.error_status,
            "injected-error",
            "Provider error",
            "The provider failed before doing anything; retry with the same key.",
            headers={FAULT_HEADER: "error", "Retry-After": "1"},
        )
    if draw.hang:
        state.stats.faults["timeout"] += 1
        # Wakes early on shutdown so a hanging request never delays it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.stopping.wait(), state.settings.hang_seconds)
        return problem(
            504,
            "injected-timeout",
            "Provider timeout",
            "The provider did not finish in time and made no charge; retry with the same key.",
            headers={FAULT_HEADER: "timeout"},
        )
    if draw.conflict:
        state.stats.faults["conflict"] += 1
        return _conflict(key, injected=True)

    params = ChargeParams(body.amount, body.currency, body.reference)
    bound = state.processing.get(key)
    if bound is not None:
        if bound != params:
            state.stats.param_mismatches += 1
            return _mismatch(key, params, bound)
        state.stats.concurrent_conflicts += 1
        return _conflict(key, injected=False)

    # No await between the check above and this line: the event loop makes it atomic.
    state.processing[key] = params
    try:
        return await _charge_once(request, state, key, params, body, draw)
    finally:
        del state.processing[key]


async def _charge_once(
    request: web.Request,
    state: SandboxState,
    key: str,
    params: ChargeParams,
    body: ChargeRequest,
    draw: FaultDraw,
) -> web.StreamResponse:
    ledger = state.require_ledger()
    if draw.latency_seconds <= 0:
        # Nothing to play between reserving the key and recording the charge: one write.
        at_once = await ledger.charge_at_once(_new_charge(state, key, params, body, draw))
        if isinstance(at_once, Charge):
            return _created(request, state, at_once, draw)
        outcome: ReserveResult = at_once
    else:
        outcome = await ledger.reserve(key, params)
    if isinstance(outcome, AlreadyCharged):
        if outcome.charge.params != params:
            state.stats.param_mismatches += 1
            return _mismatch(key, params, outcome.charge.params)
        state.stats.replays += 1
        return _charge_response(outcome.charge, replayed=True)
    if isinstance(outcome, InProgress):  # only another process sharing the file gets here
        if outcome.params != params:
            state.stats.param_mismatches += 1
            return _mismatch(key, params, outcome.params)
        state.stats.concurrent_conflicts += 1
        return _conflict(key, injected=False)

    completed = False
    try:
        if draw.latency_seconds > 0:
            await asyncio.sleep(draw.latency_seconds)
        charge = await ledger.complete(_new_charge(state, key, params, body, draw))
        completed = True
    finally:
        if not completed:
            # Queued after the completion (if any), so it cannot undo a recorded charge.
            ledger.release_nowait(key)
    return _created(request, state, charge, draw)


class _ChargeIds:
    """Random charge ids (``ch_`` + 24 hex digits, as ``secrets.token_hex(12)`` made them),
    drawn from a buffer of system randomness refilled every 1024 ids: one ``getrandom``
    call per id was a visible share of the provider's CPU per charge here."""

    def __init__(self) -> None:
        self._buffer = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._buffer):
            self._buffer, self._at = secrets.token_bytes(12 * 1024), 0
        raw = self._buffer[self._at : self._at + 12]
        self._at += 12
        return f"ch_{raw.hex()}"


_charge_ids = _ChargeIds()


def _new_charge(
    state: SandboxState, key: str, params: ChargeParams, body: ChargeRequest, draw: FaultDraw
) -> NewCharge:
    decline_code = state.faults.decline_code(params, draw)
    return NewCharge(
        id=_charge_ids.next(),
        idempotency_key=key,
        status="succeeded" if decline_code is None else "declined",
        params=params,
        decline_code=decline_code,
        description=body.description,
        metadata=body.metadata,
        created_at=now_iso(),
    )


def _created(
    request: web.Request, state: SandboxState, charge: Charge, draw: FaultDraw
) -> web.StreamResponse:
    """The answer to a charge just recorded (or its dropped connection)."""
    state.stats.charges_created += 1
    if charge.status == "declined":
        state.stats.declines_created += 1
    if draw.drop:
        state.stats.faults["drop"] += 1
        # The charge is recorded; the client only sees the connection close.
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500, headers={FAULT_HEADER: "drop"})  # never delivered
    return _charge_response(charge, replayed=False)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as problem+json, and never show a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(
            exc.status,
            f"http-{exc.status}",
            exc.reason,
            f"{request.method} {request.path}: {exc.reason}.",
            headers=headers,
        )
    except LedgerClosed:
        return problem(
            503,
            "unavailable",
            "Provider unavailable",
            "The provider is starting or stopping; retry shortly.",
            headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return problem(
            500, "internal-error", "Internal error", "The provider failed; retry shortly."
        )


async def _ledger_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[SANDBOX_STATE]
    state.ledger = await Ledger.open(
        state.settings.ledger_path, durable=state.settings.durable_commits
    )
    state.started_at = now_iso()
    try:
        yield
    finally:
        ledger, state.ledger = state.ledger, None
        await ledger.close()


async def _on_shutdown(app: web.Application) -> None:
    app[SANDBOX_STATE].stopping.set()


def create_sandbox_app(settings: SandboxSettings) -> web.Application:
    """The provider as an aiohttp application; the ledger opens on startup, closes on
    cleanup (after in-flight requests are done)."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[problem_middleware])
    app[SANDBOX_STATE] = SandboxState(settings=settings, faults=FaultInjector(settings))
    app.cleanup_ctx.append(_ledger_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/charges", post_charge)
    app.router.add_get("/v1/charges", list_charges)
    app.router.add_get("/v1/charges/{id}", get_charge)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def run_sandbox(
    settings: SandboxSettings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the provider until SIGTERM/SIGINT (or ``stop`` is set, or this is cancelled),
    then let in-flight requests finish for ``shutdown_grace`` seconds and close the ledger.

    ``on_ready`` receives the base URL once the port is bound (useful with port 0).
    """
    stop = stop or asyncio.Event()
    runner = web.AppRunner(
        create_sandbox_app(settings),
        access_log=log if settings.access_log else None,
        shutdown_timeout=settings.shutdown_grace,
        handle_signals=False,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("provider listening on %s, ledger %s", url, settings.ledger_path)
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Signal handlers only work in the main thread; embedded callers pass ``stop``.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
        # As app.runtime.settle_heap does for a replica (the provider imports nothing else
        # from app): start-up frozen, and a young generation that lets a request's
        # objects die before a collection (GC time per charge fell ~10x).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        log.info("provider stopping")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
