"""The slow start of a term's in-flight limit (app.domain.concurrency). Pure: simulated
clocks only."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.concurrency import SlowStart
from tests.unit.generated import GENERATED

START = 1000.0


def ramp(initial: int = 16, ceiling: int = 256, seconds: float = 4.0) -> SlowStart:
    return SlowStart(initial=initial, ceiling=ceiling, ramp=seconds, started=START)


def test_a_term_opens_at_the_initial_limit_and_doubles_every_second_of_a_4_s_ramp() -> None:
    slow = ramp()  # 16 -> 256 is four doublings over 4 s: one per second
    assert slow.limit(START) == 16
    assert slow.limit(START + 1.0) == 32
    assert slow.limit(START + 2.0) == 64
    assert slow.limit(START + 3.5) in range(180, 182)  # 16 * 2 ** 3.5 = 181.0
    assert slow.limit(START + 4.0) == 256
    assert slow.limit(START + 3600.0) == 256


@pytest.mark.parametrize(
    ("initial", "ceiling", "seconds"), [(256, 256, 4.0), (500, 256, 4.0), (16, 256, 0.0)]
)
def test_no_ramp_when_the_initial_limit_reaches_the_ceiling_or_the_ramp_is_zero(
    initial: int, ceiling: int, seconds: float
) -> None:
    slow = ramp(initial, ceiling, seconds)
    assert slow.limit(START) == slow.limit(START + 0.5) == ceiling


@pytest.mark.parametrize(
    ("initial", "ceiling", "seconds", "message"),
    [
        (0, 256, 4.0, "at least 1"),
        (16, 0, 4.0, "at least 1"),
        (16, 256, -1.0, "duration"),
        (16, 256, math.nan, "duration"),
        (16, 256, math.inf, "duration"),
    ],
)
def test_limits_and_ramps_that_mean_nothing_are_refused(
    initial: int, ceiling: int, seconds: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ramp(initial, ceiling, seconds)


def test_a_clock_reading_before_the_start_or_not_a_number_gives_the_initial_limit() -> None:
    slow = ramp()
    assert slow.limit(START - 50.0) == 16
    assert slow.limit(math.nan) == 16
    assert slow.limit(-math.inf) == 16
    assert slow.limit(math.inf) == 256


@GENERATED
@given(
    st.integers(1, 1000),
    st.integers(1, 1000),
    st.floats(0, 600),
    st.lists(st.floats(-10, 700), min_size=2, max_size=50),
)
def test_the_limit_never_falls_as_time_passes_and_stays_within_its_bounds(
    initial: int, ceiling: int, seconds: float, offsets: list[float]
) -> None:
    slow = ramp(initial, ceiling, seconds)
    limits = [slow.limit(START + offset) for offset in sorted(offsets)]
    assert limits == sorted(limits)
    for limit in limits:
        assert min(initial, ceiling) <= limit <= ceiling


@GENERATED
@given(st.integers(1, 64), st.integers(65, 1000), st.floats(0.5, 60), st.floats(0, 1))
def test_the_limit_never_runs_ahead_of_an_even_exponential_ramp(
    initial: int, ceiling: int, seconds: float, share: float
) -> None:
    slow = ramp(initial, ceiling, seconds)
    at = START + share * seconds
    even = initial * (ceiling / initial) ** share
    assert int(even * (1 - 1e-9)) <= slow.limit(at) <= even * (1 + 1e-9)


@GENERATED
@given(st.integers(1, 64), st.integers(65, 1000), st.floats(0.5, 60), st.integers(1, 1100))
def test_reaches_names_the_moment_the_limit_gets_there(
    initial: int, ceiling: int, seconds: float, wanted: int
) -> None:
    slow = ramp(initial, ceiling, seconds)
    at = slow.reaches(wanted)
    if wanted > ceiling:
        assert at == math.inf
        return
    assert START <= at <= START + seconds
    # A millisecond on, the limit is there (float rounding may need that much); a
    # millisecond before a later moment than the start, it was not yet.
    assert slow.limit(at + 1e-3) >= wanted
    if at - 1e-3 > START:
        assert slow.limit(at - 1e-3) < wanted


@GENERATED
@given(
    initial=st.integers(1, 1000),
    ceiling=st.integers(1, 1000),
    seconds=st.floats(0, 600),
    over=st.integers(1, 1000),
)
def test_no_limit_above_the_ceiling_is_ever_reached(
    initial: int, ceiling: int, seconds: float, over: int
) -> None:
    # A claim loop with no room waits for records, not for the ramp: a flat ramp (no ramp
    # configured, or an initial limit at the ceiling) once answered "already" here, and a
    # full loop woke every 5 ms.
    slow = SlowStart(initial=initial, ceiling=ceiling, ramp=seconds, started=START)
    assert slow.reaches(ceiling + over) == math.inf
