"""Provider answer → outcome (app.domain.outcome), one test per answer class.

The rule (DESIGN.md, "Payment states"): only an answer that proves the outcome is final. A
charge is recorded only when it is well formed and this payment's own (amount, currency,
provider key, payment id); 409/429/5xx are retried; only 400/422 with the provider's reason
make a payment ``failed``; everything else is an unknown outcome.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.outcome import (
    Charge,
    charge_from_ledger,
    classify_charge_answer,
    decode_body,
    mismatch,
    parse_retry_after,
    storable_text,
)
from app.domain.payment import ChargeRequest
from app.errors import (
    ChargeMismatch,
    ProviderError,
    RetryableProviderError,
    TerminalProviderError,
    UnknownOutcome,
)
from tests.unit.generated import GENERATED

REQUEST = ChargeRequest(
    provider_key="9b2f-key", amount=1250, currency="EUR", reference="order-7", payment_id=42
)


def charge_body(**overrides: Any) -> dict[str, Any]:
    """The provider's charge object for REQUEST, as an honest provider answers it."""
    fields: dict[str, Any] = {
        "id": "ch_1",
        "status": "succeeded",
        "amount": 1250,
        "currency": "EUR",
        "idempotency_key": "9b2f-key",
        "metadata": {"payment_id": "42"},
        "decline_code": None,
    }
    fields.update(overrides)
    return fields


def raw(fields: object) -> bytes:
    return json.dumps(fields).encode()


def classify(status: int, body: bytes, retry_after: str | None = None) -> Charge:
    return classify_charge_answer(status, body, REQUEST, retry_after=retry_after)


def classified(status: int, body: bytes) -> Charge | ProviderError:
    """The classification, with the typed errors returned instead of raised (any other
    exception propagates and fails the test)."""
    try:
        return classify(status, body)
    except ProviderError as exc:
        return exc


# --- definite charges ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_2xx_with_this_payments_charge_is_a_succeeded_charge(status: int) -> None:
    charge = classify(status, raw(charge_body()))

    assert (charge.charge_id, charge.status, charge.http_status) == ("ch_1", "succeeded", status)


@pytest.mark.parametrize("status", [200, 201, 402])
def test_a_declined_charge_of_this_payment_is_declined_with_its_code(status: int) -> None:
    body = charge_body(status="declined", decline_code="insufficient_funds")

    charge = classify(status, raw(body))

    assert (charge.status, charge.decline_code) == ("declined", "insufficient_funds")


def test_402_without_a_status_is_a_decline() -> None:
    body = charge_body()
    del body["status"]

    assert classify(402, raw(body)).status == "declined"


def test_402_whose_body_says_succeeded_proves_nothing() -> None:
    with pytest.raises(UnknownOutcome):
        classify(402, raw(charge_body(status="succeeded")))


@pytest.mark.parametrize("status", [None, "pending", "processing", "SUCCEEDED", 1, True])
def test_2xx_whose_charge_status_is_neither_succeeded_nor_declined_is_unknown(
    status: object,
) -> None:
    with pytest.raises(UnknownOutcome):
        classify(200, raw(charge_body(status=status)))


# --- a charge that is not this payment's ----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("amount", 1251, "amount"),
        ("amount", "1250", "amount"),
        ("amount", 1250.0, "amount"),
        ("amount", None, "amount"),
        ("currency", "USD", "currency"),
        ("currency", "eur", "currency"),
        ("idempotency_key", "client-key-reused", "idempotency key"),
        ("idempotency_key", None, "idempotency key"),
        ("metadata", {"payment_id": "41"}, "payment id"),
        ("metadata", {"payment_id": 42}, "payment id"),
        ("metadata", None, "payment id"),
    ],
)
def test_a_charge_for_another_amount_currency_key_or_payment_is_a_mismatch(
    field: str, value: object, named: str
) -> None:
    with pytest.raises(ChargeMismatch, match=named) as raised:
        classify(201, raw(charge_body(**{field: value})))

    assert "ch_1" in str(raised.value)
    assert raised.value.status == 201


def test_mismatch_names_every_field_that_differs() -> None:
    charge = Charge("ch_x", "succeeded", None, 200, 1, "USD", "k", "9")

    reason = mismatch(charge, REQUEST)

    assert reason is not None
    for name in ("amount", "currency", "idempotency key", "payment id"):
        assert name in reason


