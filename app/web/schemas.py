"""Response shapes of the replica's API, defined once: the handlers build every JSON answer
from these models, and app/web/openapi.py generates its response components from them.

The models are closed (``extra="forbid"`` → ``additionalProperties: false``): a handler cannot
grow a field the document does not mention. Every field is required unless it is left out of
the body when unset (only the problem's ``errors`` and ``payment_id``). Bodies are encoded by
the stdlib JSON encoder, so numbers, datetimes (``isoformat()``) and escapes are written
exactly as before the models existed.

The mapping from domain and leadership types to these shapes lives here too: the lower layers
know nothing of how the API writes them out.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PlainSerializer, WithJsonSchema
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, SkipJsonSchema

from app.dispatch.dispatcher import DispatchStats as DispatchCounters
from app.domain import payment as domain
from app.domain.payment import BIGINT_MAX
from app.domain.states import PaymentStatus
from app.leadership.observer import LeaderInfo
from app.web.params import LIST_LIMIT_MAX

JSON: Final = "application/json"

# Written with datetime.isoformat() ("+00:00"), as the API always has; pydantic's own JSON
# form would write "Z" instead.
IsoDateTime = Annotated[
    datetime,
    PlainSerializer(datetime.isoformat, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
PaymentId = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
Seconds = Annotated[float, Field(ge=0)]


class _Closed(BaseModel):
    """A response body: no field beyond the declared ones, in declaration order."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- payments -------------------------------------------------------------------------------


class PaymentLinks(_Closed):
    """Where the payment lives."""

    self: Annotated[str, Field(pattern="^/v1/payments/[0-9]+$")]


class Payment(_Closed):
    """A payment as the API serves it."""

    id: PaymentId
    status: PaymentStatus
    amount: Annotated[int, Field(ge=1, le=BIGINT_MAX)]
    currency: Annotated[str, Field(pattern="^[A-Z]{3}$")]
    reference: Annotated[str, Field(max_length=255)] | None
    description: Annotated[str, Field(max_length=1000)] | None
    metadata: dict[str, str]
    attempts: Annotated[NonNegativeInt, Field(description="Provider calls made so far.")]
    provider_charge_id: Annotated[
        str | None, Field(description="The provider's charge id once charged.")
    ]
    fence_token: Annotated[
        NonNegativeInt | None,
        Field(
            description="Fencing token of the leader term that last wrote this payment; "
            "null until a leader claims it."
        ),
    ]
    last_error: str | None
    created_at: IsoDateTime
    updated_at: IsoDateTime
    completed_at: Annotated[
        IsoDateTime | None, Field(description="Set when the payment reaches a terminal state.")
    ]
    links: PaymentLinks


class PaymentList(_Closed):
    """One keyset page of payments, oldest first."""

    data: Annotated[list[Payment], Field(max_length=LIST_LIMIT_MAX)]
    has_more: bool
    next_after: Annotated[
        PaymentId | None,
        Field(description="Pass as `after` for the next page; null on the last page."),
    ]


def payment_body(payment: domain.Payment) -> Payment:
    """The API's view of a stored payment (internal columns such as the key stay inside)."""
    return Payment(
        id=payment.id,
        status=payment.status,
        amount=payment.amount,
        currency=payment.currency,
        reference=payment.reference,
        description=payment.description,
        metadata=payment.metadata,
        attempts=payment.attempts,
        provider_charge_id=payment.provider_charge_id,
        fence_token=payment.fence_token,
        last_error=payment.last_error,
        created_at=payment.created_at,
        updated_at=payment.updated_at,
        completed_at=payment.completed_at,
        links=PaymentLinks(self=f"/v1/payments/{payment.id}"),
    )


def payment_json(payment: domain.Payment) -> bytes:
    """``payment_body(payment)`` encoded, without building and dumping the model: the
    ingest hot path answers with this. Same fields in the same order, datetimes in the same
    ``isoformat()`` form (orjson writes aware datetimes exactly so);
    tests/unit/test_payment_json.py holds the two to the same document."""
    return orjson.dumps(
        {
            "id": payment.id,
            "status": payment.status.value,
            "amount": payment.amount,
            "currency": payment.currency,
            "reference": payment.reference,
            "description": payment.description,
            "metadata": payment.metadata,
            "attempts": payment.attempts,
            "provider_charge_id": payment.provider_charge_id,
            "fence_token": payment.fence_token,
            "last_error": payment.last_error,
            "created_at": payment.created_at,
            "updated_at": payment.updated_at,
            "completed_at": payment.completed_at,
            "links": {"self": f"/v1/payments/{payment.id}"},
        }
    )


