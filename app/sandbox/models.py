"""Request validation and problem+json answers of the stand-in provider.

Every way a request can be wrong ends here as a 400 with a list of the offending fields,
never as a 500: the dispatcher classifies 4xx as "the request is wrong" and 5xx as "try
again", so a 500 for bad input would make it retry something that can never succeed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from app.sandbox.routing import Answer

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "urn:paydispatch:provider:problem:"

# JSON consumers (JavaScript) lose precision above 2**53; amounts never get near it.
MAX_AMOUNT = 2**53 - 1
MAX_KEY_LENGTH = 255
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
# SQLite integers are signed 64-bit; a larger cursor would fail to bind.
MAX_CURSOR = 2**63 - 1


def _encodable(value: str) -> str:
    # A lone surrogate ("\ud800" in JSON) cannot be stored as UTF-8; reject it as input.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class ChargeRequest(BaseModel):
    """Body of ``POST /v1/charges``. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    amount: int = Field(gt=0, le=MAX_AMOUNT, description="Minor units, e.g. cents.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, upper case.")
    reference: Text | None = Field(None, max_length=1024, description="Merchant reference.")
    description: Text | None = Field(None, max_length=1024, description="Free text.")
    metadata: dict[Text, Text] | None = Field(
        None, max_length=100, description="Free-form string pairs, stored and echoed."
    )


class FieldError(dict[str, str]):
    """One offending field: ``{"field": ..., "message": ...}``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field=field, message=message)


JSON_UTF8 = "application/json; charset=utf-8"
PROBLEM_JSON_UTF8 = f"{PROBLEM_CONTENT_TYPE}; charset=utf-8"


def orjson_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> Answer:
    """A JSON answer encoded by orjson (several times the stdlib's speed; charges and
    ledger pages are the provider's own encoding work)."""
    return Answer(status, orjson.dumps(payload), JSON_UTF8, headers)


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Answer:
    """An RFC 9457 problem response."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    return Answer(status, orjson.dumps(body), PROBLEM_JSON_UTF8, headers)


def invalid_request(errors: list[FieldError]) -> Answer:
    """400 naming every offending field."""
    fields = ", ".join(sorted({error["field"] for error in errors}))
    return problem(
        400,
        "invalid-request",
        "Invalid request",
        f"The request is invalid ({fields}); fix it before retrying.",
        errors=errors,
    )


def check_idempotency_key(value: str | None) -> tuple[str | None, list[FieldError]]:
    """The ``Idempotency-Key`` header, or the reason it is unusable."""
    if value is None or value == "":
        return None, [FieldError("Idempotency-Key", "header is required")]
    if len(value) > MAX_KEY_LENGTH:
        return None, [FieldError("Idempotency-Key", f"must be at most {MAX_KEY_LENGTH} characters")]
    # str.isprintable() rejects control characters and the lone surrogates that carry
    # undecodable header bytes (app.sandbox.routing.Request.header).
    if not value.isprintable():
        return None, [FieldError("Idempotency-Key", "must contain printable characters only")]
    return value, []


def _loads(raw: bytes) -> Any:
    """``json.loads(raw)``, parsed by orjson where that gives the same document.

    orjson refuses what the stdlib accepts beyond RFC 8259 (NaN, a BOM, lone surrogates,
    other encodings): those bodies are parsed again by the stdlib, so every body gets the
    answer it got before. orjson also reads an integer beyond 64 bits as a float, which
    would change the 400's words for an oversized amount: a float at the top level is
    parsed again too (nested values are strings or fail alike either way)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    if isinstance(document, dict) and any(type(v) is float for v in document.values()):
        return json.loads(raw)
    return document


def parse_charge_body(raw: bytes) -> tuple[ChargeRequest | None, list[FieldError]]:
    """The validated body, or every reason it is not one."""
    try:
        document = _loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, [FieldError("body", "must be a JSON object (could not parse JSON)")]
    if not isinstance(document, dict):
        return None, [FieldError("body", "must be a JSON object")]
    try:
        return ChargeRequest.model_validate(document), []
    except ValidationError as exc:
        return None, [
            FieldError(".".join(str(part) for part in err["loc"]) or "body", err["msg"])
            for err in exc.errors(include_url=False)
        ]


def parse_int_param(
    query: Mapping[str, str], name: str, *, default: int, minimum: int, maximum: int
) -> tuple[int, list[FieldError]]:
    """A bounded integer query parameter."""
    raw = query.get(name)
    if raw is None:
        return default, []
    # Digits only: int() would also take " 5", "1_000" and 10,000-digit strings.
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw) > 19
        or not (minimum <= int(raw) <= maximum)
    ):
        return default, [FieldError(name, f"must be an integer between {minimum} and {maximum}")]
    return int(raw), []


def parse_text_param(query: Mapping[str, str], name: str) -> tuple[str | None, list[FieldError]]:
    """An optional free-text query parameter."""
    raw = query.get(name)
    if raw is None:
        return None, []
    try:
        return _encodable(raw), []
    except ValueError as exc:
        return None, [FieldError(name, str(exc))]
