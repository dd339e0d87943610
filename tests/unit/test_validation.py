"""What POST /v1/payments accepts (app.web.validation, app.domain.payment): the key header,
the body, field errors, and the fingerprint that decides "same request"."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from app.domain.payment import AMOUNT_MAX, BIGINT_MAX, PaymentRequest
from app.web.validation import InvalidRequest, check_idempotency_key, field_errors, parse_payment
from tests.unit.generated import GENERATED


def invalid(body: object) -> InvalidRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidRequest) as raised:
        parse_payment(raw)
    return raised.value


def fields_of(exc: InvalidRequest) -> list[str]:
    return [error["field"] for error in exc.errors]


# --- Idempotency-Key ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "order-1", "550e8400-e29b-41d4-a716-446655440000", "k" * 255])
def test_a_printable_key_of_1_to_255_characters_is_accepted_as_is(key: str) -> None:
    assert check_idempotency_key(key) == key


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (None, "header is required"),
        ("", "must not be blank"),
        ("   ", "must not be blank"),
        ("k" * 256, "at most 255 characters (got 256)"),
        (" key", "without leading or trailing spaces"),
        ("key ", "without leading or trailing spaces"),
        ("ke\ty", "printable"),
        ("ke\x00y", "printable"),
    ],
    ids=["missing", "empty", "blank", "too-long", "leading-space", "trailing-space", "tab", "nul"],
)
def test_a_bad_key_is_a_400_naming_the_header_and_the_problem(key: str | None, says: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_idempotency_key(key)

    assert raised.value.status == 400
    assert raised.value.title == "Invalid Idempotency-Key"
    assert fields_of(raised.value) == ["Idempotency-Key"]
    assert says in raised.value.errors[0]["message"]


# --- the body -------------------------------------------------------------------------------


def test_a_minimal_valid_body_becomes_a_payment_request() -> None:
    request = parse_payment(b'{"amount": 1250, "currency": "EUR"}')

    assert request == PaymentRequest(amount=1250, currency="EUR")
    assert request.metadata == {}


def test_every_optional_field_is_kept() -> None:
    body = {
        "amount": 1,
        "currency": "JPY",
        "reference": "inv-7",
        "description": "tea",
        "metadata": {"order": "7"},
    }

    assert parse_payment(json.dumps(body).encode()).model_dump() == body


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"{'amount': 1}"])
def test_a_body_that_is_not_json_is_a_400(raw: bytes) -> None:
    exc = invalid(raw)

    assert (exc.status, exc.title) == (400, "Body is not valid JSON")
    assert fields_of(exc) == ["body"]


@pytest.mark.parametrize(("raw", "kind"), [(b"[]", "list"), (b"1", "int"), (b"null", "NoneType")])
def test_json_that_is_not_an_object_is_a_400_naming_what_it_got(raw: bytes, kind: str) -> None:
    exc = invalid(raw)

    assert (exc.status, exc.title) == (400, "Body must be a JSON object")
    assert exc.errors == [{"field": "body", "message": f"expected an object, got {kind}"}]


@pytest.mark.parametrize("amount", [0, -1, 1.5, "100", True, None, BIGINT_MAX + 1], ids=repr)
def test_an_amount_that_is_not_a_positive_bigint_is_a_422_on_amount(amount: object) -> None:
    exc = invalid({"amount": amount, "currency": "EUR"})

    assert exc.status == 422
    assert fields_of(exc) == ["amount"]


def test_the_largest_amount_a_provider_holds_exactly_is_accepted() -> None:
    assert parse_payment(json.dumps({"amount": AMOUNT_MAX, "currency": "EUR"}).encode()).amount


@pytest.mark.parametrize("amount", [AMOUNT_MAX + 1, BIGINT_MAX])
def test_an_amount_past_what_a_provider_holds_exactly_is_a_422_naming_it(amount: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_payment(json.dumps({"amount": amount, "currency": "EUR"}).encode())

    assert raised.value.status == 422
    assert [e["field"] for e in raised.value.errors] == ["amount"]


@pytest.mark.parametrize(
    ("currency", "says"),
    [
        ("eur", "did you mean 'EUR'?"),
        ("XYZ", "is not an ISO 4217 currency code"),
        ("EURO", "three-letter ISO 4217"),
        ("ÉUR", "three-letter ISO 4217"),
        ("E1R", "three-letter ISO 4217"),
    ],
)
def test_a_currency_that_is_not_upper_case_iso_4217_is_a_422_saying_why(
    currency: str, says: str
) -> None:
    exc = invalid({"amount": 1, "currency": currency})

    assert exc.status == 422
    assert fields_of(exc) == ["currency"]
    assert says in exc.errors[0]["message"]


def test_missing_fields_are_each_reported() -> None:
    exc = invalid({})

    assert exc.status == 422
    assert exc.errors == [
        {"field": "amount", "message": "Field required"},
        {"field": "currency", "message": "Field required"},
    ]


def test_an_unknown_field_is_reported_as_such() -> None:
    exc = invalid({"amount": 1, "currency": "EUR", "amout": 2})

    assert exc.errors == [{"field": "amout", "message": "unknown field"}]


def test_a_bad_metadata_value_is_reported_with_a_dotted_path() -> None:
    exc = invalid({"amount": 1, "currency": "EUR", "metadata": {"order": 7}})

    assert fields_of(exc) == ["metadata.order"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("reference", "a\x00b"), ("description", "\x00"), ("metadata", {"k": "v\x00"})],
)
def test_the_nul_character_postgres_cannot_store_is_refused(field: str, value: object) -> None:
    exc = invalid({"amount": 1, "currency": "EUR", field: value})

    assert exc.status == 422
    assert "NUL" in exc.errors[0]["message"]


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{n}": "v" for n in range(51)},
        {"": "v"},
        {"k" * 41: "v"},
        {"k": "v" * 501},
        {f"k{n}": "v" * 100 for n in range(45)},  # each entry fine, > 4096 bytes together
    ],
    ids=["51-keys", "empty-key", "long-key", "long-value", "too-many-bytes"],
)
def test_metadata_beyond_its_bounds_is_a_422_on_metadata(metadata: dict[str, str]) -> None:
    exc = invalid({"amount": 1, "currency": "EUR", "metadata": metadata})

    assert exc.status == 422
    assert fields_of(exc) == ["metadata"]


def test_field_errors_strip_pydantics_value_error_prefix() -> None:
    with pytest.raises(ValidationError) as raised:
        PaymentRequest.model_validate({"amount": 1, "currency": "eur"})

    assert field_errors(raised.value) == [
        {"field": "currency", "message": "must be upper-case ISO 4217 (did you mean 'EUR'?)"}
    ]


# --- fingerprint ----------------------------------------------------------------------------


def test_the_fingerprint_does_not_depend_on_key_order() -> None:
    one = parse_payment(b'{"amount": 5, "currency": "EUR", "metadata": {"a": "1", "b": "2"}}')
    two = parse_payment(b'{"metadata": {"b": "2", "a": "1"}, "currency": "EUR", "amount": 5}')

    assert one.fingerprint() == two.fingerprint()


def test_an_omitted_optional_field_fingerprints_like_its_default() -> None:
    bare = parse_payment(b'{"amount": 5, "currency": "EUR"}')
    explicit = parse_payment(
        b'{"amount": 5, "currency": "EUR", "reference": null, "description": null, "metadata": {}}'
    )

    assert bare.fingerprint() == explicit.fingerprint()


@pytest.mark.parametrize(
    "change",
    [{"amount": 6}, {"currency": "USD"}, {"reference": "r"}, {"metadata": {"a": "2"}}],
    ids=["amount", "currency", "reference", "metadata"],
)
def test_any_change_of_intent_changes_the_fingerprint(change: dict[str, object]) -> None:
    base: dict[str, object] = {"amount": 5, "currency": "EUR", "metadata": {"a": "1"}}

    changed = PaymentRequest.model_validate({**base, **change})

    assert changed.fingerprint() != PaymentRequest.model_validate(base).fingerprint()


@GENERATED
@given(
    metadata=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8),
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
        max_size=6,
    ),
    amount=st.integers(min_value=1, max_value=AMOUNT_MAX),
)
def test_the_fingerprint_is_stable_across_any_key_order(
    metadata: dict[str, str], amount: int
) -> None:
    forward = {"amount": amount, "currency": "EUR", "metadata": metadata}
    backward = {
        "metadata": dict(reversed(list(metadata.items()))),
        "currency": "EUR",
        "amount": amount,
    }

    assert (
        parse_payment(json.dumps(forward).encode()).fingerprint()
        == parse_payment(json.dumps(backward).encode()).fingerprint()
    )
