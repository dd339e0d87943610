"""The stand-in provider's routing and request parsing (app.sandbox.routing): pure logic."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.sandbox.models import parse_text_param
from app.sandbox.routing import Answer, MethodNotAllowed, NotFound, Reply, Request, Router


def request(query_string: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request("GET", "/", query_string, headers or [], max_body=1024)


async def _handler(request: Request) -> Reply:
    return Answer(200, b"", "text/plain")


def provider_routes() -> Router:
    router = Router()
    for method, path in [
        ("POST", "/v1/charges"),
        ("GET", "/v1/charges"),
        ("GET", "/v1/charges/{id}"),
        ("GET", "/healthz"),
    ]:
        router.add(method, path, _handler)
    return router


def test_routes_resolve_with_captures_404_and_405() -> None:
    router = provider_routes()
    assert router.resolve("POST", "/v1/charges")[1] == {}
    assert router.resolve("GET", "/v1/charges/ch_1")[1] == {"id": "ch_1"}
    assert router.resolve("HEAD", "/healthz")[1] == {}  # a GET route answers HEAD
    for missing in ("/v1/charges/", "/v1/charges/a/b", "/v1", "/healthz/", "", "healthz"):
        with pytest.raises(NotFound):
            router.resolve("GET", missing)
    with pytest.raises(MethodNotAllowed) as refused:
        router.resolve("DELETE", "/v1/charges")
    assert refused.value.allowed == ("GET", "HEAD", "POST")
    with pytest.raises(MethodNotAllowed):
        router.resolve("POST", "/v1/charges/ch_1")


segment = st.text(st.characters(blacklist_characters="/"), min_size=0, max_size=6)


@given(st.lists(segment, min_size=0, max_size=4))
def test_any_path_resolves_only_to_the_route_of_its_shape(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    router = provider_routes()
    expected: dict[str, str] | None
    if parts == ["v1", "charges"] or parts == ["healthz"]:
        expected = {}
    elif len(parts) == 3 and parts[:2] == ["v1", "charges"] and parts[2]:
        expected = {"id": parts[2]}
    else:
        expected = None
    if expected is None:
        with pytest.raises(NotFound):
            router.resolve("GET", path)
    else:
        assert router.resolve("GET", path)[1] == expected


def test_query_keeps_the_first_value_and_decodes_as_a_form() -> None:
    parsed = request(b"limit=5&limit=7&reference=a+b%2Fc&empty=&after").query
    assert parsed == {"limit": "5", "reference": "a b/c", "empty": "", "after": ""}


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=5))
def test_query_round_trips_any_unicode_text(params: dict[str, str]) -> None:
    raw = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    assert request(raw.encode("ascii")).query == params


def test_undecodable_query_bytes_are_refused_by_validation_not_an_error() -> None:
    parsed = request(b"reference=%ff%fe").query
    value, errors = parse_text_param(parsed, "reference")
    assert value is None
    assert [e["field"] for e in errors] == ["reference"]


def test_header_is_the_first_value_and_keeps_undecodable_bytes_refusable() -> None:
    headers = [(b"idempotency-key", b"k-\xff"), (b"idempotency-key", b"second")]
    value = request(headers=headers).header(b"idempotency-key")
    assert value is not None
    assert value.startswith("k-")
    assert not value.isprintable()  # app.sandbox.models.check_idempotency_key refuses it
    assert request(headers=headers).header(b"absent") is None
