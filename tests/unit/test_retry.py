"""The retry policy (app.domain.retry): backoff, jitter, attempt budget, key retention."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.retry import RETENTION_SAFETY, RetryPolicy
from tests.unit.generated import GENERATED

CREATED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RETENTION = timedelta(hours=24)


def policy(
    *, max_attempts: int = 5, base: float = 0.2, cap: float = 10.0, retention: timedelta = RETENTION
) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=max_attempts, base_delay=base, max_delay=cap, retention=retention
    )


class NoJitter(random.Random):
    """The top of the jitter range: the delay is the un-jittered backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowestJitter(random.Random):
    """The bottom of the jitter range."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_the_first_retry_waits_the_base_delay() -> None:
    assert policy(base=0.2).delay(1, NoJitter()) == pytest.approx(0.2)


def test_the_delay_doubles_with_each_attempt() -> None:
    delays = [policy(base=0.2, cap=1000).delay(n, NoJitter()) for n in range(1, 7)]

    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4])


def test_the_delay_never_exceeds_the_cap() -> None:
    retry = policy(base=0.2, cap=10.0)

    assert [retry.delay(n, NoJitter()) for n in (7, 8, 20, 60)] == pytest.approx([10.0] * 4)


def test_zero_or_negative_attempts_wait_the_base_delay() -> None:
    retry = policy(base=0.5)

    assert retry.delay(0, NoJitter()) == pytest.approx(0.5)
    assert retry.delay(-3, NoJitter()) == pytest.approx(0.5)


def test_jitter_never_goes_below_half_the_backoff() -> None:
    assert policy(base=0.2, cap=1000).delay(4, LowestJitter()) == pytest.approx(0.8)


def test_the_same_seed_gives_the_same_delays() -> None:
    retry = policy()

    first = [retry.delay(n, random.Random(42)) for n in range(1, 10)]
    second = [retry.delay(n, random.Random(42)) for n in range(1, 10)]

    assert first == second


def test_jitter_spreads_a_burst_of_retries() -> None:
    rng = random.Random(7)

    delays = {policy(base=1.0).delay(3, rng) for _ in range(50)}

    assert len(delays) > 40
    assert all(2.0 <= d <= 4.0 for d in delays)


def test_without_a_random_source_the_delay_is_still_within_the_jitter_bounds() -> None:
    delay = policy(base=1.0, cap=100).delay(2)

    assert 1.0 <= delay <= 2.0


@GENERATED
@given(
    attempts=st.integers(min_value=-5, max_value=1000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=600),
    seed=st.integers(),
)
def test_every_delay_is_half_to_all_of_the_capped_backoff(
    attempts: int, base: float, cap: float, seed: int
) -> None:
    backoff = min(cap, base * 2.0 ** max(0, attempts - 1))

    delay = policy(base=base, cap=cap).delay(attempts, random.Random(seed))

    assert backoff * 0.5 <= delay <= backoff


def test_a_very_large_attempt_count_waits_the_cap() -> None:
    # max_attempts has no upper bound in Settings, so attempt 1025 can happen in a deployment.
    assert policy(max_attempts=5000, cap=10.0).delay(1025, NoJitter()) == pytest.approx(10.0)


# --- attempt budget and key retention -------------------------------------------------------


def test_a_payment_within_budget_and_retention_is_sent_again() -> None:
    now = CREATED + timedelta(minutes=5)

    assert not policy(max_attempts=5).should_park(4, CREATED, now)


def test_a_payment_that_used_its_attempt_budget_goes_to_reconciliation() -> None:
    now = CREATED + timedelta(minutes=5)

    assert policy(max_attempts=5).should_park(5, CREATED, now)
    assert policy(max_attempts=5).should_park(6, CREATED, now)


def test_a_payment_older_than_the_safe_share_of_key_retention_is_never_re_sent() -> None:
    retry = policy(max_attempts=100)
    horizon = RETENTION * RETENTION_SAFETY

    assert not retry.too_old(CREATED, CREATED + horizon)
    assert retry.too_old(CREATED, CREATED + horizon + timedelta(microseconds=1))
    assert retry.should_park(1, CREATED, CREATED + horizon + timedelta(seconds=1))


def test_the_retention_horizon_leaves_a_safety_margin_before_the_provider_forgets() -> None:
    retry = policy(retention=timedelta(hours=24))
    just_inside_provider_memory = CREATED + timedelta(hours=23)

    assert 0 < RETENTION_SAFETY < 1
    assert retry.too_old(CREATED, just_inside_provider_memory)


def test_a_fresh_payment_is_not_too_old_even_with_a_clock_slightly_behind() -> None:
    assert not policy().too_old(CREATED, CREATED - timedelta(seconds=2))
