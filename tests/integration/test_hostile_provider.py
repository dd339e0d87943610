"""The dispatch side against a hostile provider: a real HTTP server that answers a payment's
first attempts unusually — a text body, no id, a redirect, a proxy's 401/403/404/408, 429s,
a 500 or a reset *after* charging, a body that never ends, a charge for another amount,
currency or key, JSON nested past any decoder — and then behaves.

Whatever it answers, the outcome recorded is never wrong: a payment is ``failed`` only when
the provider said the request is invalid (400/422), ``succeeded`` only with exactly one
matching charge in the provider's ledger, nothing is charged twice and nothing is left
pending or in flight. Real Postgres, real HTTP, real fence; the test plays the elector.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.domain.payment import PaymentRequest
from app.settings import Settings, load_settings
from app.store.claims import LeaderLane
from app.store.ingest import IngestStore
from tests.conftest import TEST_API_KEY
from tests.support.hostile import (
    Anomaly,
    HostileProvider,
    first_attempt,
    hostile_provider,
    sequences,
)
from tests.support.leading import leading

SETTLE_WITHIN = 60.0
UNSETTLED = ("pending", "in_flight")


def dispatch_settings(database_url: str, provider_url: str) -> Settings:
    return load_settings(
        database_url=database_url,
        provider_url=provider_url,
        node_id="hostile-test",
        api_keys=TEST_API_KEY,
        provider_timeout=1.0,
        retry_base_delay=0.02,
        retry_max_delay=0.2,
        max_attempts=50,
        reconcile_interval=0.2,
        dispatch_poll_interval=0.05,
    )


async def enqueue(settings: Settings, references: Sequence[str], amount: int = 1234) -> None:
    # The ingest path a replica uses (app.store.ingest), on a small pool of its own.
    ingest = IngestStore(settings.database_url, size=2, timeout=settings.db_timeout)
    await ingest.open()
    try:
        for reference in references:
            request = PaymentRequest(amount=amount, currency="EUR", reference=reference)
            await ingest.enqueue(f"client-{reference}", request, request.fingerprint())
    finally:
        await ingest.close()


async def rows(db: asyncpg.Connection, references: Sequence[str]) -> list[dict[str, Any]]:
    found = await db.fetch(
        "SELECT * FROM payments WHERE reference = ANY($1::text[]) ORDER BY id", list(references)
    )
    return [dict(row) for row in found]


async def settle(db: asyncpg.Connection, references: Sequence[str]) -> list[dict[str, Any]]:
    """Wait until no payment is pending or in flight, then one more sweep interval."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        current = await rows(db, references)
        if all(row["status"] not in UNSETTLED for row in current):
            await asyncio.sleep(0.5)  # let a sweep look at what was parked
            return await rows(db, references)
        if time.monotonic() > deadline:
            stuck = [(r["reference"], r["status"], r["last_error"]) for r in current]
            raise AssertionError(f"not settled within {SETTLE_WITHIN}s: {stuck}")
        await asyncio.sleep(0.1)


def assert_never_wrong(
    provider: HostileProvider, settled: list[dict[str, Any]], final: set[str]
) -> None:
    """The properties that must hold whatever the provider answered.

    ``final`` are the references whose request the provider rejected as invalid (400/422).
    """
    for row in settled:
        key = row["provider_key"]
        charges = [c for c in provider.charges if c["idempotency_key"] == key]
        where = f"payment {row['id']} ({row['reference']}): {row['status']}, {row['last_error']}"
        assert row["status"] not in UNSETTLED, where
        assert len(charges) <= 1, f"charged twice: {where}"
        if row["status"] == "failed":
            assert row["reference"] in final, f"failed without a 400/422: {where}"
            assert charges == [], where
        if row["status"] == "succeeded":
            assert len(charges) == 1, f"succeeded with no charge of its own: {where}"
            (charge,) = charges
            assert row["provider_charge_id"] == charge["id"], where
            assert (charge["amount"], charge["currency"]) == (row["amount"], row["currency"])
            assert charge["metadata"] == {"payment_id": str(row["id"])}, where
        if charges and row["status"] != "succeeded":
            # A charge was made: the only honest ends are succeeded, or parked for a human
            # to look up (never failed, never forgotten).
            assert row["status"] == "needs_reconciliation", where
    keys = [c["idempotency_key"] for c in provider.charges]
    assert len(keys) == len(set(keys)), "the provider saw one key charged twice"


# What each anomaly on the first attempt must end as, once the provider behaves again.
EXPECTED = {
    **{a: "succeeded" for a in Anomaly if not a.final},
    Anomaly.OTHER_AMOUNT: "needs_reconciliation",
    Anomaly.OTHER_CURRENCY: "needs_reconciliation",
    Anomaly.OTHER_KEY: "needs_reconciliation",
    Anomaly.INVALID_400: "failed",
    Anomaly.INVALID_422: "failed",
    Anomaly.INVALID_NUL_TEXT: "failed",
}


async def test_every_anomaly_on_a_first_attempt_ends_in_the_one_honest_state(
    database_url: str, db: asyncpg.Connection
) -> None:
    plan = {f"{anomaly.value}-{n}": anomaly for anomaly in Anomaly for n in range(3)}
    async with hostile_provider(first_attempt(plan)) as provider:
        settings = dispatch_settings(database_url, provider.url)
        await enqueue(settings, list(plan))
        async with leading(settings, token=1):
            settled = await settle(db, list(plan))
    final = {ref for ref, anomaly in plan.items() if anomaly.final}
    assert_never_wrong(provider, settled, final)
    ends = {row["reference"]: row["status"] for row in settled}
    assert ends == {ref: EXPECTED[anomaly] for ref, anomaly in plan.items()}
    for row in settled:
        if EXPECTED[plan[row["reference"]]] == "needs_reconciliation":
            assert "does not match" in (row["last_error"] or ""), row


