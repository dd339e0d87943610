"""The leader's provider connections (``app.dispatch.provider_http``) against a real TCP
server on 127.0.0.1 that answers with exact bytes: every framing HTTP/1.1 allows, split at
any point, and the ways a broken or hostile endpoint answers (garbage, a close or reset at any
moment, an answer that never ends, bytes nobody asked for). No mocks: real sockets, real
timeouts, real TLS (trustme certificates).

The property that matters for payments: an answer is returned only when it arrived whole and
belongs to the request that was sent; everything else is ProviderHTTPError (the dispatcher's
unknown outcome, retried under the same key), and no connection is reused out of step.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import trustme
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.dispatch.provider_http import (
    MAX_INTERIM_ANSWERS,
    Answer,
    ProviderConnections,
    ProviderHTTPError,
    ProviderHTTPTimeout,
)


@dataclass(frozen=True)
class Received:
    """A request as the server read it."""

    head: bytes
    body: bytes
    connection: int  # which accepted connection (1, 2, ...) carried it

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


CLOSE = b"<close>"  # script step: close the connection (FIN)
RESET = b"<reset>"  # script step: reset the connection (RST)
HANG = b"<hang>"  # script step: never write again on this connection
Script = list[bytes]  # bytes to write (each its own write), or one of the steps above


@dataclass
class ScriptedServer:
    """Reads each request whole and answers with ``answer(request)``'s script."""

    answer: Callable[[Received], Script]
    port: int = 0
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                request = Received(head, body, number)
                self.received.append(request)
                if await self._play(self.answer(request), writer):
                    return
        finally:
            self.open_now -= 1
            writer.close()

    async def _play(self, script: Script, writer: asyncio.StreamWriter) -> bool:
        """Write the script; True when it ended the connection."""
        try:
            for step in script:
                if step == CLOSE:
                    writer.close()
                    return True
                if step == RESET:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return True
                if step == HANG:
                    await asyncio.sleep(3600)
                writer.write(step)
                await writer.drain()
                await asyncio.sleep(0.001)  # separate reads on the client's side
        except ConnectionError:
            return True  # the client gave up on the connection
        return False


@contextlib.asynccontextmanager
async def scripted(
    answer: Callable[[Received], Script], *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.wait_closed(), 1)


def ok(body: bytes, status: int = 201, extra: bytes = b"") -> Script:
    return [
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (status, len(body), extra, body)
    ]


def echo_key(request: Received) -> Script:
    """Answers with the request's own Idempotency-Key: proves which request an answer is for."""
    return ok(b'{"key": "%s"}' % (request.header("Idempotency-Key") or "").encode())


def client(server: ScriptedServer, **kwargs: object) -> ProviderConnections:
    options: dict[str, object] = {"limit": 4, **kwargs}
    return ProviderConnections(f"http://127.0.0.1:{server.port}", **options)  # type: ignore[arg-type]


async def post(http: ProviderConnections, key: str = "k", timeout: float = 5.0) -> Answer:
    return await http.request(
        "POST",
        "/v1/charges",
        headers=[("Idempotency-Key", key), ("Content-Type", "application/json")],
        body=b'{"amount": 1}',
        timeout=timeout,
    )


async def test_sequential_calls_share_one_keep_alive_connection() -> None:
    async with scripted(echo_key) as server:
        http = client(server)
        try:
            for n in range(50):
                answer = await post(http, key=f"k{n}")
                assert answer.status == 201
                assert answer.body == b'{"key": "k%d"}' % n
        finally:
            await http.close()
    assert server.connections == 1
    request = server.received[0]
    assert request.head.startswith(b"POST /v1/charges HTTP/1.1\r\n")
    assert request.header("Host") == f"127.0.0.1:{server.port}"
    assert request.header("Content-Length") == "13"
    assert request.body == b'{"amount": 1}'


async def test_no_more_connections_than_the_limit_and_every_answer_to_its_own_request() -> None:
    def delayed(request: Received) -> Script:
        return [b"", *echo_key(request)]

    async with scripted(delayed) as server:
        http = client(server, limit=3)
        try:
            answers = await asyncio.gather(*(post(http, key=f"k{n}") for n in range(40)))
        finally:
            await http.close()
    assert server.most_open <= 3
    assert [a.body for a in answers] == [b'{"key": "k%d"}' % n for n in range(40)]


# --- every framing HTTP/1.1 allows, split anywhere ------------------------------------------


