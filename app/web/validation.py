"""What a client may send to POST /v1/payments, checked before anything touches Postgres."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from app.domain.payment import IDEMPOTENCY_KEY_MAX, PaymentRequest


class InvalidRequest(Exception):
    """The request is malformed; ``errors`` lists each offending field and why."""

    def __init__(self, status: int, title: str, errors: list[dict[str, str]]) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.errors = errors


def check_idempotency_key(value: str | None) -> str:
    """The Idempotency-Key header, or InvalidRequest (400) saying what is wrong with it."""
    problem = None
    if value is None:
        problem = "header is required: send a unique key per payment (e.g. a UUID)"
    elif not value.strip():
        problem = "must not be blank"
    elif len(value) > IDEMPOTENCY_KEY_MAX:
        problem = f"must be at most {IDEMPOTENCY_KEY_MAX} characters (got {len(value)})"
    elif not value.isprintable() or value != value.strip():
        problem = "must be printable characters without leading or trailing spaces"
    if problem is not None:
        raise InvalidRequest(
            400, "Invalid Idempotency-Key", [{"field": "Idempotency-Key", "message": problem}]
        )
    assert value is not None
    return value


def parse_payment(body: bytes) -> PaymentRequest:
    """Decode and validate a POST /v1/payments body, or raise InvalidRequest."""
    try:
        document: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(
            400, "Body is not valid JSON", [{"field": "body", "message": str(exc)}]
        ) from None
    if not isinstance(document, dict):
        raise InvalidRequest(
            400,
            "Body must be a JSON object",
            [{"field": "body", "message": f"expected an object, got {type(document).__name__}"}],
        )
    try:
        return PaymentRequest.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequest(422, "Invalid payment", field_errors(exc)) from None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic's errors as ``[{field, message}]`` with dotted field paths."""
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        out.append({"field": field, "message": message})
    return out
