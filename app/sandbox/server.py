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
import socket
import time
from functools import partial

import uvloop

from app.sandbox.faults import FaultDraw, FaultInjector
from app.sandbox.http import HttpServer
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
from app.sandbox.routing import (
    DROPPED,
    Answer,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    Reply,
    Request,
    Router,
    UpgradeRefused,
)
from app.sandbox.settings import SandboxSettings
from app.sandbox.state import SandboxState, now_iso

log = logging.getLogger("paydispatch.provider")

# The collector's young generation once serving (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000
REPLAYED_HEADER = "Idempotent-Replayed"
FAULT_HEADER = "X-Sandbox-Fault"


def _charge_response(charge: Charge, *, replayed: bool) -> Answer:
    # Real processors answer a decline with 402 and the declined charge.
    status = 201 if charge.status == "succeeded" else 402
    headers = {"Location": f"/v1/charges/{charge.id}"}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return orjson_response(charge.to_json(), status=status, headers=headers)


def _conflict(key: str, *, injected: bool) -> Answer:
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


def _mismatch(key: str, sent: ChargeParams, bound: ChargeParams) -> Answer:
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


async def post_charge(state: SandboxState, request: Request) -> Reply:
    """``POST /v1/charges``: create a charge once per idempotency key (see module doc)."""
    state.stats.requests += 1
    key, errors = check_idempotency_key(request.header(b"idempotency-key"))
    body, body_errors = parse_charge_body(request.read())
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
        return await _charge_once(state, key, params, body, draw)
    finally:
        del state.processing[key]


async def _charge_once(
    state: SandboxState, key: str, params: ChargeParams, body: ChargeRequest, draw: FaultDraw
) -> Reply:
    ledger = state.require_ledger()
    if draw.latency_seconds <= 0:
        # Nothing to play between reserving the key and recording the charge: one write.
        at_once = await ledger.charge_at_once(_new_charge(state, key, params, body, draw))
        if isinstance(at_once, Charge):
            return _created(state, at_once, draw)
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
    return _created(state, charge, draw)


class _ChargeIds:
    """Charge ids, ``ch_`` + 24 hex digits: the milliseconds since the epoch (12 digits),
    then 48 random bits. Time first, as ULIDs do, so the ledger's index of ids grows at its
    right edge: with wholly random ids every charge landed on an index page of its own,
    two WAL writes per charge, ~80 % of the provider's file writes (strace). The random
    part comes from a buffer of system randomness refilled every 1024 ids: one
    ``getrandom`` call per id was a visible share of the provider's CPU per charge."""

    def __init__(self) -> None:
        self._random = ""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._random):
            self._random, self._at = secrets.token_hex(6 * 1024), 0
        at = self._at
        self._at = at + 12
        return (
            f"ch_{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{self._random[at : at + 12]}"
        )


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


def _created(state: SandboxState, charge: Charge, draw: FaultDraw) -> Reply:
    """The answer to a charge just recorded (or its dropped connection)."""
    state.stats.charges_created += 1
    if charge.status == "declined":
        state.stats.declines_created += 1
    if draw.drop:
        state.stats.faults["drop"] += 1
        # The charge is recorded; the client only sees the connection close.
        return DROPPED
    return _charge_response(charge, replayed=False)


def _error_answer(request: Request, exc: BaseException) -> Answer:
    """Every error as problem+json, never a traceback (routing's 404/405/413 included)."""
    where = f"{request.method} {request.path}"
    if isinstance(exc, NotFound):
        return problem(404, "http-404", "Not Found", f"{where}: no such resource.")
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(exc.allowed)
        return problem(
            405,
            "http-405",
            "Method Not Allowed",
            f"{where}: this resource answers {allowed} only.",
            headers={"Allow": allowed},
        )
    if isinstance(exc, BodyTooLarge):
        return problem(
            413,
            "http-413",
            "Request Entity Too Large",
            f"{where}: the body is over the provider's limit of {request.max_body} bytes.",
            # The rest of the body may still be on its way (or owed, after an Expect:
            # 100-continue): the connection cannot carry another request.
            headers={"Connection": "close"},
        )
    if isinstance(exc, UpgradeRefused):
        return problem(
            400,
            "upgrade-unsupported",
            "Upgrade not supported",
            f"{where}: this provider speaks HTTP/1.1 only; send the request without "
            "Upgrade and Connection: upgrade.",
            headers={"Connection": "close"},
        )
    if isinstance(exc, asyncio.CancelledError):
        return problem(
            503,
            "stopping",
            "Provider stopping",
            "The provider stopped before answering; the charge may or may not have been "
            "made: retry with the same key to learn its result.",
            headers={"Retry-After": "1", "Connection": "close"},
        )
    if isinstance(exc, LedgerClosed):
        return problem(
            503,
            "unavailable",
            "Provider unavailable",
            "The provider is starting or stopping; retry shortly.",
            headers={"Retry-After": "1"},
        )
    log.error("unexpected error answering %s", where, exc_info=exc)
    return problem(500, "internal-error", "Internal error", "The provider failed; retry shortly.")


def create_sandbox_app(state: SandboxState) -> HttpServer:
    """The provider's HTTP server over ``state`` (whose ledger the caller opens before
    serving and closes after); call it on the loop that will serve."""
    router = Router()
    router.add("POST", "/v1/charges", partial(post_charge, state))
    router.add("GET", "/v1/charges", partial(list_charges, state))
    router.add("GET", "/v1/charges/{id}", partial(get_charge, state))
    router.add("GET", "/v1/stats", partial(stats, state))
    router.add("GET", "/healthz", partial(healthz, state))
    router.add("GET", "/metrics", partial(metrics, state))
    return HttpServer(
        router,
        max_body_bytes=state.settings.max_body_bytes,
        on_error=_error_answer,
        # As long as aiohttp's server kept an idle connection: clients that keep theirs
        # for 15 s (aiohttp's default) must not race the provider's close.
        keep_alive=75.0,
        access_log=state.settings.access_log,
    )


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket on the first address ``host`` resolves to, bound before
    serving so that the port is known (0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_sandbox(settings: SandboxSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the provider until SIGTERM/SIGINT (or ``stop`` is set, or this is cancelled),
    then let in-flight requests finish for ``shutdown_grace`` seconds and close the ledger."""
    stop = stop or asyncio.Event()
    state = SandboxState(settings=settings, faults=FaultInjector(settings))
    state.ledger = await Ledger.open(settings.ledger_path, durable=settings.durable_commits)
    state.started_at = now_iso()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        sock = _listen(settings.host, settings.port)
        host, port = sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        server = create_sandbox_app(state)
        try:
            await server.start(sock)
        except BaseException:
            sock.close()
            raise
        log.info("provider listening on http://%s:%s, ledger %s", host, port, settings.ledger_path)
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
        try:
            await stop.wait()
        finally:
            log.info("provider stopping")
            # Hanging requests wake first, so they never hold the shutdown.
            state.stopping.set()
            await server.shutdown(settings.shutdown_grace)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        ledger, state.ledger = state.ledger, None
        await ledger.close()


def serve(settings: SandboxSettings) -> None:
    """Run :func:`run_sandbox` to the end on a uvloop event loop (the provider's CPU per
    charge is what every benchmark pays; see app.sandbox.http)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_sandbox(settings))