@st.composite
def framed_answers(draw: st.DrawFn) -> tuple[int, bytes, str | None, bytes, bool]:
    """(status, body, Retry-After, the answer's bytes, whether the server closes after)."""
    status = draw(st.sampled_from([200, 201, 202, 400, 402, 409, 422, 429, 500, 503]))
    body = draw(st.binary(max_size=3000))
    retry_after = draw(st.none() | st.sampled_from(["1", "120", "Wed, 21 Oct 2026 07:28:00 GMT"]))
    headers = b"Content-Type: application/json\r\n"
    if retry_after is not None:
        headers += b"Retry-After: %s\r\n" % retry_after.encode()
    framing = draw(st.sampled_from(["length", "chunked"]))
    close = draw(st.booleans())
    if close:
        headers += b"Connection: close\r\n"
    if framing == "length":
        payload = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    elif framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        extension = draw(st.sampled_from([b"", b";ext=1"]))
        chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
        # A trailer is never taken for a header (a Retry-After here means nothing).
        trailer = draw(st.sampled_from([b"", b"X-Trailer: t\r\n", b"Retry-After: 9\r\n"]))
        payload = b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n" + trailer + b"\r\n"
    interim = draw(
        st.lists(
            st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early\r\n\r\n"]),
            max_size=MAX_INTERIM_ANSWERS,
        )
    )
    raw = b"".join(interim) + b"HTTP/1.1 %d Whatever\r\n" % status + headers + payload
    return status, body, retry_after, raw, close


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(answer=framed_answers(), splits=st.lists(st.integers(1, 4000), max_size=6))
async def test_any_whole_answer_split_anywhere_is_read_exactly(
    answer: tuple[int, bytes, str | None, bytes, bool], splits: list[int]
) -> None:
    status, body, retry_after, raw, close = answer
    cuts = sorted({c for c in splits if c < len(raw)})
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]

    def script(request: Received) -> Script:
        if request.header("Idempotency-Key") == "then":
            return echo_key(request)
        return [*parts, CLOSE] if close else parts

    async with scripted(script) as server:
        http = client(server)
        try:
            got = await post(http)
            # The connection after it: reused only if the answer allowed it, and in step.
            after = await post(http, key="then")
        finally:
            await http.close()
    assert (got.status, got.body) == (status, body)
    assert got.headers.get("retry-after") == retry_after
    assert after.body == b'{"key": "then"}'
    assert server.connections == (2 if close else 1)


# --- what a broken or hostile endpoint sends ----------------------------------------------


