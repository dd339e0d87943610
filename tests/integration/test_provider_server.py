"""The stand-in provider's HTTP server (app.sandbox.http) over real sockets on 127.0.0.1:
an in-process server with a small router of its own, so each test sets the limits and
timings it needs. Requests go out as exact bytes, split where the test chooses, and the
answers are read back byte for byte."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.sandbox import http as server_http
from app.sandbox.http import HttpServer
from app.sandbox.routing import (
    DROPPED,
    Answer,
    BodyTooLarge,
    Reply,
    Request,
    Router,
    UpgradeRefused,
)
from tests.integration.test_elector import until

MAX_BODY = 1000
BIG = 1 << 20


@dataclass
class Seen:
    """What the test router's handlers did."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(payload).encode(), "application/json", headers)


def make_router(seen: Seen) -> Router:
    async def echo(request: Request) -> Reply:
        seen.started.append(f"echo {request.query_string.decode()}")
        body = request.read() if request.method == "POST" else b""
        seen.finished.append(f"echo {request.query_string.decode()}")
        return _json(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string.decode("latin-1"),
                "body": body.decode("latin-1"),
                "headers": [name.decode() for name, _ in request.raw_headers],
            }
        )

    async def slow(request: Request) -> Reply:
        name = request.query.get("name", "")
        seen.started.append(f"slow {name}")
        await asyncio.sleep(float(request.query["s"]))
        seen.finished.append(f"slow {name}")
        return _json({"slept": request.query["s"]})

    async def big(request: Request) -> Reply:
        seen.started.append("big")
        return Answer(200, b"b" * BIG, "application/octet-stream")

    async def drop(request: Request) -> Reply:
        return DROPPED

    async def sized(request: Request) -> Reply:
        seen.started.append(f"sized {request.query['n']}")
        return Answer(200, b"s" * int(request.query["n"]), "application/octet-stream")

    async def no_answer(request: Request) -> Reply:
        return cast(Reply, None)

    async def list_headers(request: Request) -> Reply:
        return Answer(200, b"", "text/plain", cast(dict[str, str], [("A", "b")]))

    async def split(request: Request) -> Reply:
        return Answer(200, b"", "text/plain", {"X-Evil": "a\r\nSet-Cookie: x=1"})

    async def split_type(request: Request) -> Reply:
        return Answer(200, b"", "text/plain\r\nSet-Cookie: x=1")

    async def text_body(request: Request) -> Reply:
        return Answer(200, cast(bytes, "not bytes"), "text/plain")

    router = Router()
    for path, handler in (("/echo", echo), ("/slow", slow), ("/big", big), ("/drop", drop)):
        router.add("GET", path, handler)
    router.add("POST", "/echo", echo)
    router.add("GET", "/", echo)
    router.add("GET", "/split", split)
    router.add("GET", "/split-type", split_type)
    router.add("GET", "/text-body", text_body)
    router.add("GET", "/sized", sized)
    router.add("GET", "/none", no_answer)
    router.add("GET", "/list-headers", list_headers)
    return router


def on_error(request: Request, exc: BaseException) -> Answer:
    if isinstance(exc, BodyTooLarge):
        return _json({"error": "too large"}, 413, {"Connection": "close"})
    if isinstance(exc, UpgradeRefused):
        return _json({"error": "upgrade"}, 400, {"Connection": "close"})
    if isinstance(exc, asyncio.CancelledError):
        return _json({"error": "stopping"}, 503, {"Connection": "close"})
    return _json({"error": type(exc).__name__}, 500)


