"""What a client may send to POST /v1/payments, checked before anything touches Postgres."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

import pycountry
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

BIGINT_MAX = 2**63 - 1
IDEMPOTENCY_KEY_MAX = 255
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500
METADATA_MAX_BYTES = 4096  # the database allows 8 KiB; we answer 422 well before it


class InvalidRequest(Exception):
    """The request is malformed; ``errors`` lists each offending field and why."""

    def __init__(self, status: int, title: str, errors: list[dict[str, str]]) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.errors = errors


class PaymentRequest(BaseModel):
    """The body of POST /v1/payments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Annotated[StrictInt, Field(gt=0, le=BIGINT_MAX)]
    currency: StrictStr
    reference: Annotated[StrictStr, Field(max_length=255)] | None = None
    description: Annotated[StrictStr, Field(max_length=1000)] | None = None
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        if len(value) != 3 or not value.isascii() or not value.isalpha():
            raise ValueError("must be a three-letter ISO 4217 code such as EUR")
        if value != value.upper():
            raise ValueError(f"must be upper-case ISO 4217 (did you mean {value.upper()!r}?)")
        if pycountry.currencies.get(alpha_3=value) is None:
            raise ValueError(f"{value!r} is not an ISO 4217 currency code")
        return value

    @field_validator("reference", "description")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold U+0000; say so instead of failing at the INSERT.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain the NUL character (U+0000)")
        return value

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > METADATA_MAX_KEYS:
            raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
        for key, item in value.items():
            if "\x00" in key or "\x00" in item:
                raise ValueError("keys and values must not contain the NUL character (U+0000)")
            if not 1 <= len(key) <= METADATA_KEY_MAX:
                raise ValueError(f"keys must be 1-{METADATA_KEY_MAX} characters")
            if len(item) > METADATA_VALUE_MAX:
                raise ValueError(f"value of {key!r} is longer than {METADATA_VALUE_MAX}")
        if len(json.dumps(value).encode()) > METADATA_MAX_BYTES:
            raise ValueError(f"at most {METADATA_MAX_BYTES} bytes as JSON")
        return value

    def fingerprint(self) -> str:
        """A digest of the normalised request: same digest ⇔ same payment intent."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


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
