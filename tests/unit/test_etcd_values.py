"""What the election prefix in etcd may hold, read as replicas read it: any value, any URL.

A candidate key's value and the leader's advertised URL come from etcd, written by whichever
replica campaigns — or by anything else with write access to the prefix (an operator's
``etcdctl put``, another version, a bug). Reading them must never raise: the observer would
stop (the replica naming no leader until restarted) and the crash detector would pause.
"""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from app.failover.detector import probe_address
from app.leadership.etcd import KeyValue
from app.leadership.observer import candidate_info

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
DEEP = 100_000  # far past the JSON decoder's recursion limit


def _kv(value: bytes, revision: int = 7) -> KeyValue:
    return KeyValue(
        key="/paydispatch/election/x",
        value=value,
        create_revision=revision,
        mod_revision=9,
        lease=1,
    )


def test_a_replicas_own_value_reads_as_written() -> None:
    value = json.dumps({"node_id": "replica-2", "url": "http://127.0.0.1:8081"}).encode()
    info = candidate_info(_kv(value, revision=41), since="then")
    assert (info.node_id, info.url, info.token, info.since) == (
        "replica-2",
        "http://127.0.0.1:8081",
        41,
        "then",
    )


@given(raw=st.binary(max_size=256))
@example(raw=b"[" * DEEP + b"]" * DEEP)  # raised RecursionError and stopped the observer
@example(raw=b'{"node_id": ' + b"[" * 900 + b"]" * 900 + b"}")
@example(raw=b"\xff\xfe{}")
def test_any_bytes_read_as_a_candidate_with_its_token(raw: bytes) -> None:
    info = candidate_info(_kv(raw, revision=12), since="")
    assert info.token == 12
    assert isinstance(info.node_id, str)
    assert isinstance(info.url, str)


@given(node_id=JSON, url=JSON, extra=st.dictionaries(st.text(), JSON, max_size=3))
def test_fields_that_are_not_strings_read_as_unknown(
    node_id: object, url: object, extra: dict[str, object]
) -> None:
    document = {**extra, "node_id": node_id, "url": url}
    info = candidate_info(_kv(json.dumps(document).encode()), since="")
    assert info.node_id == (node_id if isinstance(node_id, str) else "?")
    assert info.url == (url if isinstance(url, str) else "")


@given(value=JSON)
def test_a_value_that_is_not_an_object_names_nobody(value: object) -> None:
    if isinstance(value, dict):
        return  # objects are the case above
    info = candidate_info(_kv(json.dumps(value).encode()), since="")
    assert (info.node_id, info.url) == ("?", "")


@given(url=st.text(max_size=80))
@example(url="http://[::1")  # urlsplit raises ValueError
@example(url="http://leader:99999")  # port out of range
@example(url="http://leader:0")
@example(url="")
def test_any_advertised_url_gives_an_address_or_none(url: str) -> None:
    address = probe_address(url)
    if address is not None:
        host, port = address
        assert host
        assert 0 < port < 65536


@given(
    host=st.sampled_from(["127.0.0.1", "replica-1", "[::1]"]),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    scheme=st.sampled_from(["http", "https"]),
)
def test_a_well_formed_url_names_its_host_and_port(
    host: str, port: int | None, scheme: str
) -> None:
    url = f"{scheme}://{host}" + ("" if port is None else f":{port}") + "/"
    default = 443 if scheme == "https" else 80
    assert probe_address(url) == (host.strip("[]"), default if port is None else port)


def test_port_zero_is_no_address_rather_than_the_default_port() -> None:
    # Probing port 80 instead could find it refused and count a live leader as crashed.
    assert probe_address("http://127.0.0.1:0") is None