@dataclass
class Served:
    server: HttpServer
    port: int
    seen: Seen

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def serve(**options: Any) -> Served:
    seen = Seen()
    server = HttpServer(make_router(seen), max_body_bytes=MAX_BODY, on_error=on_error, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    await server.start(sock)
    return Served(server, sock.getsockname()[1], seen)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    started = await serve()
    yield started
    await started.server.shutdown(1.0)


@dataclass
class Answered:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> Answered:
    """One answer, framed by its Content-Length (none read after a HEAD)."""
    status_line = await reader.readuntil(b"\r\n")
    version, status, _ = status_line.decode("latin-1").split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        assert name.lower() not in headers, f"header {name} twice"
        headers[name.lower()] = value.strip()
    body = b"" if head else await reader.readexactly(int(headers["content-length"]))
    return Answered(int(status), headers, body)


async def closes(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """The server closes the connection (and sends nothing more) within ``timeout``."""
    async with asyncio.timeout(timeout):
        return await reader.read() == b""


# --- any requests, split anywhere --------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    method: str
    query: str
    body: bytes
    chunked: tuple[int, ...] | None  # chunk sizes, or None for Content-Length

    def encode(self) -> bytes:
        head = f"{self.method} /echo?{self.query} HTTP/1.1\r\nHost: t\r\n".encode()
        if self.method != "POST":
            return head + b"\r\n"
        if self.chunked is None:
            return head + b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body
        out, at = [head + b"Transfer-Encoding: chunked\r\n\r\n"], 0
        for size in self.chunked:
            piece = self.body[at : at + size]
            at += len(piece)
            if piece:
                out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        out.append(
            b"%x\r\n%s\r\n" % (len(self.body) - at, self.body[at:]) if at < len(self.body) else b""
        )
        out.append(b"0\r\n\r\n")
        return b"".join(out)


sent_requests = st.builds(
    Sent,
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    query=st.text("abcxyz019=&", max_size=12),
    body=st.binary(max_size=MAX_BODY),
    chunked=st.none() | st.lists(st.integers(1, 400), min_size=1, max_size=5).map(tuple),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(sent_requests, min_size=1, max_size=6),
    cuts=st.lists(st.floats(0, 1, exclude_max=True), max_size=8),
)
def test_any_pipelined_requests_split_anywhere_are_answered_whole_and_in_order(
    requests: list[Sent], cuts: list[float]
) -> None:
    asyncio.run(_pipeline(requests, cuts))


async def _pipeline(requests: list[Sent], cuts: list[float]) -> None:
    served = await serve()
    try:
        raw = b"".join(r.encode() for r in requests)
        points = sorted({int(c * len(raw)) for c in cuts} | {0, len(raw)})
        reader, writer = await served.connect()
        for start, end in itertools.pairwise(points):
            writer.write(raw[start:end])
            await writer.drain()
            await asyncio.sleep(0.002)  # a separate read on the server, as a rule
        async with asyncio.timeout(10):
            for sent in requests:
                answer = await read_answer(reader, head=sent.method == "HEAD")
                assert answer.status == 200
                if sent.method == "HEAD":
                    assert int(answer.headers["content-length"]) > 0
                    continue
                echoed = json.loads(answer.body)
                assert echoed["method"] == sent.method
                assert echoed["query"] == sent.query
                assert echoed["body"].encode("latin-1") == (
                    sent.body if sent.method == "POST" else b""
                )
        writer.close()
    finally:
        await served.server.shutdown(1.0)


# --- connections ------------------------------------------------------------------------


async def test_an_idle_or_stalled_connection_closes_after_keep_alive_a_busy_one_does_not() -> None:
    served = await serve(keep_alive=0.3, sweep_every=0.05)
    try:
        idle_r, idle_w = await served.connect()
        idle_w.write(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_answer(idle_r)).status == 200
        stalled_r, stalled_w = await served.connect()
        stalled_w.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        busy_r, busy_w = await served.connect()
        busy_w.write(b"GET /slow?s=1.0 HTTP/1.1\r\nHost: t\r\n\r\n")

        assert await closes(idle_r, timeout=2.0)
        assert await closes(stalled_r, timeout=2.0)
        # Its handler runs three times the keep-alive: the answer still comes.
        async with asyncio.timeout(3):
            assert (await read_answer(busy_r)).status == 200
        for writer in (idle_w, stalled_w, busy_w):
            writer.close()
    finally:
        await served.server.shutdown(1.0)


async def test_http_1_0_and_connection_close_end_the_connection_after_the_answer(
    served: Served,
) -> None:
    for raw in (
        b"GET /echo HTTP/1.0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ):
        reader, writer = await served.connect()
        writer.write(raw + b"GET /echo?never HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = await read_answer(reader)
        assert answer.status == 200
        assert answer.headers["connection"] == "close"
        assert await closes(reader)
        writer.close()
    assert "echo never" not in served.seen.started


async def test_100_continue_waits_for_the_answers_before_it(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(
        b"GET /slow?s=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    first = await read_answer(reader)
    assert first.status == 200
    assert json.loads(first.body) == {"slept": "0.3"}  # the slow answer came first, whole
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    second = await read_answer(reader)
    assert json.loads(second.body)["body"] == "hello"
    writer.close()


async def test_bodies_over_the_limit_are_refused_declared_or_chunked(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    )
    answer = await read_answer(reader)
    assert (answer.status, answer.headers["connection"]) == (413, "close")
    assert await closes(reader)
    writer.close()

    reader, writer = await served.connect()
    piece = b"x" * 400
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(piece), piece) * 3  # 1,200 bytes and no end
    )
    answer = await read_answer(reader)
    assert (answer.status, answer.headers["connection"]) == (413, "close")
    assert await closes(reader)
    writer.close()


async def test_bytes_that_are_not_http_are_refused_after_the_answers_owed(
    served: Served,
) -> None:
    reader, writer = await served.connect()
    writer.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\x00\x01 / HTTP/9\r\n\r\n")
    owed = await read_answer(reader)
    assert owed.status == 200
    refused = await read_answer(reader)
    assert (refused.status, refused.headers["connection"]) == (400, "close")
    assert await closes(reader)
    writer.close()

    reader, writer = await served.connect()
    writer.write(b"GET http://[::1 HTTP/1.1\r\nHost: t\r\n\r\n")  # a target that does not parse
    assert (await read_answer(reader)).status == 400
    writer.close()


@pytest.mark.parametrize("path", ["/split", "/split-type", "/text-body", "/none", "/list-headers"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_answer_that_cannot_be_sent_as_it_is_becomes_a_500(
    served: Served, path: str, method: str
) -> None:
    reader, writer = await served.connect()
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        + b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    answer = await read_answer(reader, head=method == "HEAD")
    assert answer.status == 500
    assert "set-cookie" not in answer.headers
    after = await read_answer(reader)  # the connection is still in step
    assert json.loads(after.body)["path"] == "/echo"
    writer.close()


async def test_a_dropped_answer_closes_without_a_byte(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(
        b"GET /drop HTTP/1.1\r\nHost: t\r\n\r\nGET /echo?behind HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert await closes(reader)
    writer.close()
    assert "echo behind" not in served.seen.started


async def test_a_client_that_leaves_mid_request_lets_its_handler_finish(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _, writer = await served.connect()
    writer.write(
        b"GET /slow?s=0.2&name=left HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /echo?behind HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    await until(lambda: "slow left" in served.seen.started, "the slow request runs")
    writer.transport.abort()  # a reset, not a polite close
    await until(lambda: not served.server.tasks, "the slow request ends")
    assert served.seen.finished == ["slow left"]  # it ran to its end
    await asyncio.sleep(0.1)  # time for what must not happen: the request behind it
    assert "echo behind" not in served.seen.started
    assert not served.server.tasks
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_client_that_does_not_read_stops_its_requests_until_it_reads(
    served: Served,
) -> None:
    reader, writer = await served.connect()
    count = 40  # 1 MiB answers: 40 MiB in the provider if nothing held it back
    writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * count)
    await writer.drain()
    await asyncio.sleep(0.5)
    # A few answers fill the loopback's socket buffers (a few MiB) and the connection's
    # write buffer; then no handler starts until the client reads.
    assert served.seen.started.count("big") < count // 2
    async with asyncio.timeout(30):
        for _ in range(count):
            answer = await read_answer(reader)
            assert (answer.status, len(answer.body)) == (200, BIG)
    assert served.seen.started.count("big") == count
    writer.close()


async def test_shutdown_lets_requests_finish_within_the_grace_then_answers_the_rest() -> None:
    served = await serve()
    quick_r, quick_w = await served.connect()
    quick_w.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: t\r\n\r\n")
    stuck_r, stuck_w = await served.connect()
    stuck_w.write(b"GET /slow?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    idle_r, idle_w = await served.connect()
    await until(
        lambda: len(served.server.tasks) == 2 and len(served.server.connections) == 3,
        "both requests running, three connections",
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await served.server.shutdown(0.6)
    took = loop.time() - started

    assert 0.6 <= took < 2.0
    quick = await read_answer(quick_r)
    assert (quick.status, quick.headers["connection"]) == (200, "close")
    stuck = await read_answer(stuck_r)
    assert (stuck.status, json.loads(stuck.body)) == (503, {"error": "stopping"})
    for reader in (quick_r, stuck_r, idle_r):
        assert await closes(reader, timeout=1.0)
    with pytest.raises(ConnectionRefusedError):
        await served.connect()  # no longer accepting
    for writer in (quick_w, stuck_w, idle_w):
        writer.close()


def test_answers_are_encoded_once_with_their_framing() -> None:
    answer = Answer(201, b'{"a":1}', "application/json", {"Location": "/x", "Connection": "close"})
    data, close = server_http.encode_answer(answer, date=b"D", with_body=True, close=True)
    assert data == (
        b"HTTP/1.1 201 Created\r\ndate: D\r\ncontent-type: application/json\r\n"
        b"content-length: 7\r\nLocation: /x\r\nconnection: close\r\n\r\n"
        b'{"a":1}'
    )
    assert close
    # The answer's own Connection: close closes too, said once.
    head, close = server_http.encode_answer(answer, date=b"D", with_body=False, close=False)
    assert head.endswith(b"content-length: 7\r\nLocation: /x\r\nconnection: close\r\n\r\n")
    assert close
    staying = Answer(201, b'{"a":1}', "application/json", {"Location": "/x"})
    head, close = server_http.encode_answer(staying, date=b"D", with_body=False, close=False)
    assert head.endswith(b"content-length: 7\r\nLocation: /x\r\n\r\n")
    assert not close
    unknown, close = server_http.encode_answer(
        Answer(599, b"", "text/plain"), date=b"D", with_body=True, close=False
    )
    assert unknown.startswith(b"HTTP/1.1 599 \r\n")
    assert not close
    for value in ("a\r\nb", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="would split the answer"):
            server_http.encode_answer(
                Answer(200, b"", "text/plain", {"X": value}), date=b"D", with_body=True, close=False
            )


async def test_the_access_log_names_each_request_and_its_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="paydispatch.provider.access")
    served = await serve(access_log=True)
    try:
        reader, writer = await served.connect()
        writer.write(
            b"GET /echo?x=1 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /no%0D%0AERROR%20forged HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        await read_answer(reader)
        await read_answer(reader)
        writer.close()
    finally:
        await served.server.shutdown(1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "paydispatch.provider.access"]
    assert [line.split(" - ", 1)[1] for line in lines] == [
        '"GET /echo?x=1" 200',
        '"GET /no%0D%0AERROR%20forged" 500',  # as sent: no line of the log forged
    ]
    assert lines[0].startswith("127.0.0.1:")


async def test_a_client_that_never_reads_is_cut_off_after_keep_alive() -> None:
    served = await serve(keep_alive=0.3, sweep_every=0.05)
    try:
        _, writer = await served.connect()
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 20)
        await writer.drain()
        await until(lambda: not served.server.connections, "the connection cut off")
        writer.close()
    finally:
        await served.server.shutdown(1.0)


async def test_trailers_are_not_headers_and_count_against_the_limits(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nIdempotency-Key: smuggled\r\n\r\n"
    )
    echoed = json.loads((await read_answer(reader)).body)
    assert echoed["body"] == "hello"
    assert echoed["headers"] == ["host", "transfer-encoding"]
    writer.close()

    reader, writer = await served.connect()
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Endless: "
    )
    answered = asyncio.create_task(read_answer(reader))
    for _ in range(40):  # up to 1.6 MiB of one trailer, never ended
        if answered.done():
            break
        writer.write(b"a" * 40_000)
        await writer.drain()
    async with asyncio.timeout(5):
        answer = await answered
    assert (answer.status, answer.headers["connection"]) == (413, "close")
    assert await closes(reader)
    writer.close()


async def test_pipelined_requests_are_parsed_only_so_far_ahead(served: Served) -> None:
    reader, writer = await served.connect()
    count = 20_000  # 540 KB of small requests behind a slow one
    writer.write(
        b"GET /slow?s=0.5 HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /echo HTTP/1.1\r\n\r\n" * count
    )
    await asyncio.sleep(0.3)
    (connection,) = served.server.connections
    bound = server_http.MAX_PIPELINED + server_http.FEED_SLICE // len(b"GET /echo HTTP/1.1\r\n\r\n")
    assert 0 < connection.waiting <= bound + 1
    async with asyncio.timeout(60):
        assert (await read_answer(reader)).status == 200
        for _ in range(count):
            assert (await read_answer(reader)).status == 200
    writer.close()


async def test_an_http_1_0_expectation_gets_no_100_continue(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.read(1)
    writer.write(b"hello")
    answer = await read_answer(reader)
    assert json.loads(answer.body)["body"] == "hello"
    assert await closes(reader)
    writer.close()


async def test_a_head_over_the_bound_is_refused_however_it_arrives(served: Served) -> None:
    for pad in (70_000, 100_000, 300_000):
        reader, writer = await served.connect()
        writer.write(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n")
        answer = await read_answer(reader)
        assert answer.status == 431, pad
        assert await closes(reader)
        writer.close()


async def test_a_refused_body_can_still_be_sent_without_a_reset(served: Served) -> None:
    reader, writer = await served.connect()
    size = 4 << 20
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    answer = await read_answer(reader)
    assert (answer.status, answer.headers["connection"]) == (413, "close")
    for _ in range(size // 65536):  # the client sends its body anyway, then reads on
        writer.write(b"x" * 65536)
        await writer.drain()
    assert await closes(reader)  # a FIN, not a reset
    writer.close()


async def test_an_absolute_target_without_a_path_is_the_root(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(b"GET http://provider HTTP/1.1\r\nHost: provider\r\n\r\n")
    assert json.loads((await read_answer(reader)).body)["path"] == "/"
    writer.close()


async def test_nothing_queued_starts_after_the_clients_fin(served: Served) -> None:
    """Even while answers already written still wait to be sent (the transport does not
    close until they are): a FIN ends the connection's requests there and then."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    sock.connect(("127.0.0.1", served.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    await until(lambda: bool(served.server.connections), "the connection accepted")
    (connection,) = served.server.connections
    for _ in range(400):  # answers the client does not read, until some wait in the provider
        writer.write(b"GET /sized?n=8000 HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.01)
        if connection.unsent:
            break
    assert 0 < connection.unsent < 65536  # held, and below the high-water mark
    writer.write(
        b"GET /slow?s=0.3&name=running HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"GET /echo?behind HTTP/1.1\r\nHost: t\r\n\r\n" * 3
    )
    await until(lambda: "slow running" in served.seen.started, "the slow request runs")
    writer.write_eof()
    await until(lambda: "slow running" in served.seen.finished, "the slow request ends")
    await asyncio.sleep(0.1)  # time for what must not happen: the requests behind it
    assert "echo behind" not in served.seen.started
    writer.close()


async def test_a_linger_shorter_than_keep_alive_is_not_cut_short() -> None:
    served = await serve(keep_alive=0.3, sweep_every=0.05)
    try:
        reader, writer = await served.connect()
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (4 << 20))
        answer = await read_answer(reader)
        assert answer.status == 413
        # The client trickles its refused body for longer than keep-alive, shorter than
        # the linger: every write must land (a reset would fail one).
        for _ in range(12):
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)
        assert await closes(reader)
        writer.close()
    finally:
        await served.server.shutdown(1.0)