BROKEN: dict[str, Script] = {
    "close before answering": [CLOSE],
    "reset before answering": [RESET],
    "close after the status line": [b"HTTP/1.1 201 Created\r\n", CLOSE],
    "close mid-body": [b'HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{"id":', CLOSE],
    "reset mid-body": [b'HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{"id":', RESET],
    "close mid-chunk": [
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc",
        CLOSE,
    ],
    "reset after an unframed body": [b'HTTP/1.1 201 Created\r\n\r\n{"id": 1}', RESET],
    "not HTTP": [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"],
    "a bad status line": [b"HTTP/1.1 2O1 Created\r\nContent-Length: 0\r\n\r\n"],
    "two lengths": [b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab"],
    "a bad chunk size": [b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    "switching protocols": [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"],
    "an endless body": [b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"]
    + [b"1000\r\n" + b"x" * 4096 + b"\r\n"] * 40,
    "endless headers": [b"HTTP/1.1 201 Created\r\n"] + [b"X-Pad: " + b"y" * 4000 + b"\r\n"] * 40,
    # httptools buffers a header whole before reporting it: the cap counts bytes as they come.
    "one endless header": [b"HTTP/1.1 201 Created\r\nX-Pad: "] + [b"y" * 16384] * 64,
    "endless interim answers": [b"HTTP/1.1 100 Continue\r\n\r\n" * 20],
    # Neither length nor chunked: its end would be the connection's, which a crash, a
    # proxy's cut or a TLS truncation also give. Never taken, even when whole.
    "an unframed body, then a close": [b'HTTP/1.1 201 Created\r\n\r\n{"id": 1}', CLOSE],
    "an unframed body, connection kept": [b'HTTP/1.1 201 Created\r\n\r\n{"id": 1}'],
    "a transfer coding other than chunked": [
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: gzip\r\n\r\nxx"
    ],
    "a body longer than its length": [b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabcdef"],
    "length and chunked at once": [
        b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    ],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_an_answer_that_is_not_whole_is_an_error_and_the_next_call_is_in_step(
    name: str,
) -> None:
    def script(request: Received) -> Script:
        if request.header("Idempotency-Key") == "then":
            return echo_key(request)
        return BROKEN[name]

    async with scripted(script) as server:
        http = client(server, max_answer_bytes=64 * 1024)
        try:
            with pytest.raises(ProviderHTTPError) as caught:
                await post(http)
            # At once, from what arrived: never by waiting out the call's time.
            assert not isinstance(caught.value, ProviderHTTPTimeout), caught.value
            after = await post(http, key="then")
        finally:
            await http.close()
    assert after.body == b'{"key": "then"}'
    assert server.connections == 2  # the broken connection was never reused


async def test_no_answer_within_the_timeout_is_a_timeout_and_a_late_answer_is_never_taken() -> None:
    def script(request: Received) -> Script:
        if request.header("Idempotency-Key") == "slow":
            return [b"", HANG]
        return echo_key(request)

    async with scripted(script) as server:
        http = client(server, limit=1)
        try:
            with pytest.raises(ProviderHTTPTimeout, match=r"within 0\.20s"):
                await post(http, key="slow", timeout=0.2)
            after = await post(http, key="then")
        finally:
            await http.close()
    assert after.body == b'{"key": "then"}'
    assert server.connections == 2


STALE = b'HTTP/1.1 201 Created\r\nContent-Length: 16\r\n\r\n{"key": "stale"}'
# name → (the script for a first answer, whether that first answer stands)
TRAILING: dict[str, tuple[Callable[[bytes], Script], bool]] = {
    # The answer, then another one in the same write: which one is ours is unknowable.
    "a whole answer in the same write": (lambda answer: [answer + STALE], False),
    # The answer, then the start of another: the same, and a parser left mid-message.
    "half an answer in the same write": (lambda answer: [answer + STALE[:30]], False),
    # The answer, then another one later, while the connection is idle.
    "a whole answer later": (lambda answer: [answer, STALE], True),
}


@pytest.mark.parametrize("name", sorted(TRAILING))
async def test_bytes_nobody_asked_for_are_never_taken_as_the_next_answer(name: str) -> None:
    trailing, first_stands = TRAILING[name]

    def script(request: Received) -> Script:
        if request.header("Idempotency-Key") == "first":
            return trailing(ok(b'{"key": "first"}')[0])
        return echo_key(request)

    async with scripted(script) as server:
        http = client(server, limit=1)
        try:
            if first_stands:
                first = await post(http, key="first")
                assert first.body == b'{"key": "first"}'
            else:
                with pytest.raises(ProviderHTTPError, match="more than one answer"):
                    await post(http, key="first")
            await asyncio.sleep(0.05)
            after = await post(http, key="then")
            again = await post(http, key="again")
        finally:
            await http.close()
    assert after.body == b'{"key": "then"}'
    assert again.body == b'{"key": "again"}'
    assert [r.connection for r in server.received] == [1, 2, 2]


def threaded_server(answers: list[list[bytes]]) -> tuple[socket.socket, list[bytes]]:
    """A server on its own thread (it keeps writing while the test holds the event loop):
    connection n reads one request and writes ``answers[n]``, each part 20 ms apart, then
    answers every further request with its Idempotency-Key. Returns the listening socket
    (close it to stop) and the requests' heads as read."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []

    def serve(conn: socket.socket, parts: list[bytes]) -> None:
        with conn, contextlib.suppress(OSError):  # the client may reset a connection it drops
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(Received(head, b"", 0).header("Content-Length") or 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                heads.append(head)
                if parts:
                    for part in parts:
                        conn.sendall(part)
                        time.sleep(0.02)
                    parts = []
                else:
                    conn.sendall(echo_key(Received(head, b"", 0))[0])

    def accept() -> None:
        for parts in answers:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn, list(parts)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, heads


async def test_stray_bytes_not_yet_read_when_a_connection_is_reused_are_not_its_answer() -> None:
    # The stray answer reaches the socket while the loop is busy elsewhere (held here with a
    # blocking sleep), so data_received has not seen it when the connection is taken again.
    listener, heads = threaded_server([[ok(b'{"key": "first"}')[0], STALE], []])
    http = ProviderConnections(f"http://127.0.0.1:{listener.getsockname()[1]}", limit=1)
    try:
        first = await post(http, key="first")
        time.sleep(0.2)  # noqa: ASYNC251 - the loop held on purpose: the stray bytes arrive unread
        after = await post(http, key="then")
    finally:
        await http.close()
        listener.close()
    assert first.body == b'{"key": "first"}'
    assert after.body == b'{"key": "then"}'
    assert len(heads) == 2


async def test_closing_the_client_ends_a_call_under_way_with_an_error() -> None:
    def script(request: Received) -> Script:
        return [b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{", HANG]

    async with scripted(script) as server:
        http = client(server)
        call = asyncio.create_task(post(http))
        await asyncio.sleep(0.2)  # the answer's first bytes are in
        assert server.received
        await http.close()
        with pytest.raises(ProviderHTTPError, match="closed by paydispatch"):
            await call
        with pytest.raises(ProviderHTTPError, match="client is closed"):
            await post(http)


async def test_an_idle_connection_past_its_age_is_replaced() -> None:
    async with scripted(echo_key) as server:
        http = client(server, idle_seconds=0.05)
        try:
            await post(http, key="a")
            await post(http, key="b")
            await asyncio.sleep(0.1)
            await post(http, key="c")
        finally:
            await http.close()
    assert [r.connection for r in server.received] == [1, 1, 2]


async def test_an_idle_connection_the_provider_closed_is_not_reused() -> None:
    def script(request: Received) -> Script:
        return (
            [*echo_key(request), CLOSE]
            if request.header("Idempotency-Key") == "a"
            else echo_key(request)
        )

    async with scripted(script) as server:
        http = client(server)
        try:
            await post(http, key="a")  # the server closes after answering, without saying so
            await asyncio.sleep(0.05)
            after = await post(http, key="b")
        finally:
            await http.close()
    assert after.body == b'{"key": "b"}'


async def test_nothing_can_be_framed_out_of_a_header_value() -> None:
    async with scripted(echo_key) as server:
        http = client(server)
        try:
            with pytest.raises(ValueError, match="line break"):
                await post(http, key="k\r\nX-Injected: 1")
        finally:
            await http.close()
    assert server.received == []


@pytest.mark.parametrize("method", ["HEAD", "CONNECT", "PUT"])
async def test_a_method_whose_answer_is_framed_otherwise_is_refused(method: str) -> None:
    http = ProviderConnections("http://127.0.0.1:9", limit=1)
    with pytest.raises(ValueError, match="method must be"):
        await http.request(method, "/v1/charges", timeout=1)
    await http.close()


async def test_a_refused_connection_is_an_error_naming_the_address() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        http = ProviderConnections(f"http://127.0.0.1:{port}", limit=1)
        with pytest.raises(ProviderHTTPError, match=f"127.0.0.1:{port}"):
            await post(http)
        await http.close()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1",
        "http://",
        "127.0.0.1:8081",
        "http://h/?q=1",
        "http://h:99999",
        "http://user:secret@h/",
        "http://h/a path",
        "http://h/caf\u00e9",
    ],
)
def test_a_base_url_it_cannot_use_is_refused_up_front(url: str) -> None:
    with pytest.raises(ValueError, match=r"provider URL|Port"):
        ProviderConnections(url, limit=1)


async def test_a_base_path_prefixes_every_request() -> None:
    async with scripted(echo_key) as server:
        http = ProviderConnections(f"http://127.0.0.1:{server.port}/sandbox/", limit=1)
        try:
            await http.request("GET", "/v1/charges?limit=1", timeout=5)
        finally:
            await http.close()
    assert server.received[0].head.startswith(b"GET /sandbox/v1/charges?limit=1 HTTP/1.1\r\n")


async def test_https_with_a_trusted_certificate_and_refused_with_an_untrusted_one() -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with scripted(echo_key, tls=server_tls) as server:
        http = ProviderConnections(
            f"https://localhost:{server.port}", limit=1, ssl_context=trusting
        )
        try:
            answer = await post(http, key="tls")
        finally:
            await http.close()
        assert answer.body == b'{"key": "tls"}'
        strange = ProviderConnections(
            f"https://localhost:{server.port}", limit=1, ssl_context=ssl.create_default_context()
        )
        try:
            with pytest.raises(ProviderHTTPError, match="certificate"):
                await post(strange)
        finally:
            await strange.close()
