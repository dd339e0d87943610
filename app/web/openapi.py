"""The OpenAPI 3.1 description of a replica's HTTP API, served at ``GET /openapi.json``.

The paths are a plain dict written by hand next to the handlers they describe (app/web/)
and the rules they enforce (app/web/validation.py, app/web/auth.py, app/web/problems.py).
The response components are generated from the models the handlers answer with
(app/web/schemas.py), so a body and its schema cannot drift apart; the request body's schema
stays hand-written because it spells out the request checks.
tests/integration/test_openapi.py keeps the rest honest: it fails when a route is missing
from the document or the document names one the router does not have, and it fuzzes a real
server against it.

Request schemas are closed (``additionalProperties: false``) wherever the server rejects
unknown fields. Response schemas are closed too (the models forbid extra fields), so the fuzz
test notices a body the document does not describe.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Final

import pycountry
from aiohttp import web
from pydantic import BaseModel

from app.domain.payment import (
    AMOUNT_MAX,
    BIGINT_MAX,
    IDEMPOTENCY_KEY_MAX,
    METADATA_KEY_MAX,
    METADATA_MAX_BYTES,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX,
)
from app.domain.states import PaymentStatus
from app.web import schemas
from app.web.params import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX
from app.web.problems import PROBLEM_JSON
from app.web.schemas import JSON

JsonObject = dict[str, Any]

API_VERSION: Final = "1.0.0"

BEARER: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
NO_AUTH: Final[list[dict[str, list[str]]]] = []

# The server checks currencies against pycountry's ISO 4217 table (app/validation.py), so
# the document lists the same table: clients and generated tests see exactly what is valid.
ISO_4217_CODES: Final = sorted(currency.alpha_3 for currency in pycountry.currencies)
# Postgres text and jsonb cannot hold U+0000, so no stored string may contain it.
NO_NUL: Final = "^[^\\u0000]*$"
# Printable ASCII with no leading or trailing space. The server's rule is Python's
# str.isprintable() on the UTF-8-decoded value, a superset; see the parameter description.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7E](?:[\x20-\x7E]*[\x21-\x7E])?$"


def _ref(name: str) -> JsonObject:
    return {"$ref": schemas.REF_TEMPLATE.format(model=name)}


def _model(model: type[BaseModel]) -> JsonObject:
    """A reference to the component generated from ``model``."""
    return _ref(model.__name__)


def _problem(description: str, headers: JsonObject | None = None) -> JsonObject:
    """A response whose body is an RFC 9457 problem document."""
    response: JsonObject = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": _model(schemas.Problem)}},
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
    "Postgres is unavailable: the request may not have been stored. Retry the same request "
    "(with the same `Idempotency-Key`) after `Retry-After` seconds: it is stored once either "
    "way (a payment stored before the connection failed is answered 200).",
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

# The request body stays hand-written: its patterns, enum and key rules describe the
# request checks (app/domain/payment.py), which pydantic's generated schema would not.
PAYMENT_REQUEST: Final[JsonObject] = {
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
            "maximum": AMOUNT_MAX,
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
            "202": _json("A new payment, stored as pending.", _model(schemas.Payment), LOCATION),
            "200": _json(
                "A replay: this key was used before with the same body; the original payment.",
                _model(schemas.Payment),
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
                # Generated from the enum as a component of the Payment model.
                "schema": _ref(PaymentStatus.__name__),
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
            "200": _json("One page of payments, oldest first.", _model(schemas.PaymentList)),
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
            "200": _json("The payment.", _model(schemas.Payment)),
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
                    "200": _json("The leader.", _model(schemas.Leader)),
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
                "responses": {
                    "200": _json("This replica.", _model(schemas.Node)),
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/v1/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "Leader, campaigning replicas, recent changes, queue depth",
                "tags": ["cluster"],
                "security": BEARER,
                "responses": {
                    "200": _json("The cluster as this replica sees it.", _model(schemas.Cluster)),
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
                    "200": _json("Re-queued.", _model(schemas.Requeued)),
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
                        _model(schemas.Reconciled),
                    ),
                    "401": ADMIN_UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": PAYMENT_NOT_FOUND,
                    "409": _problem(
                        "Not needs_reconciliation, changed meanwhile, or the provider has no "
                        "charge for its key."
                    ),
                    "422": _problem(
                        "The provider's charge for the key has a status other than succeeded "
                        "or declined: nothing is written."
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
                    "200": _json("Handed over.", _model(schemas.HandedOver)),
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
                "responses": {"200": _json("Alive.", _model(schemas.Alive))},
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
                    "200": _json("Ready.", _model(schemas.Ready)),
                    "503": _json(
                        "Postgres did not answer within PAYDISPATCH_READYZ_TIMEOUT, or "
                        "shutdown has begun.",
                        {"oneOf": [_model(schemas.NotReady), _model(schemas.ShuttingDown)]},
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


def response_components() -> JsonObject:
    """The response components, generated from app/web/schemas.py's models (each with the
    models it nests, which pydantic hands back as ``$defs``)."""
    components: JsonObject = {}
    for model in schemas.RESPONSE_MODELS:
        generated = schemas.json_schema(model)
        for name, definition in {**generated.pop("$defs", {}), model.__name__: generated}.items():
            # Two models named alike would silently overwrite each other's component.
            if components.setdefault(name, definition) != definition:
                raise ValueError(f"two different response models generate component {name!r}")
    return components


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
            "schemas": {"PaymentRequest": PAYMENT_REQUEST, **response_components()},
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
