"""Keep-alive HTTP/1.1 connections to the payment provider: write a request, read one whole
answer, reuse the connection.

Why not aiohttp's client, which the rest of the project uses: on the leader it was more than
half of the CPU per payment. Measured on this project's box, 10,000 charges to the stand-in
provider, 64 in flight, client CPU per request: aiohttp 0.25 ms, this module 0.07 ms. What a
charge needs from HTTP is small — one origin, one request at a time per connection, a body of
a few hundred bytes each way, never a redirect, cookie, proxy or compression — and aiohttp pays
for the general case on every call (request and response objects, header multidicts, timers,
tracing hooks, the connector's bookkeeping).

The bytes of an answer are parsed by httptools (llhttp, the parser Node.js ships), never by
hand: status line, headers, chunked and length framing, interim 1xx answers. This module only
keeps connections, frames requests, enforces limits and decides when an answer is provably
whole: framed by Content-Length or chunked encoding, complete, and followed by nothing the
provider was not asked for. Anything else is ProviderHTTPError — for a charge, an unknown
outcome, retried under the same key — and the connection is never used again.
"""

from __future__ import annotations

import asyncio
import functools
import select
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# Bytes an answer may take (status line, headers and body, interim answers included): more is
# not a charge. Counted as bytes arrive, so neither an endless body nor one endless header
# (httptools buffers a header whole before it reports it) is ever buffered past it.
DEFAULT_MAX_ANSWER_BYTES = 1 << 20
# Interim (1xx) answers tolerated before the real one: a server that sends them forever is
# not answering.
MAX_INTERIM_ANSWERS = 8
# Idle connections older than this are closed rather than reused: below the shortest
# keep-alive timeouts in common use (5 s: uvicorn, Node.js, Apache), so a request is rarely
# written on a connection the provider is just closing — which would cost an unknown outcome.
DEFAULT_IDLE_SECONDS = 4.0
METHODS = frozenset({"GET", "POST"})  # HEAD and CONNECT answers would be framed differently
_FORBIDDEN_IN_HEADERS = frozenset("\r\n\0")
_FORBIDDEN_IN_PATH = frozenset(" \t\r\n\0")


class ProviderHTTPError(Exception):
    """The provider's answer could not be read whole (connection lost, malformed, too large,
    not framed). Whether the provider acted on the request is unknown."""


class ProviderHTTPTimeout(ProviderHTTPError):
    """No whole answer arrived within the call's time limit."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One whole HTTP answer. ``headers`` has lower-cased names, each with its first value
    (trailers are not merged in)."""

    status: int
    headers: dict[str, str]
    body: bytes


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    """The system's CA store, loaded once per process (tens of milliseconds: call it off the
    event loop the first time)."""
    return ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a base URL points: scheme, host, port, path prefix and the Host header."""

    tls: bool
    host: str
    port: int
    path: str  # without a trailing slash
    host_header: str


def parse_origin(base_url: str) -> Origin:
    """The origin of ``base_url``; ValueError saying what is wrong with it otherwise (the
    settings check ``PAYDISPATCH_PROVIDER_URL`` with this, so a URL these connections
    cannot use is a configuration error, not a failure at the first term)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"provider URL must be http:// or https:// with a host: {base_url!r}")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"provider URL must not have a query, fragment or user info: {base_url!r}")
    if _FORBIDDEN_IN_PATH.intersection(parts.path) or not parts.path.isascii():
        raise ValueError(f"provider URL path must be plain ASCII without spaces: {base_url!r}")
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    port = parts.port or default_port  # raises on an invalid port
    host = parts.hostname
    bracketed = f"[{host.split('%')[0]}]" if ":" in host else host
    return Origin(
        tls=tls,
        host=host,
        port=port,
        path=parts.path.rstrip("/"),
        host_header=bracketed if port == default_port else f"{bracketed}:{port}",
    )


