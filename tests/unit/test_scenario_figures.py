"""The figures a scenario report derives from its samples (load/scenario.py), on planted
samples: the longest charging gap, queue depth, and each fault's backlog and token changes."""

from __future__ import annotations

from load.scenario import (
    Failover,
    Sample,
    failover_figures,
    fault_spans,
    longest_charging_gap,
    queue_depth_figures,
)


def sample(t: float, charged: int, depth: int, token: int | None = 1) -> Sample:
    return Sample(t, "n1", token, accepted=charged + depth, charged=charged, queue_depth=depth)


def test_the_longest_gap_counts_only_seconds_with_a_queue_and_no_charge() -> None:
    samples = [
        sample(0, 0, 5),
        sample(1, 10, 5),
        sample(2, 10, 8),  # stalled from t=1
        sample(3, 10, 12),
        sample(4, 20, 3),  # moving again: the gap was 1 → 3
        sample(5, 20, 0),
        sample(9, 20, 0),  # nothing queued: idle, not a gap
    ]

    assert longest_charging_gap(samples) == 2.0


def test_no_samples_and_a_steady_run_have_no_gap() -> None:
    assert longest_charging_gap([]) == 0.0
    assert longest_charging_gap([sample(t, 10 * t, 3) for t in range(10)]) == 0.0


def test_queue_depth_figures_give_the_maximum_and_p99() -> None:
    figures = queue_depth_figures([sample(t, t, t) for t in range(101)])

    assert figures["max"] == 100
    assert 98 <= figures["p99"] <= 100
    assert queue_depth_figures([]) == {"max": 0.0, "p99": 0.0}


def test_a_faults_figures_count_token_changes_and_the_time_to_drain() -> None:
    samples = [
        sample(0, 0, 2, token=3),
        sample(1, 5, 2, token=3),
        sample(2, 5, 40, token=None),  # no leader observed
        sample(3, 5, 90, token=4),
        sample(4, 60, 30, token=4),
        sample(6, 120, 2, token=4),  # back to the depth before the fault
    ]
    fault = Failover("kill", at=1.5, old_token=3, seconds=1.7, new_token=4)

    figures = failover_figures(fault, samples)

    assert figures["token_changes"] == 1
    assert figures["backlog_peak"] == 90
    assert figures["drain_s"] == 4.5
    assert figures["error"] is None


def test_a_backlog_never_drained_is_reported_as_such() -> None:
    samples = [sample(0, 0, 2), sample(1, 0, 50), sample(2, 0, 80)]

    assert failover_figures(Failover("stop", 0.5, 1, None), samples)["drain_s"] is None


def test_the_backlog_drains_to_the_usual_depth_before_the_fault_not_to_one_sample() -> None:
    # Under load the depth moves between samples; the fault struck at a low moment (3).
    usual = [sample(t / 2, 10 * t, depth) for t, depth in enumerate([20, 25, 18, 22, 3])]
    after = [
        sample(2.5, 50, 300, token=2),
        sample(3.0, 50, 400, token=2),
        sample(4.0, 90, 120, token=2),
        sample(5.5, 130, 19, token=2),  # back to its usual ~20, after the window
        sample(6.5, 170, 4, token=2),  # still above the single sample at the fault (3)
    ]
    fault = Failover("kill", at=2.1, old_token=1, seconds=0.1, new_token=2)

    figures = failover_figures(fault, usual + after)

    assert figures["drain_s"] == 3.4
    assert figures["backlog_peak"] == 400


def test_only_the_ten_seconds_before_the_fault_set_the_usual_depth() -> None:
    # A deep queue 30 s earlier (another fault's backlog) does not lower the bar.
    samples = [
        *[sample(t, 0, 500) for t in range(10)],
        *[sample(t, 10 * t, 4) for t in range(25, 31)],
        sample(31, 300, 200, token=2),
        sample(34, 600, 60, token=2),
        sample(35, 700, 4, token=2),
    ]
    fault = Failover("term", at=30.5, old_token=1, seconds=0.1, new_token=2)

    assert failover_figures(fault, samples)["drain_s"] == 4.5


def test_a_stall_that_begins_after_the_window_is_still_the_faults_until_the_next_one() -> None:
    # An etcd member loss at 1.0: charging goes on, then stops at 4.5 (its leases ran out)
    # and two new leaders follow, all after its 3 s window; the next fault comes at 20.
    samples = [
        sample(0.0, 0, 5),
        *[sample(t, int(100 * t), 5) for t in (1.5, 2.0, 3.0, 4.0, 4.5)],
        sample(5.5, 450, 200),
        sample(6.5, 450, 400, token=2),
        sample(7.5, 450, 600, token=3),
        sample(8.0, 700, 300, token=3),
        sample(9.0, 1000, 5, token=3),
    ]
    fault = Failover("etcd-member", at=1.0, old_token=1, seconds=0.03, new_token=1)

    within_window = failover_figures(fault, samples)
    until_next = failover_figures(fault, samples, until=20.0)

    assert within_window["token_changes"] == 0
    assert within_window["charging_gap_s"] == 0.0
    assert until_next["token_changes"] == 2
    assert until_next["charging_gap_s"] == 3.0  # 4.5 → 7.5: charged did not move
    # The backlog is looked for from the end of its window either way, not from the next
    # fault: at the usual depth (5) at 4.0, 3.0 s after the fault.
    assert within_window["drain_s"] == until_next["drain_s"] == 3.0


def test_each_faults_span_ends_where_the_next_one_strikes() -> None:
    faults = [Failover("kill", 10.0, 1, 0.1), Failover("stop", 20.0, 2, 2.0)]

    assert fault_spans(faults) == [20.0, float("inf")]
    assert fault_spans([]) == []
