"""The stand-in provider on the wire: raw bytes over a real socket to a real provider
process, for what an HTTP client library would hide (pipelining, a lost answer that must be
lost whole, oversized heads, undecodable header bytes, chunked bodies)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from app.stack.sandbox_process import SandboxProcess, start_sandbox_process, stop_sandbox_process

BODY = b'{"amount": 250, "currency": "EUR", "reference": "wire"}'


@dataclass
class Parsed:
    """One answer as httptools parsed it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


class _Answers:
    """httptools callbacks collecting every answer on one connection, in order."""

    def __init__(self) -> None:
        self.answers: list[Parsed] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Parsed())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.answers[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body

    def on_message_complete(self) -> None:
        self.answers[-1].complete = True


async def exchange(
    base_url: str, raw: bytes, *, answers: int, timeout: float = 10.0
) -> list[Parsed]:
    """Write ``raw`` on one new connection and read until ``answers`` complete answers
    arrived (or the provider closed the connection)."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    collected = _Answers()
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while sum(a.complete for a in collected.answers) < answers:
                data = await reader.read(65536)
                if not data:
                    break
                collected.parser.feed_data(data)
    finally:
        writer.close()
    return collected.answers


async def read_to_close(base_url: str, raw: bytes, *, timeout: float = 10.0) -> bytes:
    """Write ``raw`` on one new connection: every byte the provider sends until it closes
    the connection (a TimeoutError if it does not within ``timeout``)."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def charge_request(key: bytes, body: bytes = BODY) -> bytes:
    return (
        b"POST /v1/charges HTTP/1.1\r\nHost: provider\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: " + key + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


def json_of(answer: Parsed) -> Any:
    return json.loads(answer.body)


@pytest.fixture(scope="module")
async def sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SandboxProcess]:
    started = await start_sandbox_process(tmp_path_factory.mktemp("wire-provider"))
    yield started
    await stop_sandbox_process(started.process, timeout=5.0)


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    sandbox: SandboxProcess,
) -> None:
    raw = (
        charge_request(b"wire-pipe-1")
        + b"GET /healthz HTTP/1.1\r\nHost: provider\r\n\r\n"
        + charge_request(b"wire-pipe-2")
        + charge_request(b"wire-pipe-1")
    )
    answers = await exchange(sandbox.base_url, raw, answers=4)

    assert [a.status for a in answers] == [201, 200, 201, 201]
    assert all(a.complete for a in answers)
    first, health, second, replay = answers
    assert json_of(first)["idempotency_key"] == "wire-pipe-1"
    assert json_of(health) == {"status": "ok"}
    assert json_of(second)["idempotency_key"] == "wire-pipe-2"
    assert json_of(replay)["id"] == json_of(first)["id"]
    assert replay.headers["idempotent-replayed"] == "true"


async def test_a_chunked_body_is_read_whole(sandbox: SandboxProcess) -> None:
    head = (
        b"POST /v1/charges HTTP/1.1\r\nHost: provider\r\nIdempotency-Key: wire-chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(BODY[i : i + 7]), BODY[i : i + 7]) for i in range(0, len(BODY), 7)
    )
    (answer,) = await exchange(sandbox.base_url, head + chunks + b"0\r\n\r\n", answers=1)
    assert answer.status == 201
    assert json_of(answer)["reference"] == "wire"


