"""Path and query parameters (app.web.params): an id that is not a positive 63-bit integer
names no payment; a limit outside its range is a field error, never a 500."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.web.params import BIGINT_MAX, int_param, parse_id
from tests.unit.generated import GENERATED


@pytest.mark.parametrize("raw", ["1", "42", "9000", str(BIGINT_MAX)])
def test_a_positive_63_bit_id_is_parsed(raw: str) -> None:
    assert parse_id(raw) == int(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "0",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1_000",
        "1.0",
        "1e3",
        "0x10",
        "abc",
        "١٢",  # Arabic-Indic digits: str.isdigit() is true, int() would accept them
        "\uff11\uff12",  # full-width digits one, two
        "²",  # superscript two: isdigit() but not a decimal
        str(2**63),
        str(2**64),
        "9" * 20,
        "1" * 5000,
    ],
)
def test_anything_else_names_no_payment(raw: str) -> None:
    assert parse_id(raw) is None


@GENERATED
@given(st.text(max_size=40))
def test_parse_id_returns_none_or_a_positive_bigint_for_any_text(raw: str) -> None:
    value = parse_id(raw)

    assert value is None or 0 < value <= BIGINT_MAX


@GENERATED
@given(st.integers(min_value=1, max_value=BIGINT_MAX))
def test_every_valid_id_round_trips(value: int) -> None:
    assert parse_id(str(value)) == value


# --- int_param ------------------------------------------------------------------------------


def test_a_missing_parameter_takes_its_default_without_an_error() -> None:
    errors: list[dict[str, str]] = []

    assert int_param({}, "limit", 50, 1, 100, errors) == 50
    assert errors == []


@pytest.mark.parametrize("raw", ["1", "100", "37"])
def test_a_value_within_the_limits_is_taken(raw: str) -> None:
    errors: list[dict[str, str]] = []

    assert int_param({"limit": raw}, "limit", 50, 1, 100, errors) == int(raw)
    assert errors == []


@pytest.mark.parametrize("raw", ["0", "101", "-1", "+5", " 5", "", "five", "5.0", "١٢", str(2**63)])
def test_a_bad_value_is_a_field_error_and_the_default_is_used(raw: str) -> None:
    errors: list[dict[str, str]] = []

    assert int_param({"limit": raw}, "limit", 50, 1, 100, errors) == 50
    assert errors == [{"field": "limit", "message": "must be an integer from 1 to 100"}]


def test_each_bad_parameter_adds_its_own_error() -> None:
    errors: list[dict[str, str]] = []
    query = {"limit": "x", "after": "-1"}

    int_param(query, "limit", 50, 1, 100, errors)
    int_param(query, "after", 0, 0, BIGINT_MAX, errors)

    assert [error["field"] for error in errors] == ["limit", "after"]


def test_a_cursor_may_be_the_largest_bigint() -> None:
    errors: list[dict[str, str]] = []

    assert int_param({"after": str(BIGINT_MAX)}, "after", 0, 0, BIGINT_MAX, errors) == BIGINT_MAX
    assert errors == []


def test_a_cursor_of_4300_digits_is_a_field_error() -> None:
    errors: list[dict[str, str]] = []

    assert int_param({"after": "9" * 4300}, "after", 0, 0, BIGINT_MAX, errors) == 0
    assert len(errors) == 1


def test_a_cursor_of_5000_digits_is_a_field_error() -> None:
    errors: list[dict[str, str]] = []

    assert int_param({"after": "1" * 5000}, "after", 0, 0, BIGINT_MAX, errors) == 0
    assert len(errors) == 1
