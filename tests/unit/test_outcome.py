"""Provider answer → outcome (app.domain.outcome), one test per answer class.

These pin the CURRENT classification. Issue 10 will change the ones marked "issue 10": per
DESIGN.md ("Payment states") only an explicit 400/422 may make a payment final (failed); every
other answer without a usable, matching charge is an unknown outcome (retry with the same key
or reconcile), never a terminal rejection.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.outcome import Charge, charge_from_ledger, classify_charge_answer, decode_body
from app.errors import RetryableProviderError, TerminalProviderError
from tests.unit.generated import GENERATED


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def classified(status: int, raw: bytes) -> Charge | RetryableProviderError | TerminalProviderError:
    """The classification, with the two typed errors returned instead of raised (any other
    exception propagates and fails the test)."""
    try:
        return classify_charge_answer(status, raw)
    except (RetryableProviderError, TerminalProviderError) as exc:
        return exc


# --- definite charges ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_2xx_with_a_charge_id_is_a_succeeded_charge(status: int) -> None:
    charge = classify_charge_answer(status, body(id="ch_1", status="succeeded"))

    assert charge == Charge("ch_1", "succeeded", None, status)


@pytest.mark.parametrize("status", [200, 201])
def test_2xx_whose_body_says_declined_is_a_declined_charge_with_its_code(status: int) -> None:
    raw = body(id="ch_2", status="declined", decline_code="insufficient_funds")

    charge = classify_charge_answer(status, raw)

    assert charge == Charge("ch_2", "declined", "insufficient_funds", status)


def test_402_with_a_charge_id_is_declined_whatever_the_body_status_says() -> None:
    charge = classify_charge_answer(402, body(id="ch_3", status="succeeded"))

    assert charge.status == "declined"
    assert charge.charge_id == "ch_3"
    assert charge.http_status == 402


def test_2xx_with_a_charge_id_but_no_status_counts_as_succeeded() -> None:
    # issue 10: a 2xx that does not say "succeeded" proves nothing; it will become unknown.
    assert classify_charge_answer(200, body(id="ch_4")).status == "succeeded"


def test_2xx_with_an_unrecognised_status_counts_as_succeeded() -> None:
    # issue 10: "pending" (or any status but succeeded/declined) will become unknown.
    assert classify_charge_answer(200, body(id="ch_5", status="pending")).status == "succeeded"


def test_amount_and_currency_in_the_answer_are_not_compared_with_the_payment() -> None:
    # issue 10 / DESIGN.md "verification": a charge whose amount or currency differs from the
    # stored payment must be an unknown outcome; today the classifier never sees the payment.
    charge = classify_charge_answer(200, body(id="ch_6", amount=1, currency="XXX"))

    assert charge.status == "succeeded"


# --- answers without a usable charge --------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 402])
def test_charge_status_without_an_id_is_a_terminal_rejection(status: int) -> None:
    # issue 10: a 2xx/402 without a charge id proves nothing; it will become unknown.
    with pytest.raises(TerminalProviderError) as raised:
        classify_charge_answer(status, body(status="succeeded"))

    assert raised.value.status == status


@pytest.mark.parametrize("charge_id", [123, None, ["ch_1"], {"id": "ch_1"}])
def test_a_charge_id_that_is_not_a_string_is_no_charge(charge_id: object) -> None:
    # issue 10: will become unknown instead of terminal.
    with pytest.raises(TerminalProviderError):
        classify_charge_answer(200, body(id=charge_id))


@pytest.mark.parametrize("status", [400, 422])
def test_400_and_422_are_terminal_rejections_carrying_the_reason(status: int) -> None:
    raw = body(title="Invalid request", detail="amount must be positive")

    with pytest.raises(TerminalProviderError, match="amount must be positive") as raised:
        classify_charge_answer(status, raw)

    assert raised.value.status == status


@pytest.mark.parametrize("status", [409, 429, 500, 502, 503, 504, 599])
def test_409_429_and_5xx_are_retryable_with_the_same_key(status: int) -> None:
    with pytest.raises(RetryableProviderError) as raised:
        classify_charge_answer(status, body(title="try again"))

    assert raised.value.status == status
    assert "try again" in str(raised.value)


def test_5xx_is_retryable_even_when_its_body_carries_a_charge_id() -> None:
    with pytest.raises(RetryableProviderError):
        classify_charge_answer(500, body(id="ch_7", status="succeeded"))


@pytest.mark.parametrize("status", [202, 204, 301, 302, 307, 401, 403, 404, 408, 410, 418])
def test_other_statuses_are_terminal_rejections_today(status: int) -> None:
    # issue 10: redirects (never followed), 401/403/404/408 from a proxy or rotated
    # credentials, and any 2xx but 200/201 will become unknown outcomes, not failed payments.
    with pytest.raises(TerminalProviderError) as raised:
        classify_charge_answer(status, body(id="ch_8", status="succeeded"))

    assert raised.value.status == status


def test_the_title_is_the_detail_when_the_body_has_no_detail() -> None:
    with pytest.raises(TerminalProviderError, match="Bad currency"):
        classify_charge_answer(400, body(title="Bad currency"))


def test_a_non_json_body_is_quoted_in_the_error_cut_to_200_bytes() -> None:
    raw = b"<html>" + b"x" * 500 + b"</html>"

    with pytest.raises(RetryableProviderError) as raised:
        classify_charge_answer(502, raw)

    message = str(raised.value)
    assert "<html>" in message
    assert "</html>" not in message
    assert message.count("x") <= 200


def test_an_undecodable_body_does_not_break_the_error_message() -> None:
    with pytest.raises(RetryableProviderError, match="provider answered 503"):
        classify_charge_answer(503, b"\xff\xfe\xfa not utf-8")


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'"ch_1"', b"null", b"42", b'["id", "ch_1"]'],
    ids=["empty", "non-json", "array", "string", "null", "number", "array-with-id"],
)
def test_200_without_a_json_object_is_no_charge(raw: bytes) -> None:
    # issue 10: will become unknown instead of terminal.
    with pytest.raises(TerminalProviderError):
        classify_charge_answer(200, raw)


def test_200_with_a_body_nested_past_the_decoder_limit_is_no_charge() -> None:
    # issue 10: will become unknown instead of terminal.
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000

    with pytest.raises(TerminalProviderError):
        classify_charge_answer(200, deep)


def test_a_charge_id_beside_deeply_nested_metadata_is_still_found() -> None:
    nested: object = "leaf"
    for _ in range(200):
        nested = {"n": nested}

    charge = classify_charge_answer(200, body(id="ch_9", status="succeeded", metadata=nested))

    assert charge.charge_id == "ch_9"


# --- decode_body ----------------------------------------------------------------------------


def test_decode_body_returns_the_json_object() -> None:
    assert decode_body(b'{"id": "ch_1", "n": [1, 2]}') == {"id": "ch_1", "n": [1, 2]}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'"text"',
        b"true",
        b"\xff\xfe",
        b"1" * 5000,  # past Python's int-from-string digit limit
        b"[" * 100_000 + b"]" * 100_000,  # past the decoder's recursion limit
    ],
    ids=["empty", "truncated", "array", "string", "bool", "bad-utf8", "huge-int", "deep"],
)
def test_decode_body_gives_an_empty_object_for_anything_but_a_json_object(raw: bytes) -> None:
    assert decode_body(raw) == {}


# --- charge_from_ledger ---------------------------------------------------------------------


def test_the_ledger_charge_filed_under_the_key_is_found() -> None:
    page = {
        "data": [
            {"id": "ch_a", "status": "succeeded", "idempotency_key": "other"},
            {"id": "ch_b", "status": "declined", "idempotency_key": "k1", "decline_code": "x"},
        ]
    }

    assert charge_from_ledger(page, "k1") == Charge("ch_b", "declined", "x", 200)


@pytest.mark.parametrize(
    "page",
    [{}, {"data": []}, {"data": [{"id": "ch_a", "status": "succeeded", "idempotency_key": "k2"}]}],
    ids=["no-data", "empty", "other-key"],
)
def test_no_ledger_charge_under_the_key_is_none(page: dict[str, object]) -> None:
    assert charge_from_ledger(page, "k1") is None


def test_the_first_ledger_charge_under_the_key_wins() -> None:
    page = {
        "data": [
            {"id": "ch_first", "status": "succeeded", "idempotency_key": "k1"},
            {"id": "ch_second", "status": "succeeded", "idempotency_key": "k1"},
        ]
    }

    found = charge_from_ledger(page, "k1")

    assert found is not None
    assert found.charge_id == "ch_first"


# --- properties over generated answers ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8,
)
charge_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=20), json_values),
        "status": st.sampled_from(["succeeded", "declined", "pending"]) | json_values,
        "decline_code": st.none() | st.text(max_size=20),
        "detail": json_values,
        "title": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    charge_like.map(lambda value: json.dumps(value).encode()),
)
statuses = st.integers(min_value=100, max_value=999)


@GENERATED
@given(status=statuses, raw=bodies)
def test_any_answer_is_a_charge_with_a_string_id_or_one_of_the_two_typed_errors(
    status: int, raw: bytes
) -> None:
    outcome = classified(status, raw)

    if isinstance(outcome, Charge):
        assert isinstance(outcome.charge_id, str)
        assert outcome.status in ("succeeded", "declined")
        assert outcome.http_status in (200, 201, 402)
    else:
        assert isinstance(outcome, RetryableProviderError) == (
            status in (409, 429) or status >= 500
        )
        assert outcome.status == status


@GENERATED
@given(raw=st.binary(max_size=500))
def test_decode_body_always_returns_a_dict(raw: bytes) -> None:
    assert isinstance(decode_body(raw), dict)


@pytest.mark.xfail(strict=True, reason="bug: an empty charge id is accepted as a charge")
def test_a_2xx_with_an_empty_charge_id_is_no_charge() -> None:
    with pytest.raises((RetryableProviderError, TerminalProviderError)):
        classify_charge_answer(200, body(id="", status="succeeded"))