# --- cluster --------------------------------------------------------------------------------


class Leader(_Closed):
    """The leader as a replica observes it through its etcd watch."""

    node_id: str
    url: Annotated[str, Field(description="The leader's advertised URL.")]
    token: Annotated[
        int, Field(ge=1, description="The fencing token: the etcd create revision of its key.")
    ]
    since: Annotated[
        str,
        Field(
            description="When this replica first observed this leader.",
            json_schema_extra={"format": "date-time"},
        ),
    ]


def leader_body(leader: LeaderInfo) -> Leader:
    """The API's view of an observed leader (its etcd key stays inside)."""
    return Leader(node_id=leader.node_id, url=leader.url, token=leader.token, since=leader.since)


class Replica(_Closed):
    """A campaigning replica."""

    node_id: str
    url: str
    candidate_revision: Annotated[int, Field(ge=1)]
    leading: bool


class QueueDepth(_Closed):
    """Payments by status (every status, zero included)."""

    # One field per PaymentStatus member; tests/integration/test_openapi.py checks they agree.
    pending: NonNegativeInt
    in_flight: NonNegativeInt
    succeeded: NonNegativeInt
    declined: NonNegativeInt
    failed: NonNegativeInt
    needs_reconciliation: NonNegativeInt


class Cluster(_Closed):
    """The cluster as one replica sees it."""

    observed_by: Annotated[str, Field(description="The answering replica.")]
    leader: Annotated[
        Leader | None,
        Field(
            description="Null when no replica leads, and while the view is unconfirmed "
            "(see leader_unknown_since)."
        ),
    ]
    leader_unknown_since: Annotated[
        str | None,
        Field(
            description="Set when etcd has not confirmed this replica's view for a lease TTL "
            "(the replica cannot reach etcd or its quorum): the time of the last "
            "confirmation. The replica then names no leader; replicas lists the candidates "
            "as last confirmed, none of them leading.",
            json_schema_extra={"format": "date-time"},
        ),
    ]
    replicas: Annotated[
        list[Replica], Field(description="Every campaigning replica, leader first.")
    ]
    leadership_changes: Annotated[list[Leader], Field(description="Recent leaders, newest first.")]
    queue: Annotated[
        QueueDepth | None,
        Field(description="Payments by status; null while Postgres is unavailable."),
    ]


class DispatchStats(_Closed):
    """This replica's dispatch counters (since it started)."""

    claimed: NonNegativeInt
    succeeded: NonNegativeInt
    declined: NonNegativeInt
    failed: NonNegativeInt
    retries: NonNegativeInt
    needs_reconciliation: NonNegativeInt
    reconciled: NonNegativeInt
    recovered: NonNegativeInt
    batches: NonNegativeInt
    outcomes: Annotated[
        dict[str, NonNegativeInt], Field(description="Provider attempts by outcome.")
    ]


def dispatch_stats_body(stats: DispatchCounters) -> DispatchStats:
    """The dispatcher's counters as served (a counter added there must be added here)."""
    counters = dataclasses.asdict(stats)
    # Served at the top level of /v1/node (Node.stale_writes_rejected), where clients have
    # always read it.
    counters.pop("stale_writes_rejected")
    return DispatchStats.model_validate(counters)


class Node(_Closed):
    """This replica's own view of itself."""

    node_id: str
    url: str
    is_leader: bool
    token: Annotated[
        int | None,
        Field(description="Fencing token of this replica's term; null unless leading."),
    ]
    validity_remaining_s: Annotated[
        float | None, Field(description="Seconds this leader may still act; null unless leading.")
    ]
    lease_renewed_ago_s: float | None
    leader: Leader | None
    terms: NonNegativeInt
    transitions: Annotated[
        dict[str, NonNegativeInt],
        Field(description="Leadership transitions by reason (elected, resigned, lost, …)."),
    ]
    stale_writes_rejected: NonNegativeInt
    dispatch: DispatchStats
    failover: Annotated[
        dict[str, NonNegativeInt],
        Field(
            description="This replica's fast crash detection, by decision: takeover, "
            "leader_alive, key_changed, rate_limited."
        ),
    ] = {}
    event_loop_lag_s: Seconds
    event_loop_max_lag_s: Seconds


