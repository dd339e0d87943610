"""Ingest API against a real Postgres: durable enqueue, idempotent replays, clear errors."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from app.web.state import SETTINGS
from tests.conftest import RunningApi

PROBLEM = "application/problem+json"


def body(**overrides: Any) -> dict[str, Any]:
    payment: dict[str, Any] = {"amount": 1250, "currency": "EUR", "reference": "order-1"}
    payment.update(overrides)
    return payment


async def post(
    api: RunningApi,
    payload: Any,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    sent_headers = {"Content-Type": "application/json"}
    if key is not None:
        sent_headers["Idempotency-Key"] = key
    sent_headers.update(headers or {})
    data = raw if raw is not None else json.dumps(payload).encode()
    async with api.http.post("/v1/payments", data=data, headers=sent_headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def test_new_payment_is_accepted_durably_and_served_back(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    status, payment, headers = await post(
        api, body(description="socks", metadata={"cart": "42"}), key="key-1"
    )
    assert status == 202
    assert headers["Location"] == f"/v1/payments/{payment['id']}"
    assert payment["status"] == "pending"
    assert payment["amount"] == 1250
    assert payment["currency"] == "EUR"
    assert payment["fence_token"] is None
    assert payment["attempts"] == 0

    row = await db.fetchrow("SELECT * FROM payments WHERE id = $1", payment["id"])
    assert row is not None
    assert row["idempotency_key"] == "key-1"
    assert row["status"] == "pending"
    assert row["fence_token"] is None
    assert json.loads(row["metadata"]) == {"cart": "42"}

    async with api.http.get(headers["Location"]) as resp:
        assert resp.status == 200
        fetched = await resp.json()
    for field in (
        "id",
        "status",
        "amount",
        "currency",
        "reference",
        "attempts",
        "provider_charge_id",
        "fence_token",
        "created_at",
        "updated_at",
    ):
        assert fetched[field] == payment[field]


async def test_replay_with_same_body_returns_the_original_payment(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    first_status, first, _ = await post(api, body(), key="replay")
    again_status, again, headers = await post(api, body(), key="replay")
    assert (first_status, again_status) == (202, 200)
    assert again["id"] == first["id"]
    assert headers["Location"] == f"/v1/payments/{first['id']}"
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


async def test_replay_with_a_different_body_is_rejected(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    _, first, _ = await post(api, body(), key="mismatch")
    status, problem, headers = await post(api, body(amount=999), key="mismatch")
    assert status == 422
    assert headers["Content-Type"].startswith(PROBLEM)
    assert problem["errors"][0]["field"] == "Idempotency-Key"
    assert problem["payment_id"] == first["id"]
    assert await db.fetchval("SELECT amount FROM payments") == 1250


async def test_concurrent_identical_requests_create_exactly_one_payment(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    results = await asyncio.gather(*(post(api, body(), key="burst") for _ in range(50)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 49 + [202]
    assert len({payment["id"] for _, payment, _ in results}) == 1
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("unknown field", body(colour="red"), 422, "colour"),
    ("amount zero", body(amount=0), 422, "amount"),
    ("amount negative", body(amount=-5), 422, "amount"),
    ("amount fractional", body(amount=12.5), 422, "amount"),
    ("amount as string", body(amount="100"), 422, "amount"),
    ("amount as boolean", body(amount=True), 422, "amount"),
    ("amount beyond bigint", body(amount=2**63), 422, "amount"),
    ("amount missing", {"currency": "EUR"}, 422, "amount"),
    ("currency lowercase", body(currency="eur"), 422, "currency"),
    ("currency unknown", body(currency="ABC"), 422, "currency"),
    ("currency too long", body(currency="EURO"), 422, "currency"),
    ("currency not a string", body(currency=978), 422, "currency"),
    ("reference too long", body(reference="r" * 256), 422, "reference"),
    ("description too long", body(description="d" * 1001), 422, "description"),
    ("metadata not an object", body(metadata=["a"]), 422, "metadata"),
    ("metadata value not a string", body(metadata={"a": 1}), 422, "metadata.a"),
    ("metadata too many keys", body(metadata={f"k{i}": "v" for i in range(51)}), 422, "metadata"),
    ("metadata value too long", body(metadata={"a": "v" * 501}), 422, "metadata"),
    ("NUL in reference", body(reference="a\x00b"), 422, "reference"),
    ("NUL in description", body(description="a\x00b"), 422, "description"),
    ("NUL in a metadata value", body(metadata={"k": "a\x00b"}), 422, "metadata"),
    ("NUL in a metadata key", body(metadata={"k\x00": "v"}), 422, "metadata"),
    ("body is an array", [body()], 400, "body"),
    ("body is a string", "pay me", 400, "body"),
    ("body is null", None, 400, "body"),
]


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_bad_bodies_get_a_problem_naming_the_field(
    api: RunningApi, db: asyncpg.Connection, payload: Any, status: int, field: str
) -> None:
    got, problem, headers = await post(api, payload, key=str(uuid.uuid4()))
    assert got == status, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert {"type", "title", "detail", "status"} <= problem.keys()
    assert field in [error["field"] for error in problem["errors"]]
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_non_json_body_is_a_400(api: RunningApi) -> None:
    status, problem, _ = await post(api, None, key="k", raw=b"{amount: 1")
    assert status == 400
    assert problem["errors"][0]["field"] == "body"
    status, _, _ = await post(api, None, key="k", raw=b"\xff\xfe")
    assert status == 400


@pytest.mark.parametrize(
    ("key", "why"),
    [(None, "required"), ("   ", "blank"), ("k" * 256, "255"), ("tab\there", "printable")],
    ids=["missing", "blank", "oversized", "control-char"],
)
async def test_bad_idempotency_keys_are_a_400(
    api: RunningApi, db: asyncpg.Connection, key: str | None, why: str
) -> None:
    status, problem, _ = await post(api, body(), key=key)
    assert status == 400
    assert problem["errors"][0]["field"] == "Idempotency-Key"
    assert why in problem["errors"][0]["message"]
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_a_255_character_key_is_accepted(api: RunningApi) -> None:
    status, _, _ = await post(api, body(), key="k" * 255)
    assert status == 202


async def test_oversized_body_is_a_413(api: RunningApi) -> None:
    huge = body(description="x" * (api.app[SETTINGS].max_body_bytes + 1))
    status, problem, headers = await post(api, huge, key="big")
    assert status == 413
    assert headers["Content-Type"].startswith(PROBLEM)
    assert "exceeded" in problem["detail"] or "size" in problem["detail"]


async def test_chunked_oversized_body_is_a_413(api: RunningApi) -> None:
    limit = api.app[SETTINGS].max_body_bytes

    async def chunks() -> Any:
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    headers = {"Content-Type": "application/json", "Idempotency-Key": "chunked"}
    async with api.http.post("/v1/payments", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        assert resp.headers["Content-Type"].startswith(PROBLEM)


async def test_wrong_content_type_is_a_415(api: RunningApi) -> None:
    status, problem, _ = await post(api, body(), key="ct", headers={"Content-Type": "text/plain"})
    assert status == 415
    assert problem["errors"][0]["field"] == "Content-Type"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/payments/999999",
        "/v1/payments/abc",
        "/v1/payments/-1",
        "/v1/payments/99999999999999999999",
    ],
)
async def test_unknown_or_malformed_payment_id_is_a_404(api: RunningApi, path: str) -> None:
    async with api.http.get(path) as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith(PROBLEM)
        assert "no payment" in (await resp.json(content_type=None))["detail"]


async def test_unknown_route_and_method_are_problems(api: RunningApi) -> None:
    async with api.http.get("/v2/nothing") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith(PROBLEM)
    async with api.http.delete("/v1/payments") as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"].startswith(PROBLEM)


async def test_listing_pages_through_every_payment_once(api: RunningApi) -> None:
    created = [(await post(api, body(amount=100 + i), key=f"list-{i}"))[1]["id"] for i in range(7)]
    seen: list[int] = []
    after = 0
    for _ in range(10):
        async with api.http.get("/v1/payments", params={"limit": "3", "after": str(after)}) as r:
            assert r.status == 200
            page = await r.json()
        seen += [payment["id"] for payment in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    assert seen == created


async def test_listing_filters_by_status(api: RunningApi) -> None:
    await post(api, body(), key="only-one")
    async with api.http.get("/v1/payments", params={"status": "pending"}) as resp:
        assert len((await resp.json())["data"]) == 1
    async with api.http.get("/v1/payments", params={"status": "succeeded"}) as resp:
        assert (await resp.json())["data"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "done"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"after": "-3"}, "after"),
        ({"after": "x"}, "after"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_list_queries_are_a_422(
    api: RunningApi, params: dict[str, str], field: str
) -> None:
    async with api.http.get("/v1/payments", params=params) as resp:
        assert resp.status == 422
        problem = await resp.json(content_type=None)
    assert field in [error["field"] for error in problem["errors"]]


async def test_health_endpoints(api: RunningApi) -> None:
    async with api.http.get("/livez") as resp:
        assert resp.status == 200
    async with api.http.get("/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["database"] == "ok"