class _Connection(asyncio.Protocol):
    """One connection: at most one exchange at a time, parsed by httptools."""

    def __init__(self, max_answer_bytes: int) -> None:
        self._max = max_answer_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._answer: Answer | None = None  # parsed, handed over once its read is done
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._received = 0  # bytes of this exchange so far
        self._interim = 0
        self._headers_done = False
        self._keep_alive = True
        self.closed = False
        self.idle_since = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._answer is not None:
            # Bytes nobody asked for: the provider is out of step with us, so nothing more
            # read on this connection could be matched to a request.
            self.close()
            return
        self._received += len(data)
        if self._received > self._max:
            self._fail(f"the provider's answer exceeds {self._max} bytes")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the provider switched protocols instead of answering")
            return
        except httptools.HttpParserError as exc:
            # A callback's own error (framing, bytes out of step) comes wrapped.
            cause = exc.__context__
            if isinstance(cause, ProviderHTTPError):
                self._fail(str(cause))
            else:
                self._fail(f"malformed HTTP answer from the provider: {exc}")
            return
        if self._answer is not None:
            # Handed over only now: bytes after the answer in the same read (a second
            # answer, a body longer than its Content-Length) would have failed it above.
            self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        reason = f": {exc}" if exc is not None else ""
        what = "mid-answer" if self._headers_done or self._body else "before answering"
        self._fail(f"the provider closed the connection {what}{reason}")

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._answer is not None:
            # A second answer behind the first, in the same read: out of step with us.
            raise ProviderHTTPError("the provider sent more than one answer to one request")
        self._headers = {}
        self._body = []
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer: never taken for a header (RFC 9110, 6.5)
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self._parser.get_status_code()
        if status < 200:
            return
        # Asked here: llhttp forgets a message's flags once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        framed = (
            "content-length" in self._headers
            or self._headers.get("transfer-encoding", "").lower().rstrip().endswith("chunked")
            or status in (204, 304)
        )
        if not framed:
            # Its end would be the connection's, which a crash, a proxy's idle cut or a
            # TLS truncation also give: such a body can never be proven whole.
            raise ProviderHTTPError(
                f"the provider's {status} answer has neither Content-Length nor chunked "
                "framing: it cannot be told apart from a cut-off one"
            )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # 100 Continue, 103 Early Hints: interim, the real answer follows.
            self._interim += 1
            if self._interim > MAX_INTERIM_ANSWERS:
                raise ProviderHTTPError(
                    f"the provider sent over {MAX_INTERIM_ANSWERS} interim answers"
                )
            self._headers_done = False
            return
        self._answer = Answer(status, self._headers, b"".join(self._body))
        self._body = []

    # -- the exchange ------------------------------------------------------------------------

    async def exchange(self, request: bytes) -> Answer:
        """Send ``request`` and wait for its whole answer."""
        transport = self._transport
        if transport is None or self.closed or transport.is_closing():
            raise ProviderHTTPError("the connection to the provider is closed")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._answer = None
        self._received = 0
        self._interim = 0
        transport.write(request)
        answer: Answer = await waiter
        return answer

    @property
    def reusable(self) -> bool:
        """True when the last exchange ended whole and the provider keeps the connection."""
        waiter = self._waiter
        return (
            self._keep_alive
            and not self.closed
            and self._transport is not None
            and not self._transport.is_closing()
            and waiter is not None
            and waiter.done()
            and not waiter.cancelled()
            and waiter.exception() is None
        )

    def quiet(self) -> bool:
        """True when nothing waits unread on the socket. Bytes that arrived since the last
        answer but have not reached ``data_received`` yet (the loop had not polled) would
        otherwise be read as the answer to the next request."""
        transport = self._transport
        if transport is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
        return not readable

    def close(self) -> None:
        """Close the connection; an exchange still waiting ends with ProviderHTTPError."""
        self._fail("the connection to the provider was closed by paydispatch")

    def _deliver(self) -> None:
        waiter, answer = self._waiter, self._answer
        if waiter is None or answer is None or waiter.done():
            return
        waiter.set_result(answer)
        self.idle_since = time.monotonic()
        if not self._keep_alive:
            self.close()

    def _fail(self, message: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProviderHTTPError(message))
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class ProviderConnections:
    """A bounded set of keep-alive connections to one provider origin.

    At most ``limit`` exchanges run at once (more wait for a connection); a connection is
    reused only after a whole answer that lets it be, when nothing unread waits on it, and
    never after a timeout, a cancellation or an error, whose bytes could still arrive.
    Nothing is retried here: a request that may have reached the provider is the
    dispatcher's to retry under its key.
    """

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"connection limit must be at least 1, not {limit}")
        origin = parse_origin(base_url)
        self.tls, self.host, self.port, self.path = (
            origin.tls,
            origin.host,
            origin.port,
            origin.path,
        )
        self._host_header = origin.host_header
        self._ssl = ssl_context
        self._max = max_answer_bytes
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        timeout: float,
    ) -> Answer:
        """Send one request to ``target`` (a path under the base URL, with its query) and
        return the whole answer. Raises ProviderHTTPTimeout past ``timeout`` seconds (waiting
        for a free connection included) and ProviderHTTPError when no whole answer came
        (connecting failed included)."""
        request = self._frame(method, target, headers, body)
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    connection = await self._connection()
                    try:
                        return await connection.exchange(request)
                    finally:
                        self._busy.discard(connection)
                        self._give_back(connection)
        except TimeoutError as exc:
            raise ProviderHTTPTimeout(f"the provider did not answer within {timeout:.2f}s") from exc
        except (OSError, UnicodeError) as exc:  # refused, reset, TLS, DNS, IDNA
            raise ProviderHTTPError(
                f"cannot reach the provider at {self.host}:{self.port}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close every connection (exchanges under way end with ProviderHTTPError); requests
        after this fail."""
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        # Let the transports' close callbacks run before the loop may be closed.
        await asyncio.sleep(0)

    async def _connection(self) -> _Connection:
        self._check_open()
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            if now - connection.idle_since > self._idle_seconds:
                # The most recently used is on top: everything under it is older still.
                connection.close()
                for older in self._idle:
                    older.close()
                self._idle.clear()
                break
            if not connection.quiet():
                connection.close()
                continue
            self._busy.add(connection)
            return connection
        loop = asyncio.get_running_loop()
        if self.tls:
            if self._ssl is None:
                self._ssl = await asyncio.to_thread(default_tls_context)
            _, connection = await loop.create_connection(
                lambda: _Connection(self._max),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host,
            )
        else:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._max), self.host, self.port
            )
        if self._closed:  # closed while this one was being opened
            connection.close()
            self._check_open()
        self._busy.add(connection)
        return connection

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderHTTPError("the provider client is closed")

    def _give_back(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()

    def _frame(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, not {method!r}")
        if not target.startswith("/") or _FORBIDDEN_IN_PATH.intersection(target):
            raise ValueError(f"request target must start with '/' and hold no spaces: {target!r}")
        lines = [
            f"{method} {self.path}{target} HTTP/1.1",
            f"Host: {self._host_header}",
            "Accept: application/json",
            "User-Agent: paydispatch",
        ]
        for name, value in headers:
            if _FORBIDDEN_IN_HEADERS.intersection(name) or _FORBIDDEN_IN_HEADERS.intersection(
                value
            ):
                # Never frame a second request or header out of a value.
                raise ValueError(f"header {name!r} holds a line break or NUL")
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + body if body else head
