"""problem+json answers (app.web.problems): the body, headers and content type of every error,
and the middleware's mapping of failures onto them. The middleware is called directly with a
mocked request and a fake handler: no server, no socket."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from app.errors import DatabaseUnavailable, StaleLeader
from app.web.problems import (
    DATABASE_UNAVAILABLE_DETAIL,
    PROBLEM_JSON,
    problem,
    problem_middleware,
    unavailable,
)
from app.web.validation import InvalidRequest

RETRY_AFTER = 7


def body_of(response: web.StreamResponse) -> dict[str, Any]:
    assert isinstance(response, web.Response)
    assert response.text is not None
    document: dict[str, Any] = json.loads(response.text)
    return document


async def answer_when_handler_raises(exc: BaseException) -> web.StreamResponse:
    """What the middleware answers when the route handler raises ``exc``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    middleware = problem_middleware(RETRY_AFTER)
    return await middleware(make_mocked_request("POST", "/v1/payments"), handler)


# --- problem() ------------------------------------------------------------------------------


def test_a_problem_is_problem_json_with_type_title_status_and_detail() -> None:
    response = problem(404, "Payment not found", "no payment has id 7")

    assert response.status == 404
    assert response.content_type == PROBLEM_JSON == "application/problem+json"
    assert body_of(response) == {
        "type": "https://paydispatch.dev/problems/404",
        "title": "Payment not found",
        "status": 404,
        "detail": "no payment has id 7",
    }


def test_a_problem_without_detail_repeats_its_title() -> None:
    assert body_of(problem(409, "Conflict"))["detail"] == "Conflict"


def test_a_validation_problem_lists_the_offending_fields() -> None:
    errors = [{"field": "amount", "message": "Field required"}]

    assert body_of(problem(422, "Invalid payment", errors=errors))["errors"] == errors


def test_extra_members_and_headers_are_carried() -> None:
    response = problem(409, "Busy", headers={"Retry-After": "1"}, payment_id=12)

    assert body_of(response)["payment_id"] == 12
    assert response.headers["Retry-After"] == "1"


def test_unavailable_is_a_503_telling_the_client_when_to_retry() -> None:
    response = unavailable(3, "Postgres is unavailable: connection refused")

    assert response.status == 503
    assert response.headers["Retry-After"] == "3"
    assert body_of(response)["detail"] == "Postgres is unavailable: connection refused"


# --- the middleware -------------------------------------------------------------------------


async def test_an_answer_from_the_handler_passes_through_untouched() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": 1}, status=202)

    response = await problem_middleware(RETRY_AFTER)(make_mocked_request("GET", "/"), handler)

    assert response.status == 202
    assert response.content_type == "application/json"


async def test_invalid_request_becomes_its_status_with_fields_and_a_summary() -> None:
    errors = [
        {"field": "amount", "message": "Field required"},
        {"field": "currency", "message": "Field required"},
    ]

    response = await answer_when_handler_raises(InvalidRequest(422, "Invalid payment", errors))

    assert response.status == 422
    assert response.content_type == PROBLEM_JSON
    assert body_of(response) == {
        "type": "https://paydispatch.dev/problems/422",
        "title": "Invalid payment",
        "status": 422,
        "detail": "amount: Field required; currency: Field required",
        "errors": errors,
    }


@pytest.mark.parametrize(
    ("exc", "status", "title"),
    [
        (web.HTTPNotFound(), 404, "Not Found"),
        (web.HTTPUnauthorized(), 401, "Unauthorized"),
        (
            web.HTTPRequestEntityTooLarge(max_size=1024, actual_size=4096),
            413,
            "Request Entity Too Large",
        ),
        (web.HTTPUnsupportedMediaType(), 415, "Unsupported Media Type"),
    ],
    ids=lambda value: str(value) if isinstance(value, int) else None,
)
async def test_an_http_error_becomes_a_problem_with_its_status_and_reason(
    exc: web.HTTPException, status: int, title: str
) -> None:
    response = await answer_when_handler_raises(exc)

    assert response.status == status
    assert response.content_type == PROBLEM_JSON
    assert body_of(response)["title"] == title


async def test_an_http_error_keeps_its_text_as_the_detail() -> None:
    response = await answer_when_handler_raises(web.HTTPForbidden(text="admin key required"))

    assert body_of(response)["detail"] == "admin key required"


async def test_a_405_keeps_its_allow_header_and_nothing_else() -> None:
    exc = web.HTTPMethodNotAllowed("DELETE", ["GET", "POST"], headers={"X-Internal": "1"})

    response = await answer_when_handler_raises(exc)

    assert response.status == 405
    assert response.headers["Allow"] == "GET,POST"
    assert "X-Internal" not in response.headers


async def test_a_redirect_is_not_turned_into_a_problem() -> None:
    with pytest.raises(web.HTTPFound):
        await answer_when_handler_raises(web.HTTPFound("/v1/payments/1"))


async def test_database_unavailable_becomes_a_503_with_retry_after() -> None:
    response = await answer_when_handler_raises(DatabaseUnavailable())

    assert response.status == 503
    assert response.headers["Retry-After"] == str(RETRY_AFTER)
    assert body_of(response)["detail"] == DATABASE_UNAVAILABLE_DETAIL


async def test_a_503_tells_what_to_do_but_not_where_the_database_is() -> None:
    raised = DatabaseUnavailable("Postgres is unavailable: connect to db-7.internal:5432 failed")

    detail = body_of(await answer_when_handler_raises(raised))["detail"]

    assert "db-7.internal" not in detail
    assert "5432" not in detail
    assert "Idempotency-Key" in detail


async def test_a_driver_connection_failure_becomes_a_503_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.web.problems"):
        response = await answer_when_handler_raises(ConnectionRefusedError(111, "refused"))

    assert response.status == 503
    assert body_of(response)["detail"].startswith("Postgres is unavailable")
    assert "answering 503" in caplog.text


async def test_an_unexpected_error_is_a_500_without_a_traceback_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.web.problems"):
        response = await answer_when_handler_raises(KeyError("secret internals"))

    assert response.status == 500
    assert response.content_type == PROBLEM_JSON
    assert body_of(response)["detail"] == "the error was logged on the server"
    assert "secret internals" not in json.dumps(body_of(response))
    assert "unhandled error on POST /v1/payments" in caplog.text


class FencedOut(Exception):
    """What the driver raises when the fence refuses a write (its SQLSTATE, PDF01)."""

    sqlstate = "PDF01"


@pytest.mark.parametrize(
    "exc",
    [FencedOut("stale fencing token 4 on payments: fence payments is at 5"), StaleLeader("x")],
)
async def test_a_write_a_new_leader_fenced_out_is_a_409_that_says_nothing_changed(
    exc: Exception,
) -> None:
    response = await answer_when_handler_raises(exc)

    assert response.status == 409
    assert body_of(response)["title"] == "Leadership changed meanwhile"
    assert "nothing was changed" in body_of(response)["detail"]
