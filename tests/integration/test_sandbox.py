"""The stand-in provider, driven over HTTP as a real child process.

Every test reads the outcome back from the provider's own ledger endpoint: the property that
matters is how many charges exist per idempotency key, not what one response said.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from app.sandbox import SandboxConfigError, load_sandbox_settings
from app.stack.sandbox_process import (
    SandboxProcess,
    start_sandbox_process,
    stop_sandbox_process,
)

StartSandbox = Callable[..., Awaitable[SandboxProcess]]
PROBLEM_JSON = "application/problem+json"


@pytest.fixture
async def start_sandbox(tmp_path: Path) -> AsyncIterator[StartSandbox]:
    """Start providers in ``tmp_path``; every one is stopped (or killed) at teardown."""
    started: list[asyncio.subprocess.Process] = []

    async def start(**settings: Any) -> SandboxProcess:
        sandbox = await start_sandbox_process(tmp_path, **settings)
        started.append(sandbox.process)
        return sandbox

    yield start
    for process in started:
        await stop_sandbox_process(process, timeout=5.0)
        assert process.returncode is not None


@pytest.fixture(scope="module")
async def shared_sandbox(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SandboxProcess]:
    """One fault-free provider for tests that only need fresh keys."""
    sandbox = await start_sandbox_process(tmp_path_factory.mktemp("shared-provider"))
    yield sandbox
    await stop_sandbox_process(sandbox.process, timeout=5.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with a bound on every request, so a hung provider fails the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Answer:
    """Status, headers and JSON body of one response."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"


