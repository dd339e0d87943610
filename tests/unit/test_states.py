"""Payment states (app.domain.states): the terminal set is exactly DESIGN.md's."""

from __future__ import annotations

import pytest

from app.domain.states import TERMINAL_STATES, PaymentStatus


def test_the_states_are_the_six_of_the_design() -> None:
    assert [status.value for status in PaymentStatus] == [
        "pending",
        "in_flight",
        "succeeded",
        "declined",
        "failed",
        "needs_reconciliation",
    ]


@pytest.mark.parametrize("status", ["succeeded", "declined", "failed"])
def test_a_settled_payment_is_terminal(status: str) -> None:
    assert PaymentStatus(status).is_terminal
    assert PaymentStatus(status) in TERMINAL_STATES


@pytest.mark.parametrize("status", ["pending", "in_flight", "needs_reconciliation"])
def test_a_payment_whose_outcome_is_open_is_not_terminal(status: str) -> None:
    # needs_reconciliation included: it still moves to a terminal state once looked up.
    assert not PaymentStatus(status).is_terminal


def test_states_compare_equal_to_their_database_and_json_text() -> None:
    assert str(PaymentStatus.IN_FLIGHT) == "in_flight"
    assert "in_flight" in {PaymentStatus.IN_FLIGHT}
    assert f"{PaymentStatus.NEEDS_RECONCILIATION}" == "needs_reconciliation"


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="'settled' is not a valid PaymentStatus"):
        PaymentStatus("settled")