# --- admin ----------------------------------------------------------------------------------


class Requeued(_Closed):
    """A payment re-queued by an operator."""

    id: PaymentId
    status: Literal["pending"]
    previous: Literal["pending", "needs_reconciliation"]


class Reconciled(_Closed):
    """A payment settled with the provider's recorded outcome."""

    id: PaymentId
    status: Literal["succeeded", "declined"]
    provider_charge_id: str


class HandedOver(_Closed):
    """A leader that handed its term over."""

    node_id: str
    handed_over_token: Annotated[int, Field(ge=1)]


# --- health ---------------------------------------------------------------------------------


class Alive(_Closed):
    """The process serves HTTP."""

    status: Literal["alive"]


class Ready(_Closed):
    """Postgres answers and the replica is not stopping."""

    status: Literal["ready"]
    database: Literal["ok"]


class NotReady(_Closed):
    """Postgres did not answer in time."""

    status: Literal["not_ready"]
    database: Annotated[
        Literal["timeout", "unavailable"],
        Field(
            description="Why Postgres is not usable: it did not answer in time, or the "
            "connection or query failed (the details are in the replica's log, never here)."
        ),
    ]


class ShuttingDown(_Closed):
    """Shutdown has begun."""

    status: Literal["shutting_down"]


# --- problems -------------------------------------------------------------------------------


class FieldError(_Closed):
    """One offending field of a rejected request."""

    field: Annotated[
        str,
        Field(
            description="A body field as a dotted path (`metadata.cart`), a query parameter, "
            "a header name (`Idempotency-Key`, `Content-Type`) or `body`."
        ),
    ]
    message: str


class Problem(_Closed):
    """An RFC 9457 problem document; every error of this API is one."""

    type: Annotated[
        str,
        Field(
            description="`https://paydispatch.dev/problems/<status>`.",
            json_schema_extra={"format": "uri"},
        ),
    ]
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str
    # Present only when set; SkipJsonSchema keeps the null that stands for "absent" out of
    # the document, since the body never carries it.
    errors: Annotated[
        list[FieldError] | SkipJsonSchema[None],
        Field(description="Validation failures: one entry per offending field."),
    ] = None
    payment_id: Annotated[
        PaymentId | SkipJsonSchema[None],
        Field(
            description="On a 422 for a reused `Idempotency-Key`: the payment that key "
            "already belongs to."
        ),
    ] = None


# --- the document's side --------------------------------------------------------------------

# Every model a documented response names; app/web/openapi.py generates its components from
# these (nested models come along as $defs).
RESPONSE_MODELS: Final[tuple[type[BaseModel], ...]] = (
    Payment,
    PaymentList,
    Leader,
    Cluster,
    Node,
    Requeued,
    Reconciled,
    HandedOver,
    Alive,
    Ready,
    NotReady,
    ShuttingDown,
    Problem,
)
REF_TEMPLATE: Final = "#/components/schemas/{model}"


class ResponseSchemaGenerator(GenerateJsonSchema):
    """pydantic's generator without per-field titles (a property's name is its title)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: the titles would only repeat the property names."""
        return False

    def default_schema(self, schema: Any) -> JsonSchemaValue:
        """The field's schema without ``default``: a default says what a reader may assume
        when a field is absent from a request, and no request carries these shapes (the
        problem's absent ``errors`` is absent, not null)."""
        json_schema = super().default_schema(schema)
        json_schema.pop("default", None)
        return json_schema


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema as the document carries it: serialization mode, references
    into ``#/components/schemas``, nested models under ``$defs``."""
    return model.model_json_schema(
        ref_template=REF_TEMPLATE, schema_generator=ResponseSchemaGenerator, mode="serialization"
    )


def body_text(body: BaseModel) -> str:
    """``body`` as JSON text (the stdlib encoder; unset optional fields left out)."""
    return json.dumps(body.model_dump(mode="json", exclude_defaults=True))


def json_response(body: BaseModel, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON response built from one of the response models."""
    return web.Response(text=body_text(body), status=status, content_type=JSON, **kwargs)
