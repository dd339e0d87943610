"""RFC 9457 problem+json answers and the middleware that turns every failure into one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from app.errors import DatabaseUnavailable, StaleLeader
from app.store.engine import translate
from app.web.schemas import FieldError, Problem, body_text
from app.web.validation import InvalidRequest

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The driver's message names hosts, ports, socket paths and users: it is logged, and the
# client is told only what to do.
# Not "nothing was stored": an insert can commit just before its connection fails, and its
# answer is then lost. The retry under the same key finds it (200, the same payment).
DATABASE_UNAVAILABLE_DETAIL = (
    "Postgres is unavailable; the request may not have been stored. Retry the same request "
    "(same Idempotency-Key) after Retry-After seconds: it is stored once either way"
)
LEADER_CHANGED_DETAIL = (
    "a new leader took over while this was being written, and the database refused the write "
    "as a whole: nothing was changed. Read the payment again and decide again"
)


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    payment_id: int | None = None,
) -> web.Response:
    """A problem+json response; ``errors`` lists offending fields for validation failures,
    ``payment_id`` the payment a reused Idempotency-Key already belongs to."""
    body = Problem(
        type=f"https://paydispatch.dev/problems/{status}",
        title=title,
        status=status,
        detail=detail or title,
        errors=None if errors is None else [FieldError.model_validate(e) for e in errors],
        payment_id=payment_id,
    )
    return web.Response(
        status=status,
        text=body_text(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def unavailable(retry_after: int, detail: str) -> web.Response:
    """503 with Retry-After: Postgres is down, the client should retry the same request."""
    return problem(
        503,
        "Service temporarily unavailable",
        detail,
        headers={"Retry-After": str(retry_after)},
    )


def problem_middleware(retry_after: int) -> Middleware:
    """Middleware: bad input → 4xx, Postgres down → 503, anything else → 500; never a
    traceback in a response body."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            return problem(exc.status, exc.title, _summary(exc.errors), errors=exc.errors)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return problem(
                exc.status,
                exc.reason,
                exc.text if exc.text else None,
                headers=_passthrough_headers(exc),
            )
        except DatabaseUnavailable as exc:
            log.warning("answering 503: %s", exc)
            return unavailable(retry_after, DATABASE_UNAVAILABLE_DETAIL)
        except Exception as exc:
            typed = exc if isinstance(exc, StaleLeader) else translate(exc)
            if isinstance(typed, DatabaseUnavailable):
                log.warning("answering 503: %s", typed)
                return unavailable(retry_after, DATABASE_UNAVAILABLE_DETAIL)
            if isinstance(typed, StaleLeader):
                # An operator's write carries the fence's token as it read it; a new leader
                # raising the fence before the write landed refuses it as a whole.
                log.warning("answering 409: %s", typed)
                return problem(409, "Leadership changed meanwhile", LEADER_CHANGED_DETAIL)
            log.exception("unhandled error on %s %s", request.method, request.path)
            return problem(500, "Internal server error", "the error was logged on the server")

    return middleware


def _summary(errors: list[dict[str, str]]) -> str:
    return "; ".join(f"{err['field']}: {err['message']}" for err in errors)


def _passthrough_headers(exc: web.HTTPException) -> dict[str, str]:
    return {key: value for key, value in exc.headers.items() if key in ("Allow", "Retry-After")}
