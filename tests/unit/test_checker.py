"""The exactly-once checker's verdict (load.checker.compare) on planted ledgers and rows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from load.checker import Verdict, compare, dumps


def row(
    payment_id: int, status: str = "succeeded", charge_id: str | None = "auto", **extra: Any
) -> dict[str, Any]:
    """A payments row as read_payments returns it."""
    if charge_id == "auto":
        charge_id = f"ch_{payment_id}" if status in ("succeeded", "declined") else None
    return {
        "id": payment_id,
        "idempotency_key": f"pk_{payment_id}",
        "status": status,
        "provider_charge_id": charge_id,
        **extra,
    }


def charge(
    payment_id: int,
    status: str = "succeeded",
    *,
    charge_id: str | None = None,
    key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ledger charge as the provider lists it."""
    return {
        "id": charge_id or f"ch_{payment_id}",
        "status": status,
        "idempotency_key": key or f"pk_{payment_id}",
        "metadata": {"payment_id": str(payment_id)},
        **extra,
    }


def test_a_clean_run_is_exactly_once_with_every_count_right() -> None:
    payments = [row(1), row(2, "declined"), row(3, "failed")]
    ledger = [charge(1), charge(2, "declined")]

    verdict = compare(payments, ledger, acknowledged=["pk_1", "pk_2", "pk_3"])

    assert verdict.ok
    assert (verdict.accepted, verdict.charged, verdict.declined) == (3, 1, 1)
    assert verdict.by_status == {"succeeded": 1, "declined": 1, "failed": 1}
    assert verdict.examples == {}


def test_nothing_at_all_is_exactly_once() -> None:
    verdict = compare([], [])

    assert verdict.ok
    assert verdict.accepted == 0


def test_two_charges_under_one_key_are_a_duplicate() -> None:
    verdict = compare([row(1)], [charge(1), charge(1, charge_id="ch_1_again")])

    assert not verdict.ok
    assert verdict.duplicates == 1
    assert verdict.examples["duplicates"] == ["payment 1: 2 charges"]


def test_every_extra_charge_counts_as_one_duplicate() -> None:
    ledger = [charge(1, charge_id=f"ch_{n}") for n in (1, 2, 3, 4)]

    verdict = compare([row(1)], ledger)

    assert verdict.duplicates == 3


def test_a_charge_under_a_foreign_key_naming_our_payment_is_a_duplicate() -> None:
    ledger = [charge(1), charge(1, charge_id="ch_x", key="client-key-reused")]

    verdict = compare([row(1)], ledger)

    assert verdict.duplicates == 1
    assert verdict.unexpected == 0


def test_a_charge_that_belongs_to_no_payment_is_unexpected() -> None:
    stray = {"id": "ch_stray", "status": "succeeded", "idempotency_key": "nobody"}

    verdict = compare([row(1)], [charge(1), stray])

    assert not verdict.ok
    assert verdict.unexpected == 1
    assert verdict.examples["unexpected"] == ["ch_stray"]


def test_an_acknowledged_key_without_a_payment_row_is_lost() -> None:
    verdict = compare([row(1)], [charge(1)], acknowledged=["pk_1", "pk_vanished"])

    assert not verdict.ok
    assert verdict.lost == 1
    assert "pk_vanished" in verdict.examples["lost"][0]


def test_a_pending_payment_never_charged_is_stuck_and_lost() -> None:
    verdict = compare([row(1, "pending")], [])

    assert not verdict.ok
    assert (verdict.stuck, verdict.lost) == (1, 1)


@pytest.mark.parametrize("status", ["in_flight", "needs_reconciliation"])
def test_a_charged_payment_that_never_settled_is_stuck_not_lost(status: str) -> None:
    verdict = compare([row(1, status, charge_id=None)], [charge(1)])

    assert not verdict.ok
    assert (verdict.stuck, verdict.lost) == (1, 0)
    assert verdict.examples["stuck"] == [f"payment 1 is {status}"]


def test_a_succeeded_payment_without_a_ledger_charge_is_a_mismatch() -> None:
    verdict = compare([row(1)], [])

    assert not verdict.ok
    assert verdict.mismatched == 1
    assert verdict.examples["mismatched"] == ["payment 1 is succeeded with no charge"]


def test_a_failed_payment_that_was_charged_is_a_mismatch() -> None:
    verdict = compare([row(1, "failed")], [charge(1)])

    assert verdict.mismatched == 1
    assert verdict.examples["mismatched"] == ["payment 1 failed but was charged"]


def test_a_payment_recorded_succeeded_but_declined_in_the_ledger_is_a_mismatch() -> None:
    verdict = compare([row(1, "succeeded")], [charge(1, "declined")])

    assert verdict.mismatched == 1
    assert verdict.declined == 1


def test_a_payment_recording_another_charge_id_than_the_ledger_is_a_mismatch() -> None:
    verdict = compare([row(1, charge_id="ch_other")], [charge(1)])

    assert verdict.mismatched == 1
    assert "ch_other" in verdict.examples["mismatched"][0]


def test_a_charge_for_another_amount_than_the_payment_is_a_mismatch() -> None:
    verdict = compare(
        [row(1, amount=1000, currency="EUR")], [charge(1, amount=999, currency="EUR")]
    )

    assert verdict.mismatched == 1


def test_a_charge_in_another_currency_than_the_payment_is_a_mismatch() -> None:
    verdict = compare(
        [row(1, amount=1000, currency="EUR")], [charge(1, amount=1000, currency="USD")]
    )

    assert verdict.mismatched == 1


def test_examples_are_kept_to_five_per_kind_while_counts_stay_exact() -> None:
    payments = [row(n, "pending") for n in range(1, 21)]

    verdict = compare(payments, [])

    assert verdict.stuck == 20
    assert len(verdict.examples["stuck"]) == 5


def test_the_json_report_spells_out_the_verdict() -> None:
    verdict = compare([row(1)], [charge(1), charge(1, charge_id="ch_dup")])

    report = json.loads(dumps(verdict))

    assert report["exactly_once"] is False
    assert report["duplicates"] == 1
    assert report["by_status"] == {"succeeded": 1}


@pytest.mark.parametrize("bad", ["duplicates", "lost", "mismatched", "stuck", "unexpected"])
def test_any_bad_count_breaks_exactly_once(bad: str) -> None:
    verdict = Verdict(accepted=1, charged=1)
    setattr(verdict, bad, 1)

    assert not verdict.ok
    assert verdict.to_json()["exactly_once"] is False
