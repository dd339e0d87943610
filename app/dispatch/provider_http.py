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
keeps connections, frames requests, enforces limits and says when an answer is not whole.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# An answer larger than this is not a charge: stop reading and call the outcome unknown
# instead of buffering whatever a broken or hostile endpoint streams (a body that never ends).
DEFAULT_MAX_ANSWER_BYTES = 1 << 20
# Idle connections older than this are closed rather than reused: well below the keep-alive
# timeouts servers commonly use (aiohttp's 75 s, nginx's 75 s, Go's none), so a connection
# is not reused just as the provider gives up on it.
DEFAULT_IDLE_SECONDS = 15.0
_FORBIDDEN_IN_HEADERS = frozenset("\r\n\0")


class ProviderHTTPError(Exception):
    """The provider's answer could not be read whole (connection lost, malformed, too large).
    Whether the provider acted on the request is unknown."""


class ProviderHTTPTimeout(ProviderHTTPError):
    """No whole answer arrived within the call's time limit."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One whole HTTP answer. ``headers`` has lower-cased names, each with its first value."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection: at most one exchange at a time, parsed by httptools."""

    def __init__(self, max_answer_bytes: int) -> None:
        self._max = max_answer_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._framed = True  # False: the body ends when the provider closes the connection
        self._keep_alive = True
        self.closed = False
        self.idle_since = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the provider is out of step with us, so nothing more
            # read on this connection could be matched to a request.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the provider switched protocols instead of answering")
        except httptools.HttpParserError as exc:
            # A callback's own error (a limit, bytes out of step) comes wrapped.
            cause = exc.__context__
            if isinstance(cause, ProviderHTTPError):
                self._fail(str(cause))
            else:
                self._fail(f"malformed HTTP answer from the provider: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if exc is None and self._headers_done and not self._framed:
            # HTTP/1.1 lets an answer without Content-Length or chunked framing end with
            # the connection; a clean close is its end.
            self._complete()
            return
        reason = f": {exc}" if exc is not None else ""
        what = "mid-answer" if self._headers_done or self._body else "before answering"
        self._fail(f"the provider closed the connection {what}{reason}")

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            # A second answer behind the first, in the same read: out of step with us.
            raise ProviderHTTPError("the provider sent an answer nobody asked for")
        self._headers = {}
        self._body = []
        self._size = 0
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value)
        if self._size > self._max:
            raise ProviderHTTPError(f"the provider's headers exceed {self._max} bytes")
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        # Asked here: llhttp forgets a message's flags once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        status = self._parser.get_status_code()
        self._framed = (
            "content-length" in self._headers
            or "transfer-encoding" in self._headers
            or status < 200
            or status in (204, 304)
        )

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max:
            raise ProviderHTTPError(f"the provider's answer exceeds {self._max} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            # 100 Continue, 103 Early Hints: interim, the real answer follows.
            self._headers_done = False
            return
        self._complete()

    # -- the exchange ------------------------------------------------------------------------

    async def exchange(self, request: bytes) -> Answer:
        """Send ``request`` and wait for its whole answer."""
        transport = self._transport
        if transport is None or self.closed or transport.is_closing():
            raise ProviderHTTPError("the connection to the provider is closed")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        transport.write(request)
        answer: Answer = await waiter
        return answer

    @property
    def reusable(self) -> bool:
        """True when the last exchange ended whole and the provider keeps the connection."""
        return (
            self._keep_alive
            and not self.closed
            and self._transport is not None
            and not self._transport.is_closing()
            and self._waiter is not None
            and self._waiter.done()
            and not self._waiter.cancelled()
            and self._waiter.exception() is None
        )

    def close(self) -> None:
        """Close the connection (an exchange still waiting ends with ProviderHTTPError)."""
        if self._transport is not None:
            self._transport.close()
        self.closed = True

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        status = self._parser.get_status_code()
        waiter.set_result(Answer(status, self._headers, b"".join(self._body)))
        self._body = []
        self.idle_since = time.monotonic()
        if not self._keep_alive:
            self.close()

    def _fail(self, message: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProviderHTTPError(message))
        self.close()


class ProviderConnections:
    """A bounded set of keep-alive connections to one provider origin.

    At most ``limit`` exchanges run at once (more wait for a connection); a connection is
    reused only after a whole answer that lets it be, and never after a timeout, a
    cancellation or an error, whose bytes could still arrive. Nothing is retried here: a
    request that may have reached the provider is the dispatcher's to retry under its key.
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
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"provider URL must be http:// or https:// with a host: {base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"provider URL must not have a query or fragment: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self._host_header = host if default_port else f"{host}:{self.port}"
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
        for a free connection included) and ProviderHTTPError when no whole answer came;
        ``OSError`` from connecting is raised as ProviderHTTPError too."""
        request = self._frame(method, target, headers, body)
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    connection = await self._connection()
                    self._busy.add(connection)
                    try:
                        answer = await connection.exchange(request)
                    finally:
                        self._busy.discard(connection)
                        self._give_back(connection)
                    return answer
        except TimeoutError as exc:
            raise ProviderHTTPTimeout(f"the provider did not answer within {timeout:.2f}s") from exc
        except OSError as exc:
            raise ProviderHTTPError(
                f"cannot reach the provider at {self.host}:{self.port}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close every connection; requests after this fail."""
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        # Let the transports' close callbacks run before the loop may be closed.
        await asyncio.sleep(0)

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ProviderHTTPError("the provider client is closed")
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
            return connection
        loop = asyncio.get_running_loop()
        if self.tls:
            if self._ssl is None:
                # Made on first use: loading the CA store costs tens of milliseconds.
                self._ssl = ssl.create_default_context()
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
        return connection

    def _give_back(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()

    def _frame(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        if not target.startswith("/"):
            raise ValueError(f"request target must start with '/': {target!r}")
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