def test_this_payments_charge_is_no_mismatch() -> None:
    assert (
        mismatch(Charge("ch", "succeeded", None, 200, 1250, "EUR", "9b2f-key", "42"), REQUEST)
        is None
    )


# --- answers without a usable charge: unknown -------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 402])
def test_a_charge_status_without_an_id_is_unknown(status: int) -> None:
    body = charge_body()
    del body["id"]

    with pytest.raises(UnknownOutcome) as raised:
        classify(status, raw(body))

    assert raised.value.status == status


@pytest.mark.parametrize("charge_id", [123, None, "", "x" * 256, ["ch_1"], {"id": "ch_1"}])
def test_a_charge_id_that_is_not_a_short_non_empty_string_is_unknown(charge_id: object) -> None:
    with pytest.raises(UnknownOutcome):
        classify(200, raw(charge_body(id=charge_id)))


@pytest.mark.parametrize(
    "body",
    [b"", b"Created", b"not json", b"[]", b'"ch_1"', b"null", b"42", b'["id", "ch_1"]'],
    ids=["empty", "text", "non-json", "array", "string", "null", "number", "array-with-id"],
)
def test_2xx_without_a_json_object_is_unknown_not_failed(body: bytes) -> None:
    with pytest.raises(UnknownOutcome):
        classify(201, body)


def test_2xx_with_a_body_nested_past_the_decoder_limit_is_unknown() -> None:
    deep = b'{"id": "ch_1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    with pytest.raises(UnknownOutcome):
        classify(201, deep)


@pytest.mark.parametrize(
    "status", [100, 202, 204, 301, 302, 303, 307, 308, 401, 403, 404, 405, 408, 410, 413, 418]
)
def test_redirects_proxy_errors_and_other_statuses_prove_nothing(status: int) -> None:
    with pytest.raises(UnknownOutcome) as raised:
        classify(status, raw(charge_body()))

    assert raised.value.status == status


@pytest.mark.parametrize("status", [400, 422])
@pytest.mark.parametrize(
    "body", [b"", b"<html>Bad Request</html>", raw({}), raw({"detail": ""}), raw([1])]
)
def test_400_and_422_without_the_providers_reason_are_unknown(status: int, body: bytes) -> None:
    # A bare 400 is what a proxy or a load balancer says too; it proves nothing about the
    # charge, so the payment is not made final on it.
    with pytest.raises(UnknownOutcome):
        classify(status, body)