async def post_charge(
    http: aiohttp.ClientSession,
    base_url: str,
    key: str | None,
    body: Any = None,
    *,
    raw: bytes | None = None,
    timeout: float | None = None,
) -> Answer:
    """POST /v1/charges with ``body`` as JSON (or ``raw`` bytes) and ``key`` as header."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
    async with http.post(f"{base_url}/v1/charges", headers=headers, **kwargs) as response:
        # Case-insensitive, as HTTP header names are (the provider sends them in lower case).
        return Answer(response.status, CIMultiDict(response.headers), await response.json())


def charge_body(
    amount: int = 1000, currency: str = "EUR", reference: str | None = "order-1"
) -> Any:
    return {"amount": amount, "currency": currency, "reference": reference}


async def ledger(
    http: aiohttp.ClientSession, base_url: str, **query: str | int
) -> list[dict[str, Any]]:
    """Every charge in the ledger (following pagination), optionally filtered."""
    charges: list[dict[str, Any]] = []
    after = 0
    while True:
        params = {"after": after, "limit": 1000, **query}
        async with http.get(f"{base_url}/v1/charges", params=params) as response:
            assert response.status == 200
            page = await response.json()
        charges.extend(page["data"])
        if not page["has_more"]:
            return charges
        after = page["next_after"]


async def stats(http: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with http.get(f"{base_url}/v1/stats") as response:
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


# --- idempotency --------------------------------------------------------------------------


async def test_charge_then_replay_returns_the_same_charge_once(
    shared_sandbox: SandboxProcess, http: aiohttp.ClientSession
) -> None:
    base = shared_sandbox.base_url
    first = await post_charge(http, base, "replay-1", charge_body(reference="replay-ref"))
    again = await post_charge(http, base, "replay-1", charge_body(reference="replay-ref"))

    assert first.status == 201
    assert not first.replayed
    assert first.body["status"] == "succeeded"
    assert re.fullmatch(r"ch_[0-9a-f]{24}", first.body["id"])
    assert first.body["idempotency_key"] == "replay-1"
    assert again.status == 201
    assert again.replayed
    assert again.body == first.body
    rows = await ledger(http, base, idempotency_key="replay-1")
    assert [row["id"] for row in rows] == [first.body["id"]]
    async with http.get(f"{base}/v1/charges/{first.body['id']}") as response:
        assert response.status == 200
        assert await response.json() == first.body


async def test_same_key_with_different_parameters_is_422(
    shared_sandbox: SandboxProcess, http: aiohttp.ClientSession
) -> None:
    base = shared_sandbox.base_url
    first = await post_charge(http, base, "mismatch-1", charge_body(amount=500))
    other = await post_charge(http, base, "mismatch-1", charge_body(amount=501))
    other_currency = await post_charge(http, base, "mismatch-1", charge_body(currency="USD"))

    assert first.status == 201
    assert other.status == 422
    assert other.headers["Content-Type"].startswith(PROBLEM_JSON)
    assert [error["field"] for error in other.body["errors"]] == ["amount"]
    assert other_currency.status == 422
    assert len(await ledger(http, base, idempotency_key="mismatch-1")) == 1


async def test_concurrent_identical_requests_charge_once(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(latency_ms_min=1000, latency_ms_max=1000)).base_url
    answers = await asyncio.gather(
        *(post_charge(http, base, "same-key", charge_body()) for _ in range(10))
    )

    created = [a for a in answers if a.status == 201 and not a.replayed]
    assert len(created) == 1
    charge_id = created[0].body["id"]
    for answer in answers:
        if answer is created[0]:
            continue
        if answer.status == 409:
            assert answer.body["title"] == "Request in progress"
            assert "Retry-After" in answer.headers
        else:  # arrived after completion
            assert (answer.status, answer.replayed, answer.body["id"]) == (201, True, charge_id)
    assert any(answer.status == 409 for answer in answers)
    retry = await post_charge(http, base, "same-key", charge_body())
    assert (retry.status, retry.replayed, retry.body["id"]) == (201, True, charge_id)
    assert [row["id"] for row in await ledger(http, base)] == [charge_id]


async def test_decline_by_amount_is_402_recorded_and_replayed(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(decline_amounts=(13, 666))).base_url
    declined = await post_charge(http, base, "decline-1", charge_body(amount=666))
    replay = await post_charge(http, base, "decline-1", charge_body(amount=666))
    fine = await post_charge(http, base, "decline-2", charge_body(amount=667))

    assert declined.status == 402
    assert declined.body["status"] == "declined"
    assert declined.body["decline_code"] == "insufficient_funds"
    assert (replay.status, replay.replayed, replay.body) == (402, True, declined.body)
    assert fine.status == 201
    rows = await ledger(http, base)
    assert [(row["idempotency_key"], row["status"]) for row in rows] == [
        ("decline-1", "declined"),
        ("decline-2", "succeeded"),
    ]
    counts = await stats(http, base)
    assert (counts["charges"], counts["declines"], counts["since_start"]["replays"]) == (2, 1, 1)


async def test_decline_by_reference(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(decline_references="stolen-card,blocked")).base_url
    answer = await post_charge(http, base, "decline-ref", charge_body(reference="blocked"))
    assert (answer.status, answer.body["decline_code"]) == (402, "do_not_honor")


# --- injected faults ----------------------------------------------------------------------


async def test_dropped_response_still_charges_and_retry_replays(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(drop_rate=1.0)).base_url
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_charge(http, base, "dropped-1", charge_body())

    rows = await ledger(http, base, idempotency_key="dropped-1")
    assert len(rows) == 1
    retry = await post_charge(http, base, "dropped-1", charge_body())
    assert (retry.status, retry.replayed, retry.body["id"]) == (201, True, rows[0]["id"])
    assert (await stats(http, base))["faults"]["drop"] == 1
    assert len(await ledger(http, base)) == 1


async def test_error_rate_answers_5xx_and_charges_nothing(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(error_rate=1.0, seed=7)).base_url
    answers = [await post_charge(http, base, f"err-{n}", charge_body()) for n in range(10)]

    assert {answer.status for answer in answers} <= {500, 503}
    assert all(a.headers["Content-Type"].startswith(PROBLEM_JSON) for a in answers)
    assert await ledger(http, base) == []
    assert (await stats(http, base))["faults"]["error"] == 10


async def test_injected_conflict_is_409_without_charge(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox(conflict_rate=1.0)).base_url
    answer = await post_charge(http, base, "conflict-1", charge_body())
    assert (answer.status, answer.headers.get("X-Sandbox-Fault")) == (409, "conflict")
    assert await ledger(http, base) == []


async def test_timeout_hangs_without_charge_and_does_not_delay_shutdown(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    sandbox = await start_sandbox(timeout_rate=1.0, hang_seconds=60)
    with pytest.raises(TimeoutError):
        await post_charge(http, sandbox.base_url, "hang-1", charge_body(), timeout=0.5)
    assert await ledger(http, sandbox.base_url) == []
    assert (await stats(http, sandbox.base_url))["faults"]["timeout"] == 1
    # A request still hanging on the provider side must not hold the shutdown.
    started = time.monotonic()
    assert await stop_sandbox_process(sandbox.process, timeout=5.0) == 0
    assert time.monotonic() - started < 4.0


async def test_seeded_fault_draws_are_reproducible(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    outcomes = []
    for run in ("a", "b"):
        sandbox = await start_sandbox(
            seed=3, error_rate=0.5, decline_rate=0.5, ledger_path=tmp_path / f"{run}.sqlite3"
        )
        answers = [
            await post_charge(http, sandbox.base_url, f"seeded-{n}", charge_body())
            for n in range(20)
        ]
        outcomes.append([(a.status, a.body.get("decline_code")) for a in answers])
        await stop_sandbox_process(sandbox.process)
    assert outcomes[0] == outcomes[1]
    assert {status for status, _ in outcomes[0]} >= {201, 402}


# --- durability ---------------------------------------------------------------------------


async def test_ledger_survives_sigkill_and_restart(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await start_sandbox()
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    created = [
        await post_charge(http, sandbox.base_url, f"dur-{n}", charge_body()) for n in range(5)
    ]
    sandbox.process.send_signal(signal.SIGKILL)
    assert await sandbox.process.wait() == -signal.SIGKILL

    restarted = await start_sandbox(port=port)
    rows = await ledger(http, restarted.base_url)
    assert [row["id"] for row in rows] == [answer.body["id"] for answer in created]
    replay = await post_charge(http, restarted.base_url, "dur-3", charge_body())
    assert (replay.status, replay.replayed, replay.body) == (201, True, created[3].body)
    fresh = await post_charge(http, restarted.base_url, "dur-new", charge_body())
    assert fresh.status == 201
    assert fresh.body["sequence"] > rows[-1]["sequence"]


async def test_key_left_processing_by_a_crash_is_not_charged_and_not_blocked(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    sandbox = await start_sandbox(latency_ms_min=5000, latency_ms_max=5000)
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    in_flight = asyncio.create_task(post_charge(http, sandbox.base_url, "crash-1", charge_body()))
    deadline = time.monotonic() + 5
    while (await stats(http, sandbox.base_url))["processing"] == 0:
        assert time.monotonic() < deadline, "the request never started processing"
        await asyncio.sleep(0.02)
    sandbox.process.send_signal(signal.SIGKILL)
    with pytest.raises(aiohttp.ClientConnectionError):
        await in_flight

    restarted = await start_sandbox(port=port)
    assert await ledger(http, restarted.base_url) == []
    # The dead request's key is usable again (no 409 forever); the latency setting is gone.
    retry = await post_charge(http, restarted.base_url, "crash-1", charge_body())
    assert (retry.status, retry.replayed) == (201, False)
    assert len(await ledger(http, restarted.base_url)) == 1


# --- listing ------------------------------------------------------------------------------


async def test_pagination_returns_every_charge_exactly_once(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (await start_sandbox()).base_url
    answers = await asyncio.gather(
        *(
            post_charge(http, base, f"page-{n}", charge_body(reference=f"ref-{n % 3}"))
            for n in range(25)
        )
    )
    assert {answer.status for answer in answers} == {201}

    seen: list[dict[str, Any]] = []
    after, pages = 0, 0
    while True:
        async with http.get(f"{base}/v1/charges", params={"limit": 7, "after": after}) as response:
            page = await response.json()
        pages += 1
        assert len(page["data"]) <= 7
        seen.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert pages == 4
    assert sorted(row["id"] for row in seen) == sorted(answer.body["id"] for answer in answers)
    sequences = [row["sequence"] for row in seen]
    assert sequences == sorted(set(sequences))
    by_ref = await ledger(http, base, reference="ref-1")
    assert {row["idempotency_key"] for row in by_ref} == {f"page-{n}" for n in range(1, 25, 3)}
    async with http.get(f"{base}/v1/charges", params={"after": sequences[-1]}) as response:
        assert await response.json() == {"data": [], "has_more": False, "next_after": sequences[-1]}


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"after": "-1"}, {"after": "9" * 30}],
)
async def test_bad_list_parameters_are_400(
    shared_sandbox: SandboxProcess, http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    async with http.get(f"{shared_sandbox.base_url}/v1/charges", params=query) as response:
        assert response.status == 400
        assert response.content_type == PROBLEM_JSON
        body = await response.json()
    assert [error["field"] for error in body["errors"]] == list(query)


async def test_unknown_charge_route_and_health(
    shared_sandbox: SandboxProcess, http: aiohttp.ClientSession
) -> None:
    base = shared_sandbox.base_url
    async with http.get(f"{base}/v1/charges/ch_missing") as response:
        assert (response.status, response.content_type) == (404, PROBLEM_JSON)
    async with http.get(f"{base}/nowhere") as response:
        assert (response.status, response.content_type) == (404, PROBLEM_JSON)
    async with http.delete(f"{base}/v1/charges") as response:
        assert (response.status, response.content_type) == (405, PROBLEM_JSON)
    async with http.get(f"{base}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    too_big = b'{"amount": 1, "currency": "EUR", "reference": "' + b"x" * 70_000 + b'"}'
    answer = await post_charge(http, base, "too-big", raw=too_big)
    assert answer.status == 413
    assert answer.headers["Content-Type"].startswith(PROBLEM_JSON)


# --- bad input ----------------------------------------------------------------------------


BAD_CHARGES: list[tuple[str, str | None, Any, bytes | None, str]] = [
    ("missing key", None, charge_body(), None, "Idempotency-Key"),
    ("key too long", "k" * 256, charge_body(), None, "Idempotency-Key"),
    ("non-JSON", "bad-1", None, b"amount=5", "body"),
    ("JSON array", "bad-2", [1, 2], None, "body"),
    ("deep nesting", "bad-3", None, b"[" * 50_000, "body"),
    ("not UTF-8", "bad-4", None, b'{"amount": "\xff"}', "body"),
    ("amount 0", "bad-5", charge_body(amount=0), None, "amount"),
    ("amount as string", "bad-6", {**charge_body(), "amount": "100"}, None, "amount"),
    ("amount as bool", "bad-7", {**charge_body(), "amount": True}, None, "amount"),
    ("amount as float", "bad-8", {**charge_body(), "amount": 10.5}, None, "amount"),
    ("amount huge", "bad-9", charge_body(amount=10**30), None, "amount"),
    ("lowercase currency", "bad-10", charge_body(currency="eur"), None, "currency"),
    ("missing currency", "bad-11", {"amount": 5}, None, "currency"),
    (
        "lone surrogate",
        "bad-12",
        None,
        b'{"amount":5,"currency":"EUR","reference":"\\ud800"}',
        "reference",
    ),
]


@pytest.mark.parametrize(
    ("key", "body", "raw", "field"),
    [case[1:] for case in BAD_CHARGES],
    ids=[case[0] for case in BAD_CHARGES],
)
async def test_bad_charge_requests_are_400_problems_without_charge(
    shared_sandbox: SandboxProcess,
    http: aiohttp.ClientSession,
    key: str | None,
    body: Any,
    raw: bytes | None,
    field: str,
) -> None:
    answer = await post_charge(http, shared_sandbox.base_url, key, body, raw=raw)
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith(PROBLEM_JSON)
    assert {"type", "title", "detail", "errors"} <= answer.body.keys()
    assert field in {error["field"] for error in answer.body["errors"]}
    if key is not None:
        assert await ledger(http, shared_sandbox.base_url, idempotency_key=key) == []


async def test_extra_fields_are_accepted_and_stored(
    shared_sandbox: SandboxProcess, http: aiohttp.ClientSession
) -> None:
    body = {**charge_body(), "description": "tea", "metadata": {"cart": "7"}, "unknown": 1}
    answer = await post_charge(http, shared_sandbox.base_url, "extras-1", body)
    assert answer.status == 201
    assert (answer.body["description"], answer.body["metadata"]) == ("tea", {"cart": "7"})


# --- configuration and lifecycle ----------------------------------------------------------


def test_settings_parse_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_DECLINE_AMOUNTS", "13, 666")
    monkeypatch.setenv("PAYDISPATCH_PROVIDER_DECLINE_REFERENCES", "a,b")
    settings = load_sandbox_settings(error_rate=0.25, seed=None)
    assert settings.decline_amounts == (13, 666)
    assert settings.decline_references == ("a", "b")
    assert (settings.error_rate, settings.seed, settings.port) == (0.25, None, 8081)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"error_rate": 1.5}, "PAYDISPATCH_PROVIDER_ERROR_RATE"),
        ({"latency_ms_min": 10, "latency_ms_max": 5}, "latency_ms_max"),
        ({"decline_amounts": "1,x"}, "PAYDISPATCH_PROVIDER_DECLINE_AMOUNTS"),
        ({"port": 70000}, "PAYDISPATCH_PROVIDER_PORT"),
    ],
)
def test_invalid_settings_raise_a_config_error_naming_the_variable(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(SandboxConfigError, match=message):
        load_sandbox_settings(**overrides)


async def test_invalid_configuration_fails_start_with_a_readable_message(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="PAYDISPATCH_PROVIDER_DROP_RATE"):
        await start_sandbox_process(tmp_path, drop_rate=3)


async def test_sigterm_stops_cleanly(start_sandbox: StartSandbox) -> None:
    sandbox = await start_sandbox()
    assert await stop_sandbox_process(sandbox.process) == 0


async def test_retrying_through_mixed_faults_charges_every_key_exactly_once(
    start_sandbox: StartSandbox, http: aiohttp.ClientSession
) -> None:
    base = (
        await start_sandbox(
            seed=42,
            error_rate=0.1,
            conflict_rate=0.1,
            drop_rate=0.2,
            decline_rate=0.1,
            latency_ms_min=0,
            latency_ms_max=5,
        )
    ).base_url
    keys = [f"mixed-{n}" for n in range(200)]

    async def charge_until_definite(key: str) -> dict[str, Any]:
        for _ in range(100):
            try:
                answer = await post_charge(http, base, key, charge_body(reference=key))
            except aiohttp.ClientConnectionError:
                continue  # response lost: the same key must find the original charge
            if answer.status in (201, 402):
                return dict(answer.body)
            assert answer.status in (409, 500, 503), answer.body
        raise AssertionError(f"{key} never got a definite answer")

    final = await asyncio.gather(*(charge_until_definite(key) for key in keys))
    rows = await ledger(http, base)
    assert sorted(row["idempotency_key"] for row in rows) == sorted(keys)
    assert {row["idempotency_key"]: row["id"] for row in rows} == {
        charge["idempotency_key"]: charge["id"] for charge in final
    }
    faults = (await stats(http, base))["faults"]
    assert faults["drop"] > 0
    assert faults["error"] > 0
    assert faults["conflict"] > 0


def test_a_failing_write_in_a_group_commit_is_undone_alone(tmp_path: Path) -> None:
    """The writer commits a batch without savepoints; a job that fails sends the batch
    through again with one savepoint per job: the others land, the failing one alone is
    undone and reported."""
    from app.sandbox import ledger_sql as sql
    from app.sandbox.records import Charge, ChargeParams, NewCharge

    conn = sql.connect(tmp_path / "ledger.sqlite3", writer=True, durable=False)
    params = ChargeParams(100, "EUR", None)

    def new(key: str, charge_id: str) -> NewCharge:
        return NewCharge(charge_id, key, "succeeded", params, None, None, None, "t")

    jobs = [
        lambda c: sql.charge_at_once(new("k1", "ch_1"), c),
        # Same charge id, new key: the charges table refuses it (UNIQUE id).
        lambda c: sql.charge_at_once(new("k2", "ch_1"), c),
        lambda c: sql.charge_at_once(new("k3", "ch_3"), c),
    ]
    first, failed, third = sql.run_batch(conn, jobs)
    assert isinstance(first, Charge)
    assert isinstance(third, Charge)
    assert isinstance(failed, sql.Failed)
    charged = conn.execute("SELECT idempotency_key, id FROM charges ORDER BY idempotency_key")
    assert charged.fetchall() == [("k1", "ch_1"), ("k3", "ch_3")]
    assert conn.execute("SELECT id FROM charges ORDER BY seq").fetchall() == [("ch_1",), ("ch_3",)]
    conn.close()


def _ledger_conn(tmp_path: Path) -> Any:
    from app.sandbox import ledger_sql as sql

    return sql.connect(tmp_path / "ledger.sqlite3", writer=True, durable=False)


def test_a_key_reserved_elsewhere_is_in_progress_and_its_completion_frees_it(
    tmp_path: Path,
) -> None:
    """Another process sharing the file holds the key (latency path): a charge at once
    must not charge it; once that one completes, the key is its charge row alone."""
    from app.sandbox import ledger_sql as sql
    from app.sandbox.records import (
        AlreadyCharged,
        Charge,
        ChargeParams,
        InProgress,
        NewCharge,
        Reserved,
    )

    conn = _ledger_conn(tmp_path)
    params = ChargeParams(100, "EUR", "r")
    new = NewCharge("ch_a", "k", "succeeded", params, None, None, None, "t")
    assert isinstance(sql.run_batch(conn, [lambda c: sql.reserve("k", params, c)])[0], Reserved)

    (blocked,) = sql.run_batch(conn, [lambda c: sql.charge_at_once(new._replace(id="ch_b"), c)])
    assert blocked == InProgress(params)
    assert conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0

    (charged,) = sql.run_batch(conn, [lambda c: sql.complete(new, c)])
    assert isinstance(charged, Charge)
    assert conn.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone()[0] == 0
    (again,) = sql.run_batch(conn, [lambda c: sql.reserve("k", params, c)])
    assert isinstance(again, AlreadyCharged)
    assert again.charge.id == "ch_a"
    conn.close()


def test_a_ledger_written_by_an_earlier_version_replays_its_keys(tmp_path: Path) -> None:
    """Earlier versions kept a 'completed' key row beside each charge: such a key replays
    its charge, whether asked at once or through a reservation."""
    from app.sandbox import ledger_sql as sql
    from app.sandbox.records import AlreadyCharged, ChargeParams, NewCharge

    conn = _ledger_conn(tmp_path)
    params = ChargeParams(100, "EUR", None)
    first = NewCharge("ch_old", "old-key", "succeeded", params, None, None, None, "t")
    sql.run_batch(conn, [lambda c: sql.charge_at_once(first, c)])
    conn.execute(
        "INSERT INTO idempotency_keys (key, state, amount, currency, reference, charge_id,"
        " created_at) VALUES ('old-key', 'completed', 100, 'EUR', NULL, 'ch_old', 0)"
    )
    retry = first._replace(id="ch_new")
    (at_once,) = sql.run_batch(conn, [lambda c: sql.charge_at_once(retry, c)])
    (reserved,) = sql.run_batch(conn, [lambda c: sql.reserve("old-key", params, c)])
    for outcome in (at_once, reserved):
        assert isinstance(outcome, AlreadyCharged)
        assert outcome.charge.id == "ch_old"
    assert conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 1
    conn.close()