async def test_undecodable_idempotency_key_bytes_are_a_400_naming_the_header(
    sandbox: SandboxProcess,
) -> None:
    (answer,) = await exchange(sandbox.base_url, charge_request(b"wire-\xff\xfe"), answers=1)
    assert answer.status == 400
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in json_of(answer)["errors"]] == ["Idempotency-Key"]


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    sandbox: SandboxProcess,
) -> None:
    # Only the head is sent: the 413 must not wait for a gigabyte that never comes.
    head = (
        b"POST /v1/charges HTTP/1.1\r\nHost: provider\r\nIdempotency-Key: wire-huge\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    (answer,) = await exchange(sandbox.base_url, head, answers=1, timeout=5.0)
    assert answer.status == 413
    assert json_of(answer)["status"] == 413


async def test_an_oversized_head_is_refused_and_the_provider_keeps_serving(
    sandbox: SandboxProcess,
) -> None:
    endless = b"GET /healthz HTTP/1.1\r\nHost: provider\r\nX-Padding: " + b"a" * 200_000
    (answer,) = await exchange(sandbox.base_url, endless, answers=1)
    assert answer.status == 431
    (health,) = await exchange(
        sandbox.base_url, b"GET /healthz HTTP/1.1\r\nHost: provider\r\n\r\n", answers=1
    )
    assert health.status == 200


async def test_head_has_no_body_and_an_unknown_method_names_the_allowed_ones(
    sandbox: SandboxProcess,
) -> None:
    raw = (
        b"HEAD /healthz HTTP/1.1\r\nHost: provider\r\n\r\n"
        b"DELETE /v1/charges HTTP/1.1\r\nHost: provider\r\n\r\n"
    )
    # A HEAD answer's Content-Length describes the GET body it leaves out: tell the
    # parser so, by parsing the two answers separately.
    host, port = sandbox.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            head_status = await reader.readline()
            head_headers = await _headers(reader)
            delete_status = await reader.readline()
            delete_headers = await _headers(reader)
            delete_body = await reader.readexactly(int(delete_headers["content-length"]))
    finally:
        writer.close()
    assert head_status.startswith(b"HTTP/1.1 200")
    assert int(head_headers["content-length"]) > 0
    assert delete_status.startswith(b"HTTP/1.1 405")
    assert delete_headers["allow"] == "GET, HEAD, POST"
    assert json.loads(delete_body)["status"] == 405


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def test_a_dropped_answer_is_lost_whole_after_the_charge(tmp_path: Path) -> None:
    dropping = await start_sandbox_process(tmp_path, drop_rate=1.0)
    try:
        received = await read_to_close(dropping.base_url, charge_request(b"wire-drop"))
        # Not a byte of an answer: a client must not see even a status line.
        assert received == b""
        (listed,) = await exchange(
            dropping.base_url,
            b"GET /v1/charges?idempotency_key=wire-drop HTTP/1.1\r\nHost: provider\r\n\r\n",
            answers=1,
        )
        assert [c["idempotency_key"] for c in json_of(listed)["data"]] == ["wire-drop"]
    finally:
        await stop_sandbox_process(dropping.process, timeout=5.0)


async def test_a_body_at_the_limit_in_one_write_is_a_charge(sandbox: SandboxProcess) -> None:
    # Head and body arrive in one read: only head bytes count towards the head's bound.
    prefix = b'{"amount": 250, "currency": "EUR", "padding": "'
    body = prefix + b"p" * (64 * 1024 - len(prefix) - 2) + b'"}'
    assert len(body) == 64 * 1024  # PAYDISPATCH_PROVIDER_MAX_BODY_BYTES's default
    (answer,) = await exchange(sandbox.base_url, charge_request(b"wire-limit", body), answers=1)
    assert answer.status == 201


async def test_a_pipelined_burst_larger_than_a_head_bound_is_answered_whole(
    sandbox: SandboxProcess,
) -> None:
    count = 2_500  # ~85 KB of small requests in one write
    raw = b"GET /healthz HTTP/1.1\r\nHost: provider\r\n\r\n" * count
    answers = await exchange(sandbox.base_url, raw, answers=count, timeout=30.0)
    assert [a.status for a in answers] == [200] * count


async def test_an_early_413_closes_the_connection_that_still_owes_a_body(
    sandbox: SandboxProcess,
) -> None:
    head = (
        b"POST /v1/charges HTTP/1.1\r\nHost: provider\r\nIdempotency-Key: wire-expect\r\n"
        b"Expect: 100-continue\r\nContent-Length: 100000\r\n\r\n"
    )
    received = await read_to_close(sandbox.base_url, head, timeout=5.0)
    assert received.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in received
    assert b"connection: close" in received.lower()


async def test_an_upgrade_request_is_answered_not_left_waiting(sandbox: SandboxProcess) -> None:
    upgrade = (  # what curl --http2 sends to an http:// URL
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    )
    post = charge_request(b"wire-h2c").replace(
        b"Host: provider\r\n", b"Host: provider\r\n" + upgrade
    )
    (refused,) = await exchange(sandbox.base_url, post, answers=1, timeout=5.0)
    assert refused.status == 400
    assert json_of(refused)["type"].endswith("upgrade-unsupported")
    get = b"GET /healthz HTTP/1.1\r\nHost: provider\r\n" + upgrade + b"\r\n"
    (health,) = await exchange(sandbox.base_url, get, answers=1, timeout=5.0)
    assert health.status == 200


async def test_a_dropped_answer_with_a_request_pipelined_behind_it(tmp_path: Path) -> None:
    """The drop must end its request even when the server already parsed the next one:
    the connection closes at once, and the provider then stops at once (no request left
    waiting for a disconnect it was never told of)."""
    dropping = await start_sandbox_process(tmp_path, drop_rate=1.0, shutdown_grace=10)
    try:
        pipelined = charge_request(b"wire-drop-a") + charge_request(b"wire-drop-b")
        assert await read_to_close(dropping.base_url, pipelined, timeout=5.0) == b""
    finally:
        started = asyncio.get_running_loop().time()
        assert await stop_sandbox_process(dropping.process, timeout=15.0) == 0
    assert asyncio.get_running_loop().time() - started < 5.0
    log = await asyncio.to_thread(_provider_logs, tmp_path)
    assert "Traceback" not in log
    assert "Cancel" not in log


def _provider_logs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("provider-*.log"))


async def test_a_request_cut_short_by_the_shutdown_grace_gets_a_problem_answer(
    tmp_path: Path,
) -> None:
    slow = await start_sandbox_process(
        tmp_path, latency_ms_min=4000, latency_ms_max=4000, shutdown_grace=1
    )
    try:
        answer = asyncio.create_task(
            exchange(slow.base_url, charge_request(b"wire-grace"), answers=1, timeout=10.0)
        )
        # SIGTERM once the provider holds the request (in its 4 s latency).
        async with asyncio.timeout(5):
            while True:
                (stats,) = await exchange(
                    slow.base_url, b"GET /v1/stats HTTP/1.1\r\nHost: provider\r\n\r\n", answers=1
                )
                if json_of(stats)["processing"] == 1:
                    break
        slow.process.send_signal(signal.SIGTERM)
        (cut,) = await answer
    finally:
        await stop_sandbox_process(slow.process, timeout=10.0)
    assert cut.status == 503
    assert cut.headers["content-type"].startswith("application/problem+json")
    assert cut.headers["retry-after"] == "1"