async def test_a_redirect_is_never_followed(database_url: str, db: asyncpg.Connection) -> None:
    plan = {"r302": Anomaly.REDIRECT_302, "r307": Anomaly.REDIRECT_307}
    async with hostile_provider(first_attempt(plan)) as provider:
        settings = dispatch_settings(database_url, provider.url)
        await enqueue(settings, list(plan))
        async with leading(settings, token=1):
            await settle(db, list(plan))
    assert [what for _, _, what in provider.answered].count("redirect_307") == 1
    assert provider.fake_success_calls == 0, "the client followed a redirect"


ANOMALIES = st.sampled_from([*Anomaly, None])


@hypothesis_settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plans=st.lists(st.lists(ANOMALIES, max_size=4), min_size=1, max_size=6))
async def test_generated_answer_sequences_never_end_wrong(
    database_url: str, db: asyncpg.Connection, plans: list[list[Anomaly | None]]
) -> None:
    run = uuid.uuid4().hex[:8]
    by_ref: dict[str, list[Anomaly | None]] = {}
    for n, steps in enumerate(plans):
        # An invalid answer is final: a real provider says it again on every attempt.
        cut = next((i for i, a in enumerate(steps) if a is not None and a.final), None)
        by_ref[f"{run}-{n}"] = steps if cut is None else [*steps[: cut + 1]] * 5
    final = {ref for ref, steps in by_ref.items() if any(a and a.final for a in steps)}
    async with hostile_provider(sequences(by_ref)) as provider:
        settings = dispatch_settings(database_url, provider.url)
        await enqueue(settings, list(by_ref))
        async with leading(settings, token=int(time.time() * 1000)):
            settled = await settle(db, list(by_ref))
    assert_never_wrong(provider, settled, final)


async def calls_in_flight(
    database_url: str, db: asyncpg.Connection, *, payments: int, **overrides: Any
) -> tuple[int, int]:
    """Drain ``payments`` through a provider that answers every charge after 0.2 s. Returns
    the most calls it had in flight before its first answer (the new leader's first wave)
    and the most at any time; every payment must end succeeded, once."""
    references = [f"slow-{uuid.uuid4().hex[:8]}-{n}" for n in range(payments)]
    async with hostile_provider(lambda body, attempt: None) as provider:
        provider.latency = 0.2
        settings = dispatch_settings(database_url, provider.url).model_copy(update=overrides)
        await enqueue(settings, references)
        async with leading(settings, token=1):
            settled = await settle(db, references)
    assert_never_wrong(provider, settled, final=set())
    assert {row["status"] for row in settled} == {"succeeded"}
    assert provider.first_answer_at is not None
    first_wave = max(n for at, n in provider.arrivals if at < provider.first_answer_at)
    return first_wave, max(n for _, n in provider.arrivals)


async def test_a_new_leader_ramps_up_to_more_calls_in_flight_while_the_backlog_lasts(
    database_url: str, db: asyncpg.Connection
) -> None:
    # The defaults: 16 ramping to 256 over 4 s. A backlog of 600 at 0.2 s a call lasts
    # past the second doubling, however fast the box (~2.5 s at best).
    _, most = await calls_in_flight(
        database_url, db, payments=600, dispatch_concurrency=256, dispatch_batch_size=128
    )
    assert most > 64


@pytest.mark.parametrize(
    ("ramp_seconds", "fewest", "most"),
    [
        # Stretched so that however late the provider's first answer comes, the limit is
        # still the initial 16: the first wave holds exactly that.
        (600.0, 16, 16),
        # No ramp: the first wave fills the configured limit (all of it, unless the first
        # answer comes back before the last call is sent).
        (0.0, 17, 100),
    ],
)
async def test_a_new_leaders_first_wave_holds_the_initial_limit_unless_there_is_no_ramp(
    database_url: str, db: asyncpg.Connection, ramp_seconds: float, fewest: int, most: int
) -> None:
    first_wave, _ = await calls_in_flight(
        database_url,
        db,
        payments=200,
        dispatch_concurrency=100,
        dispatch_batch_size=100,
        dispatch_initial_concurrency=16,
        dispatch_ramp_seconds=ramp_seconds,
    )
    assert fewest <= first_wave <= most


async def test_an_idle_term_does_not_poll_the_queue_while_it_ramps_up(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty queue and no poll to speak of (30 s): the ramp wakes a claim loop that has
    # no room for its next claim, never one that found the queue empty. (A first version
    # woke every 5 ms for the whole ramp and claimed nothing, ~100 times a second.)
    claims = 0
    claim = LeaderLane.claim

    async def counted(lane: LeaderLane, *, limit: int, horizon: float, timeout: float) -> Any:
        nonlocal claims
        claims += 1
        return await claim(lane, limit=limit, horizon=horizon, timeout=timeout)

    monkeypatch.setattr(LeaderLane, "claim", counted)
    async with hostile_provider(lambda body, attempt: None) as provider:
        settings = dispatch_settings(database_url, provider.url).model_copy(
            update={"dispatch_poll_interval": 30.0}
        )
        async with leading(settings, token=1):
            await asyncio.sleep(1.5)  # inside the 4 s ramp
    # The lane's readying claim of 0 and the claim after LISTEN connects; a few to spare.
    assert claims <= 5