# --- explicit rejections: terminal ------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"title": "Invalid request", "detail": "amount must be positive"}, "amount must be"),
        ({"title": "Bad currency"}, "Bad currency"),
        ({"message": "card declined by validation"}, "card declined"),
        ({"errors": [{"field": "amount", "message": "too large"}]}, "too large"),
    ],
)
def test_400_and_422_with_a_reason_are_terminal_and_carry_it(
    status: int, body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(TerminalProviderError, match=reason) as raised:
        classify(status, raw(body))

    assert raised.value.status == status


# --- retryable ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [409, 429, 500, 502, 503, 504, 599])
def test_409_429_and_5xx_are_retryable_with_the_same_key(status: int) -> None:
    with pytest.raises(RetryableProviderError) as raised:
        classify(status, raw({"title": "try again"}))

    assert raised.value.status == status
    assert "try again" in str(raised.value)


def test_5xx_is_retryable_even_when_its_body_carries_a_charge() -> None:
    with pytest.raises(RetryableProviderError):
        classify(500, raw(charge_body()))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 10 ", 10.0),
        (None, None),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ("9" * 50, None),
    ],
)
def test_retry_after_is_read_in_seconds_and_ignored_when_unusable(
    header: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(header) == seconds
    with pytest.raises(RetryableProviderError) as raised:
        classify(429, raw({"title": "slow down"}), retry_after=header)
    assert raised.value.retry_after == seconds


def test_a_non_json_body_is_quoted_in_the_error_cut_to_200_bytes() -> None:
    body = b"<html>" + b"x" * 500 + b"</html>"

    with pytest.raises(RetryableProviderError) as raised:
        classify(502, body)

    message = str(raised.value)
    assert "<html>" in message
    assert "</html>" not in message
    assert message.count("x") <= 200


def test_an_undecodable_body_does_not_break_the_error_message() -> None:
    with pytest.raises(RetryableProviderError, match="provider answered 503"):
        classify(503, b"\xff\xfe\xfa not utf-8")


# --- decode_body ----------------------------------------------------------------------------


def test_decode_body_returns_the_json_object() -> None:
    assert decode_body(b'{"id": "ch_1", "n": [1, 2]}') == {"id": "ch_1", "n": [1, 2]}


@pytest.mark.parametrize(
    "body",
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
def test_decode_body_gives_an_empty_object_for_anything_but_a_json_object(body: bytes) -> None:
    assert decode_body(body) == {}


# --- charge_from_ledger ---------------------------------------------------------------------


def test_the_ledger_charge_filed_under_the_key_is_found_with_what_it_charged() -> None:
    page = {"data": [charge_body(id="ch_b", status="declined", decline_code="x")]}

    found = charge_from_ledger(page, "9b2f-key")

    assert found is not None
    assert (found.charge_id, found.status, found.decline_code) == ("ch_b", "declined", "x")
    assert mismatch(found, REQUEST) is None


def test_an_empty_ledger_page_for_the_key_is_no_charge() -> None:
    assert charge_from_ledger({"data": []}, "9b2f-key") is None


@pytest.mark.parametrize(
    "page",
    [
        {"data": [charge_body(idempotency_key="k2")]},
        {"data": [charge_body(), charge_body(id="ch_a", idempotency_key="other")]},
        {"data": ["junk", 3]},
    ],
    ids=["other-key", "ours-and-another", "junk-items"],
)
def test_a_lookup_answered_with_other_charges_proves_nothing(page: dict[str, object]) -> None:
    # The provider ignored the key filter: "our key is not among them" would prove nothing.
    with pytest.raises(UnknownOutcome, match="other charges"):
        charge_from_ledger(page, "9b2f-key")


@pytest.mark.parametrize("charge_id", ["ch\x00x", "ch\ud800", "ch\nx"])
def test_a_charge_id_that_cannot_be_stored_as_text_is_no_charge(charge_id: str) -> None:
    with pytest.raises(UnknownOutcome):
        classify(201, raw(charge_body(id=charge_id)))


def test_provider_text_is_made_storable_whatever_it_holds() -> None:
    assert storable_text("card\x00number \ud800 ok") == "card\ufffdnumber ? ok"


@pytest.mark.parametrize("page", [{}, {"data": None}, {"data": {"id": "ch_1"}}, {"data": "x"}])
def test_a_page_that_is_no_ledger_page_is_unknown(page: dict[str, object]) -> None:
    with pytest.raises(UnknownOutcome):
        charge_from_ledger(page, "9b2f-key")


def test_a_malformed_charge_under_the_key_is_unknown_not_a_crash() -> None:
    with pytest.raises(UnknownOutcome, match="malformed"):
        charge_from_ledger({"data": [{"idempotency_key": "9b2f-key"}]}, "9b2f-key")


def test_the_first_ledger_charge_under_the_key_wins() -> None:
    page = {"data": [charge_body(id="ch_first"), charge_body(id="ch_second")]}

    found = charge_from_ledger(page, "9b2f-key")

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
        "id": st.one_of(st.sampled_from(["ch_1", ""]), st.text(max_size=20), json_values),
        "status": st.sampled_from(["succeeded", "declined", "pending"]) | json_values,
        "amount": st.sampled_from([1250, 1251, "1250"]) | json_values,
        "currency": st.sampled_from(["EUR", "USD"]) | json_values,
        "idempotency_key": st.sampled_from(["9b2f-key", "other"]) | json_values,
        "metadata": st.sampled_from([{"payment_id": "42"}, {"payment_id": "1"}]) | json_values,
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
@given(status=statuses, body=bodies)
def test_any_answer_is_this_payments_charge_or_one_of_the_typed_outcomes(
    status: int, body: bytes
) -> None:
    outcome = classified(status, body)

    if isinstance(outcome, Charge):
        # Recorded as charged: only with proof that it is this payment's own charge.
        assert outcome.http_status in (200, 201, 402)
        assert outcome.status in ("succeeded", "declined")
        assert isinstance(outcome.charge_id, str)
        assert outcome.charge_id
        assert mismatch(outcome, REQUEST) is None
    else:
        assert isinstance(outcome, RetryableProviderError) == (
            status in (409, 429) or 500 <= status <= 599
        )
        # Made final only on an explicit rejection.
        if isinstance(outcome, TerminalProviderError):
            assert status in (400, 422)
        assert outcome.status == status  # type: ignore[attr-defined]


@GENERATED
@given(body=st.binary(max_size=500))
def test_decode_body_always_returns_a_dict(body: bytes) -> None:
    assert isinstance(decode_body(body), dict)
