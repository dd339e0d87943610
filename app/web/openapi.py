"""The OpenAPI 3.1 description of a replica's HTTP API, served at ``GET /openapi.json``.

The document is a plain dict written by hand next to the handlers it describes (app/web/)
and the rules they enforce (app/web/validation.py, app/web/auth.py, app/web/problems.py).
tests/integration/test_openapi.py keeps it honest: it
fails when a route is missing from the document or the document names one the router does
not have, and it fuzzes a real server against it.

Request schemas are closed (``additionalProperties: false``) wherever the server rejects
unknown fields. Response schemas are closed too: the server builds every body from a fixed
set of keys, and a closed schema lets the fuzz test notice when a handler grows a field the
document does not mention.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Final

import pycountry
from aiohttp import web

from app.domain.payment import (
    BIGINT_MAX,
    IDEMPOTENCY_KEY_MAX,
    METADATA_KEY_MAX,
    METADATA_MAX_BYTES,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX,
)
from app.domain.states import PaymentStatus
from app.web.params import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX

JsonObject = dict[str, Any]

PROBLEM_JSON: Final = "application/problem+json"
JSON: Final = "application/json"
API_VERSION: Final = "1.0.0"

BEARER: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
NO_AUTH: Final[list[dict[str, list[str]]]] = []

# The server checks currencies against pycountry's ISO 4217 table (app/validation.py), so
# the document lists the same table: clients and generated tests see exactly what is valid.
ISO_4217_CODES: Final = sorted(currency.alpha_3 for currency in pycountry.currencies)
STATUSES: Final = [status.value for status in PaymentStatus]
# Postgres text and jsonb cannot hold U+0000, so no stored string may contain it.
NO_NUL: Final = "^[^\\u0000]*$"
# Printable ASCII with no leading or trailing space. The server's rule is Python's
# str.isprintable() on the UTF-8-decoded value, a superset; see the parameter description.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7E](?:[\x20-\x7E]*[\x21-\x7E])?$"


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: JsonObject) -> JsonObject:
    """``schema`` or JSON null (OpenAPI 3.1 has no ``nullable``; this is its spelling)."""
    return {"oneOf": [schema, {"type": "null"}]}


def _problem(description: str, headers: JsonObject | None = None) -> JsonObject:
    """A response whose body is an RFC 9457 problem document."""
    response: JsonObject = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": _ref("Problem")}},
    }
    if headers:
        response["headers"] = headers
    return response


def _json(description: str, schema: JsonObject, headers: JsonObject | None = None) -> JsonObject:
    response: JsonObject = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER: Final[JsonObject] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying the same request.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
WWW_AUTHENTICATE: Final[JsonObject] = {
    "WWW-Authenticate": {
        "description": 'The bearer challenge, `Bearer realm="paydispatch"`.',
        "required": True,
        "schema": {"type": "string"},
    }
}
LOCATION: Final[JsonObject] = {
    "Location": {
        "description": "Path of the payment, `/v1/payments/{id}`.",
        "required": True,
        "schema": {"type": "string", "pattern": "^/v1/payments/[1-9][0-9]*$"},
    }
}

UNAUTHORIZED: Final = _problem(
    "No `Authorization: Bearer <key>` header, or the key is not a configured one.",
    WWW_AUTHENTICATE,
)
# The admin 401 carries the challenge only when the key is unknown, so it is not required.
ADMIN_UNAUTHORIZED: Final = _problem(
    "No bearer key, or a key that is neither an API key nor an admin key.",
    {"WWW-Authenticate": {**WWW_AUTHENTICATE["WWW-Authenticate"], "required": False}},
)
FORBIDDEN: Final = _problem(
    "A valid API key that is not an admin key (PAYDISPATCH_ADMIN_API_KEYS)."
)
DATABASE_UNAVAILABLE: Final = _problem(
    "Postgres is unavailable: nothing was stored or read. Retry the same request (with the "
    "same `Idempotency-Key`) after `Retry-After` seconds.",
    RETRY_AFTER,
)
PAYMENT_NOT_FOUND: Final = _problem("No payment has this id (unknown or malformed id).")

PAYMENT_ID_PARAMETER: Final[JsonObject] = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The payment's id. Anything that is not a positive 64-bit integer in "
    "plain decimal answers 404.",
    "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
}

SCHEMAS: Final[JsonObject] = {
    "Problem": {
        "type": "object",
        "description": "An RFC 9457 problem document; every error of this API is one.",
        "additionalProperties": False,
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": "`https://paydispatch.dev/problems/<status>`.",
            },
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "Validation failures: one entry per offending field.",
                "items": _ref("FieldError"),
            },
            "payment_id": {
                "type": "integer",
                "minimum": 1,
                "description": "On a 422 for a reused `Idempotency-Key`: the payment that "
                "key already belongs to.",
            },
        },
    },
    "FieldError": {
        "type": "object",
        "additionalProperties": False,
        "required": ["field", "message"],
        "properties": {
            "field": {
                "type": "string",
                "description": "A body field as a dotted path (`metadata.cart`), a query "
                "parameter, a header name (`Idempotency-Key`, `Content-Type`) or `body`.",
            },
            "message": {"type": "string"},
        },
    },
    "PaymentStatus": {
        "type": "string",
        "enum": STATUSES,
        "description": "pending → in_flight → succeeded | declined | failed (terminal); "
        "in_flight may go back to pending (retry) or to needs_reconciliation.",
    },
    "PaymentRequest": {
        "type": "object",
        "description": "A new payment. Unknown fields are rejected. Every string must be "
        "Unicode text Postgres can store: no U+0000 (the `pattern`s) and no unpaired "
        "surrogate escapes such as `\\ud800`; either is a 422.",
        "additionalProperties": False,
        "required": ["amount", "currency"],
        "properties": {
            "amount": {
                "type": "integer",
                "minimum": 1,
                "maximum": BIGINT_MAX,
                "description": "Minor units (cents). A JSON integer: `1250`, not `1250.0`.",
            },
            "currency": {
                "type": "string",
                "pattern": "^[A-Z]{3}$",
                "enum": ISO_4217_CODES,
                "description": "An upper-case ISO 4217 currency code. Codes that are not in "
                "ISO 4217 (e.g. `ABC`) are rejected with 422 even though they match the "
                "pattern.",
            },
            "reference": {
                "type": ["string", "null"],
                "maxLength": 255,
                "pattern": NO_NUL,
                "description": "The client's own reference, e.g. an order number.",
            },
            "description": {"type": ["string", "null"], "maxLength": 1000, "pattern": NO_NUL},
            "metadata": {
                "type": "object",
                "description": f"At most {METADATA_MAX_KEYS} string→string pairs; keys of "
                f"1 to {METADATA_KEY_MAX} characters, values of at most {METADATA_VALUE_MAX} "
                f"characters, and at most {METADATA_MAX_BYTES} bytes when encoded as ASCII "
                "JSON (non-ASCII characters count as `\\uXXXX` escapes).",
                "maxProperties": METADATA_MAX_KEYS,
                "propertyNames": {
                    "minLength": 1,
                    "maxLength": METADATA_KEY_MAX,
                    "pattern": NO_NUL,
                },
                "additionalProperties": {
                    "type": "string",
                    "maxLength": METADATA_VALUE_MAX,
                    "pattern": NO_NUL,
                },
                "default": {},
            },
        },
    },
    "Payment": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "status",
            "amount",
            "currency",
            "reference",
            "description",
            "metadata",
            "attempts",
            "provider_charge_id",
            "fence_token",
            "last_error",
            "created_at",
            "updated_at",
            "completed_at",
            "links",
        ],
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
            "status": _ref("PaymentStatus"),
            "amount": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "reference": {"type": ["string", "null"], "maxLength": 255},
            "description": {"type": ["string", "null"], "maxLength": 1000},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "attempts": {
                "type": "integer",
                "minimum": 0,
                "description": "Provider calls made so far.",
            },
            "provider_charge_id": {
                "type": ["string", "null"],
                "description": "The provider's charge id once charged.",
            },
            "fence_token": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "Fencing token of the leader term that last wrote this "
                "payment; null until a leader claims it.",
            },
            "last_error": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "completed_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "Set when the payment reaches a terminal state.",
            },
            "links": {
                "type": "object",
                "additionalProperties": False,
                "required": ["self"],
                "properties": {"self": {"type": "string", "pattern": "^/v1/payments/[0-9]+$"}},
            },
        },
    },
    "PaymentList": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "has_more", "next_after"],
        "properties": {
            "data": {"type": "array", "items": _ref("Payment"), "maxItems": LIST_LIMIT_MAX},
            "has_more": {"type": "boolean"},
            "next_after": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Pass as `after` for the next page; null on the last page.",
            },
        },
    },
    "Leader": {
        "type": "object",
        "description": "The leader as a replica observes it through its etcd watch.",
        "additionalProperties": False,
        "required": ["node_id", "url", "token", "since"],
        "properties": {
            "node_id": {"type": "string"},
            "url": {"type": "string", "description": "The leader's advertised URL."},
            "token": {
                "type": "integer",
                "minimum": 1,
                "description": "The fencing token: the etcd create revision of its key.",
            },
            "since": {
                "type": "string",
                "format": "date-time",
                "description": "When this replica first observed this leader.",
            },
        },
    },
    "DispatchStats": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "claimed",
            "succeeded",
            "declined",
            "failed",
            "retries",
            "needs_reconciliation",
            "reconciled",
            "recovered",
            "batches",
            "outcomes",
        ],
        "properties": {
            **{
                name: {"type": "integer", "minimum": 0}
                for name in (
                    "claimed",
                    "succeeded",
                    "declined",
                    "failed",
                    "retries",
                    "needs_reconciliation",
                    "reconciled",
                    "recovered",
                    "batches",
                )
            },
            "outcomes": {
                "type": "object",
                "description": "Provider attempts by outcome.",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
        },
    },
    "Node": {
        "type": "object",
        "description": "This replica's own view of itself.",
        "additionalProperties": False,
        "required": [
            "node_id",
            "url",
            "is_leader",
            "token",
            "validity_remaining_s",
            "lease_renewed_ago_s",
            "leader",
            "terms",
            "transitions",
            "stale_writes_rejected",
            "dispatch",
            "event_loop_lag_s",
            "event_loop_max_lag_s",
        ],
        "properties": {
            "node_id": {"type": "string"},
            "url": {"type": "string"},
            "is_leader": {"type": "boolean"},
            "token": {
                "type": ["integer", "null"],
                "description": "Fencing token of this replica's term; null unless leading.",
            },
            "validity_remaining_s": {
                "type": ["number", "null"],
                "description": "Seconds this leader may still act; null unless leading.",
            },
            "lease_renewed_ago_s": {"type": ["number", "null"]},
            "leader": _nullable(_ref("Leader")),
            "terms": {"type": "integer", "minimum": 0},
            "transitions": {
                "type": "object",
                "description": "Leadership transitions by reason (elected, resigned, lost, …).",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "stale_writes_rejected": {"type": "integer", "minimum": 0},
            "dispatch": _ref("DispatchStats"),
            "event_loop_lag_s": {"type": "number", "minimum": 0},
            "event_loop_max_lag_s": {"type": "number", "minimum": 0},
        },
    },
    "Cluster": {
        "type": "object",
        "additionalProperties": False,
        "required": ["observed_by", "leader", "replicas", "leadership_changes", "queue"],
        "properties": {
            "observed_by": {"type": "string", "description": "The answering replica."},
            "leader": _nullable(_ref("Leader")),
            "replicas": {
                "type": "array",
                "description": "Every campaigning replica, leader first.",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["node_id", "url", "candidate_revision", "leading"],
                    "properties": {
                        "node_id": {"type": "string"},
                        "url": {"type": "string"},
                        "candidate_revision": {"type": "integer", "minimum": 1},
                        "leading": {"type": "boolean"},
                    },
                },
            },
            "leadership_changes": {
                "type": "array",
                "description": "Recent leaders, newest first.",
                "items": _ref("Leader"),
            },
            "queue": {
                "description": "Payments by status; null while Postgres is unavailable.",
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": STATUSES,
                        "properties": {
                            status: {"type": "integer", "minimum": 0} for status in STATUSES
                        },
                    },
                    {"type": "null"},
                ],
            },
        },
    },
}


def _payment_operations() -> JsonObject:
    create = {
        "operationId": "createPayment",
        "summary": "Accept a payment (durably queued as pending)",
        "description": "Validated before anything is stored, in this order, the first "
        "failure answering: body size (413), `Content-Type` (415), `Idempotency-Key` (400), "
        "JSON object (400), fields (422). Then the same `Idempotency-Key` with the same "
        "payment (defaults filled in) answers 200 with the original payment; with a "
        "different one, 422.",
        "tags": ["payments"],
        "security": BEARER,
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "description": f"1 to {IDEMPOTENCY_KEY_MAX} printable characters without "
                "leading or trailing whitespace, unique per payment (e.g. a UUID). The "
                "pattern is the portable printable-ASCII form; the server also accepts other "
                "printable Unicode characters sent as UTF-8. Missing, blank, too long or "
                "non-printable answers 400.",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": IDEMPOTENCY_KEY_MAX,
                    "pattern": IDEMPOTENCY_KEY_PATTERN,
                },
            }
        ],
        "requestBody": {
            "required": True,
            "description": "At most `PAYDISPATCH_MAX_BODY_BYTES` (default 16384) bytes.",
            "content": {JSON: {"schema": _ref("PaymentRequest")}},
        },
        "responses": {
            "202": _json("A new payment, stored as pending.", _ref("Payment"), LOCATION),
            "200": _json(
                "A replay: this key was used before with the same body; the original payment.",
                _ref("Payment"),
                LOCATION,
            ),
            "400": _problem(
                "Missing, blank, oversized or non-printable `Idempotency-Key`; or a body that "
                "is not JSON or not a JSON object."
            ),
            "401": UNAUTHORIZED,
            "413": _problem("The body is larger than `PAYDISPATCH_MAX_BODY_BYTES`."),
            "415": _problem("`Content-Type` is not `application/json`."),
            "422": _problem(
                "A field fails validation (`errors` names each one), or the `Idempotency-Key` "
                "was used before with a different body (`payment_id` names that payment)."
            ),
            "503": DATABASE_UNAVAILABLE,
        },
    }
    listing = {
        "operationId": "listPayments",
        "summary": "List payments by id (keyset pagination)",
        "description": "Unknown query parameters are rejected with 422.",
        "tags": ["payments"],
        "security": BEARER,
        "parameters": [
            {
                "name": "status",
                "in": "query",
                "required": False,
                "schema": _ref("PaymentStatus"),
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "Page size.",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": LIST_LIMIT_MAX,
                    "default": LIST_LIMIT_DEFAULT,
                },
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "Only payments with a larger id: the previous page's `next_after`.",
                "schema": {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX, "default": 0},
            },
        ],
        "responses": {
            "200": _json("One page of payments, oldest first.", _ref("PaymentList")),
            "401": UNAUTHORIZED,
            "422": _problem("A query parameter is invalid or unknown (`errors` names it)."),
            "503": DATABASE_UNAVAILABLE,
        },
    }
    get = {
        "operationId": "getPayment",
        "summary": "One payment",
        "tags": ["payments"],
        "security": BEARER,
        "parameters": [PAYMENT_ID_PARAMETER],
        "responses": {
            "200": _json("The payment.", _ref("Payment")),
            "401": UNAUTHORIZED,
            "404": PAYMENT_NOT_FOUND,
            "503": DATABASE_UNAVAILABLE,
        },
    }
    return {
        "/v1/payments": {"post": create, "get": listing},
        "/v1/payments/{id}": {"get": get},
    }


def _cluster_operations() -> JsonObject:
    return {
        "/v1/leader": {
            "get": {
                "operationId": "getLeader",
                "summary": "The current leader as this replica observes it",
                "tags": ["cluster"],
                "security": BEARER,
                "responses": {
                    "200": _json("The leader.", _ref("Leader")),
                    "401": UNAUTHORIZED,
                    "503": _problem(
                        "No replica holds leadership right now.",
                        {
                            "Retry-After": {
                                **RETRY_AFTER["Retry-After"],
                                "description": "Seconds to wait before asking again.",
                            }
                        },
                    ),
                },
            }
        },
        "/v1/node": {
            "get": {
                "operationId": "getNode",
                "summary": "This replica's role, term, counters and event-loop lag",
                "tags": ["cluster"],
                "security": BEARER,
                "responses": {"200": _json("This replica.", _ref("Node")), "401": UNAUTHORIZED},
            }
        },
        "/v1/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "Leader, campaigning replicas, recent changes, queue depth",
                "tags": ["cluster"],
                "security": BEARER,
                "responses": {
                    "200": _json("The cluster as this replica sees it.", _ref("Cluster")),
                    "401": UNAUTHORIZED,
                },
            }
        },
    }


def _admin_operations() -> JsonObject:
    admin_note = "Needs a key from PAYDISPATCH_ADMIN_API_KEYS (403 with a plain API key). "
    return {
        "/v1/admin/payments/{id}/retry": {
            "post": {
                "operationId": "retryPayment",
                "summary": "Re-queue a pending or needs_reconciliation payment now",
                "description": admin_note + "The payment is re-sent with its own "
                "idempotency key, so a charge already made is answered, not repeated.",
                "tags": ["admin"],
                "security": BEARER,
                "parameters": [PAYMENT_ID_PARAMETER],
                "responses": {
                    "200": _json(
                        "Re-queued.",
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["id", "status", "previous"],
                            "properties": {
                                "id": {"type": "integer", "minimum": 1},
                                "status": {"const": "pending"},
                                "previous": {"enum": ["pending", "needs_reconciliation"]},
                            },
                        },
                    ),
                    "401": ADMIN_UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": PAYMENT_NOT_FOUND,
                    "409": _problem("The payment is in another state (or changed meanwhile)."),
                    "503": DATABASE_UNAVAILABLE,
                },
            }
        },
        "/v1/admin/payments/{id}/reconcile": {
            "post": {
                "operationId": "reconcilePayment",
                "summary": "Settle a needs_reconciliation payment from the provider's ledger",
                "description": admin_note + "Looked up by idempotency key; nothing is re-sent.",
                "tags": ["admin"],
                "security": BEARER,
                "parameters": [PAYMENT_ID_PARAMETER],
                "responses": {
                    "200": _json(
                        "Settled with the provider's recorded outcome.",
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["id", "status", "provider_charge_id"],
                            "properties": {
                                "id": {"type": "integer", "minimum": 1},
                                "status": {"enum": ["succeeded", "declined"]},
                                "provider_charge_id": {"type": "string"},
                            },
                        },
                    ),
                    "401": ADMIN_UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": PAYMENT_NOT_FOUND,
                    "409": _problem(
                        "Not needs_reconciliation, changed meanwhile, or the provider has no "
                        "charge for its key."
                    ),
                    "503": _problem(
                        "The provider's ledger or Postgres is unavailable; retry later.",
                        RETRY_AFTER,
                    ),
                },
            }
        },
        "/v1/admin/leader/resign": {
            "post": {
                "operationId": "resignLeader",
                "summary": "Hand leadership over gracefully (send it to the leader)",
                "description": admin_note + "The replica stays a follower and campaigns "
                "again behind the new leader.",
                "tags": ["admin"],
                "security": BEARER,
                "responses": {
                    "200": _json(
                        "Handed over.",
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["node_id", "handed_over_token"],
                            "properties": {
                                "node_id": {"type": "string"},
                                "handed_over_token": {"type": "integer", "minimum": 1},
                            },
                        },
                    ),
                    "401": ADMIN_UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "409": _problem("This replica does not lead (`detail` names the leader)."),
                    "503": DATABASE_UNAVAILABLE,
                },
            }
        },
    }


def _open_operations() -> JsonObject:
    return {
        "/livez": {
            "get": {
                "operationId": "livez",
                "summary": "Liveness: the process serves HTTP",
                "tags": ["health"],
                "security": NO_AUTH,
                "responses": {
                    "200": _json(
                        "Alive.",
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["status"],
                            "properties": {"status": {"const": "alive"}},
                        },
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: Postgres answers and the replica is not stopping",
                "description": "Does not depend on leading: every replica ingests. The 503 "
                "body is a plain status object (application/json), not a problem document.",
                "tags": ["health"],
                "security": NO_AUTH,
                "responses": {
                    "200": _json(
                        "Ready.",
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["status", "database"],
                            "properties": {
                                "status": {"const": "ready"},
                                "database": {"const": "ok"},
                            },
                        },
                    ),
                    "503": _json(
                        "Postgres did not answer within PAYDISPATCH_READYZ_TIMEOUT, or "
                        "shutdown has begun.",
                        {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["status", "database"],
                                    "properties": {
                                        "status": {"const": "not_ready"},
                                        "database": {
                                            "type": "string",
                                            "description": "Why Postgres is not usable.",
                                        },
                                    },
                                },
                                {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["status"],
                                    "properties": {"status": {"const": "shutting_down"}},
                                },
                            ]
                        },
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "tags": ["health"],
                "security": NO_AUTH,
                "responses": {
                    "200": {
                        "description": "The exposition text.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["meta"],
                "security": NO_AUTH,
                "responses": {
                    "200": _json(
                        "The OpenAPI 3.1 document.",
                        {"type": "object", "required": ["openapi", "info", "paths"]},
                    )
                },
            }
        },
        "/": {
            "get": {
                "operationId": "dashboard",
                "summary": "The live dashboard page",
                "description": "A static page that polls this replica's /v1 API with the "
                "operator's key; it holds no data itself.",
                "tags": ["meta"],
                "security": NO_AUTH,
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def build_document() -> JsonObject:
    """The OpenAPI 3.1 document of a replica's HTTP API (a fresh dict on every call)."""
    document: JsonObject = {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "paydispatch replica API",
            "version": API_VERSION,
            "summary": "Exactly-once payment dispatch through etcd leader election and "
            "Postgres fencing.",
            "description": "Any replica accepts payments; the leader dispatches them. JSON "
            "everywhere; every error is `application/problem+json`. Every `/v1/*` route "
            "needs `Authorization: Bearer <key>`; health, metrics, this document and the "
            "dashboard page are open.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "payments", "description": "Ingest and query payments."},
            {"name": "cluster", "description": "Leadership as replicas observe it."},
            {"name": "admin", "description": "Operator actions (admin key)."},
            {"name": "health", "description": "Liveness, readiness, metrics."},
            {"name": "meta", "description": "This document and the dashboard."},
        ],
        "paths": {
            **_payment_operations(),
            **_cluster_operations(),
            **_admin_operations(),
            **_open_operations(),
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key from PAYDISPATCH_API_KEYS (or, for every route, "
                    "PAYDISPATCH_ADMIN_API_KEYS).",
                }
            },
        },
    }
    # The module-level pieces are shared between operations; a caller (a test, a tool) may
    # mutate what it gets, and must not change what the server serves.
    return copy.deepcopy(document)


# Serialised once at import: the document never changes while the process runs.
_DOCUMENT_BYTES: Final = json.dumps(build_document(), separators=(",", ":")).encode()


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json — this document (open: it describes the API, it holds no data)."""
    return web.Response(body=_DOCUMENT_BYTES, content_type=JSON)
