"""The validity arithmetic of a leadership term, on a fake clock: a leader trusts itself only
until the send time of its last confirmed lease refresh + TTL - margin."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.errors import (
    DatabaseUnavailable,
    EtcdUnavailable,
    LeadershipLost,
    StaleLeader,
    TerminalStateViolation,
)
from app.leadership.elector import step_down_reason
from app.leadership.term import Term


@dataclass
class FakeLease:
    last_ok_sent: float
    lost_reason: str | None = None


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def make_term(clock: FakeClock, lease: FakeLease, ttl: float = 2.0, margin: float = 0.5) -> Term:
    return Term(
        token=7, key="k", lease_id=1, node_id="n", lease=lease, ttl=ttl, margin=margin, clock=clock
    )


def test_deadline_is_last_refresh_send_time_plus_ttl_minus_margin() -> None:
    clock = FakeClock(100.0)
    term = make_term(clock, FakeLease(last_ok_sent=99.0))
    assert term.deadline == pytest.approx(99.0 + 2.0 - 0.5)
    assert term.remaining() == pytest.approx(0.5)


def test_a_confirmed_refresh_moves_the_deadline_from_its_send_time() -> None:
    clock = FakeClock(100.0)
    lease = FakeLease(last_ok_sent=99.0)
    term = make_term(clock, lease)
    lease.last_ok_sent = 100.0  # a refresh sent now was confirmed
    clock.now = 101.0
    assert term.remaining() == pytest.approx(0.5)
    assert term.renewed_ago() == pytest.approx(1.0)


def test_a_term_is_valid_until_its_deadline_and_not_an_instant_after() -> None:
    clock = FakeClock(100.0)
    term = make_term(clock, FakeLease(last_ok_sent=100.0))
    clock.now = 101.499
    term.ensure_valid()
    clock.now = 101.5
    with pytest.raises(LeadershipLost, match="validity deadline passed"):
        term.ensure_valid()


def test_a_lost_lease_ends_validity_at_once_whatever_the_clock_says() -> None:
    clock = FakeClock(100.0)
    term = make_term(clock, FakeLease(last_ok_sent=100.0, lost_reason="lease 1 is gone"))
    assert term.remaining() > 0
    with pytest.raises(LeadershipLost, match="lease 1 is gone"):
        term.ensure_valid()


def test_a_blocked_loop_that_wakes_past_the_deadline_finds_its_term_over() -> None:
    clock = FakeClock(100.0)
    term = make_term(clock, FakeLease(last_ok_sent=100.0))
    clock.now += 30.0  # the event loop was blocked; no refresh was confirmed meanwhile
    assert term.remaining() < 0
    with pytest.raises(LeadershipLost):
        term.call_timeout(5.0)


@pytest.mark.parametrize(
    ("now", "cap", "expected"),
    [
        (100.0, 5.0, 1.49),  # capped by the validity left (minus 10 ms)
        (100.0, 0.2, 0.2),  # capped by the caller's own bound
        (101.495, 5.0, 0.001),  # almost no time left: a token timeout, never zero
    ],
)
def test_call_timeouts_never_outlast_the_validity_left(
    now: float, cap: float, expected: float
) -> None:
    clock = FakeClock(now)
    term = make_term(clock, FakeLease(last_ok_sent=100.0))
    assert term.call_timeout(cap) == pytest.approx(expected)


def test_a_term_is_not_acting_until_its_subscriber_takes_it_up() -> None:
    term = make_term(FakeClock(), FakeLease(last_ok_sent=100.0))
    assert term.acting is False
    term.begin_acting()
    assert term.acting is True


def test_elected_at_comes_from_the_injected_clock() -> None:
    assert make_term(FakeClock(42.0), FakeLease(last_ok_sent=42.0)).elected_at == 42.0


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (LeadershipLost(), "lost"),
        (StaleLeader(), "fenced"),
        (EtcdUnavailable(), "etcd_unavailable"),
        (DatabaseUnavailable(), "database_unavailable"),
        (TimeoutError(), "timeout"),
        (TerminalStateViolation(), "unexpected_error"),
        (RuntimeError("boom"), "unexpected_error"),
    ],
)
def test_each_way_a_term_ends_is_counted_under_its_own_reason(
    error: BaseException, reason: str
) -> None:
    assert step_down_reason(error) == reason


def test_a_lost_term_is_invalid_at_once_though_its_lease_still_renews() -> None:
    clock = FakeClock()
    lease = FakeLease(last_ok_sent=clock.now)
    term = make_term(clock, lease)
    term.ensure_valid()
    term.lose("the leader key was deleted")
    lease.last_ok_sent = clock.now  # the keep-alive goes on succeeding
    assert term.remaining() == 0
    with pytest.raises(LeadershipLost, match="leader key was deleted"):
        term.ensure_valid()
    with pytest.raises(LeadershipLost):
        term.call_timeout(1.0)
