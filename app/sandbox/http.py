"""The provider's HTTP/1.1 server: connections, keep-alive, pipelining, one write per answer.

Nothing here parses HTTP: httptools (llhttp, Node.js's parser, the one uvicorn uses) turns
bytes into a method, a URL, headers and a body. What is written here is what a connection
does with them: answer its requests one at a time in order, each with one write.

Why not uvicorn, which served the provider before: the provider is the busiest process of
every benchmark, and the issue asks for half its CPU per charge. Under uvicorn a request
went through an ASGI scope, a request/response cycle object, an event, two ASGI messages
whose headers uvicorn checks one by one, and a keep-alive timer armed and cancelled per
request; perf put ~64 % of the provider's CPU in the interpreter. It also took a subclass
leaning on uvicorn's internals (pinned to one minor version) to say what ASGI cannot: close
a connection without an answer (the "response lost after the charge" fault), refuse an
endless head, answer with one write. Here a request is a :class:`Request` handed to its
handler once its body is whole, and an answer is one ``transport.write``.

What a connection guarantees:

- Answers go out in request order; a request's handler starts when the answer before it is
  written. Pipelined requests wait, parsed; past ``MAX_PIPELINED`` of them (give or take one
  ``FEED_SLICE`` of input) parsing stops until they are answered. A client that does not
  read its answers stops both: no handler starts and nothing is read while the
  connection's write buffer is over its high-water mark.
- A body over ``max_body`` is not kept: 413 and a close, from the declared Content-Length
  before any of it is read (and before any ``100 Continue``), or as a chunked body grows.
  Chunk framing and trailers count too (trailers are never taken as headers).
- A request head over ``MAX_HEAD_BYTES`` is refused (431); bytes that do not parse as HTTP
  are refused (400). Either stops reading; the requests before them are answered first,
  then the refusal, then the connection closes.
- ``Upgrade`` is not spoken: the request's body is never parsed (reading it answers 400),
  and the connection closes after its answer.
- HTTP/1.0, ``Connection: close`` and answers that carry ``Connection: close`` close the
  connection after the answer. ``100 Continue`` goes to HTTP/1.1 clients only, and only
  when the request's turn has come.
- A close sends what was written, then a FIN, and reads (and drops) what the client still
  sends for ``LINGER_SECONDS``: closing with unread input would make the kernel send a
  reset, which can destroy an answer not yet read (RFC 9112, 9.6).
- An idle connection closes after ``keep_alive`` seconds without a byte, and so does one
  that stalls mid-request; one that does not take its FIN and last answer in that time is
  aborted.
- A client that leaves (or half-closes) while its request runs: the handler runs to its end
  (a charge it began is recorded), its answer goes nowhere, requests pipelined behind it
  never run.
- Shutdown stops accepting, closes idle connections, lets running requests finish for the
  grace, then cancels them (the handlers' error answer says so) and closes the rest.

Left as aiohttp's and uvicorn's servers leave it: an HTTP/1.1 request without ``Host`` is
served (the provider has one name), and a client's FIN means it left (above).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools

from app.sandbox.routing import Answer, Dropped, Reply, Request, Router

log = logging.getLogger("paydispatch.provider.http")
access_log = logging.getLogger("paydispatch.provider.access")

# A request line plus headers larger than this is refused (431), as aiohttp refused a line
# or field over 8 KiB: without a bound, one endless header would grow without limit.
MAX_HEAD_BYTES = 64 * 1024
# Requests parsed ahead of their answer before a connection stops reading: a client that
# pipelines without reading answers cannot make the provider buffer without limit.
MAX_PIPELINED = 64
# How often idle connections are looked for (their keep-alive is a bound to this precision).
SWEEP_SECONDS = 1.0
# Input is parsed this much at a time, so that parsing can stop between requests.
FEED_SLICE = 4096
# How long a closing connection reads (and drops) what its client still sends.
LINGER_SECONDS = 2.0
# A message's body, as it arrives with its chunk framing and trailers, beyond this many times
# the body limit (plus a head's bound) is refused: trailers are held by the parser whole.
WIRE_FACTOR = 8

ErrorAnswer = Callable[[Request, BaseException], Answer]


class BadRequest(Exception):
    """A request head the provider cannot route (an URL that does not parse)."""


def _status_lines() -> dict[int, bytes]:
    return {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


_STATUS_LINES = _status_lines()
_NOTHING = memoryview(b"")
_INTERNAL_ERROR = Answer(500, b"internal error", "text/plain; charset=utf-8")


class _Clock:
    """The ``Date`` header's value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = formatdate(second, usegmt=True).encode("ascii")
            self._second = second
        return self._value


class _Exchange:
    """One request on a connection, from its head to its answer."""

    __slots__ = (
        "chunks",
        "complete",
        "expects_continue",
        "keep_alive",
        "request",
        "size",
        "target",
        "wire",
    )

    def __init__(
        self, request: Request, target: bytes, *, keep_alive: bool, expects_continue: bool
    ) -> None:
        self.request = request
        self.target = target  # as received (the access log's; never percent-decoded)
        self.wire = 0  # bytes of its body phase as they arrived (framing and trailers too)
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False  # the whole body arrived (or will never be read)
        self.keep_alive = keep_alive
        self.expects_continue = expects_continue


def encode_answer(
    answer: Answer, *, date: bytes, with_body: bool, close: bool
) -> tuple[bytes, bool]:
    """``answer`` as the bytes of one HTTP/1.1 answer (its body left out for HEAD), and
    whether the connection closes after it: ``close``, or the answer's own
    ``Connection: close``.

    Handlers' headers are the provider's own words, never a client's; a CR or LF in one
    would still split the answer, so it raises ValueError instead (answered 500 by the
    caller)."""
    status_line = _STATUS_LINES.get(answer.status) or b"HTTP/1.1 %d \r\n" % answer.status
    content_type = answer.content_type
    if "\r" in content_type or "\n" in content_type:
        raise ValueError("the content type would split the answer")
    if not isinstance(answer.body, bytes):
        raise TypeError(f"an answer's body is bytes, not {type(answer.body).__name__}")
    head = b"%sdate: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status_line,
        date,
        content_type.encode("latin-1"),
        len(answer.body),
    )
    if answer.headers:
        for name, value in answer.headers.items():
            if name.lower() == "connection":
                close = close or value.lower() == "close"
                continue  # a close is said below, once
            line = f"{name}: {value}\r\n"
            if line.count("\n") != 1 or "\r" in line[:-2]:
                raise ValueError(f"header {name!r} would split the answer")
            head += line.encode("latin-1")
    if close:
        head += b"connection: close\r\n"
    head += b"\r\n"
    return (head + answer.body if with_body else head), close


class HttpServer:
    """Serves a :class:`Router` on a listening socket. :meth:`start`, then :meth:`shutdown`."""

    def __init__(
        self,
        router: Router,
        *,
        max_body_bytes: int,
        on_error: ErrorAnswer,
        keep_alive: float = 75.0,
        sweep_every: float = SWEEP_SECONDS,
        access_log: bool = False,
    ) -> None:
        self.router = router
        self._sweep_every = sweep_every
        self.max_body = max_body_bytes
        self.on_error = on_error
        self.keep_alive = keep_alive
        self.access_log = access_log
        self.clock = _Clock()
        self.connections: set[_Connection] = set()
        # Every running request, also those whose client left: shutdown waits for them.
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (bound and listening)."""
        self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock)
        self._sweeper = self.loop.create_task(self._sweep(), name="provider-http-keepalive")

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; close idle connections; give running requests ``grace`` seconds,
        then cancel them (each still answers, through the error answer); close the rest."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for connection in list(self.connections):
            connection.end()
        await self._wait_for_requests(grace)
        if self.tasks:
            for task in self.tasks:
                task.cancel()
            await self._wait_for_requests(5.0)
        for connection in list(self.connections):
            connection.close()
        # Let the FINs and last answers go out and the clients close; then abort the rest.
        deadline = self.loop.time() + min(LINGER_SECONDS, 0.5)
        while self.connections and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()

    async def _wait_for_requests(self, timeout: float) -> None:
        # A request may start another (the next pipelined one) as it ends: look again.
        deadline = self.loop.time() + timeout
        while self.tasks and (left := deadline - self.loop.time()) > 0:
            await asyncio.wait(set(self.tasks), timeout=left)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            now = self.loop.time()
            for connection in list(self.connections):
                connection.sweep(now, self.keep_alive)


class _Connection(asyncio.Protocol):
    """One client connection (see the module doc for what it guarantees)."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._max_body = server.max_body
        self._max_wire = WIRE_FACTOR * server.max_body + MAX_HEAD_BYTES
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client = ""
        # Requests whose head is complete and whose answer is not written, oldest first;
        # the first one runs (or waits for its body).
        self._exchanges: deque[_Exchange] = deque()
        self._parsing: _Exchange | None = None  # the one whose body is arriving
        self._running = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._heads = 0  # request heads begun on this connection
        self._head_open = False  # the latest head has begun and is not complete
        self._head_size = 0  # its URL and headers, as the parser handed them over
        self._head_bytes = 0  # its bytes as they arrived (a bound on what the parser holds)
        self._head_too_large = False
        self._unparsed = _NOTHING  # input held back while too many requests wait
        self._input_done = False  # nothing more is parsed (a refusal, an Upgrade, a 413)
        # Bytes that are not HTTP, or a head too large: the answer written (and the close)
        # once the requests before them are answered.
        self._refusal: bytes | None = None
        self._ending = False  # shutting down: close after the running answer
        self._closed = False  # closing or closed: nothing more is parsed or answered
        self._closed_at = 0.0
        self._reading_paused = False
        self._writing_paused = False
        self._last_active = self._loop.time()

    # --- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Track the connection (for keep-alive and shutdown)."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if self._server.access_log:
            peer = transport.get_extra_info("peername")
            self._client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget what was not answered: the running request ends with nowhere to answer."""
        self._closed = True
        self._exchanges.clear()
        self._unparsed = _NOTHING
        self._server.connections.discard(self)

    def eof_received(self) -> bool:
        """The client sent its FIN: taken as gone (False closes the transport), as
        aiohttp's and uvicorn's servers take it. A FIN is how clients leave; one that only
        half-closes and waits for its answer is rare, and must not make requests it
        pipelined run after it left."""
        # Closed now, not at connection_lost: that waits until the write buffer drains,
        # and meanwhile no request behind the running one may start.
        if not self._closed:
            self._closed = True
            self._closed_at = self._loop.time()
            self._unparsed = _NOTHING
        return False

    def data_received(self, data: bytes) -> None:
        """Parse ``data``, then start the next request if its turn has come."""
        if self._closed or self._input_done:
            return  # a closing connection reads and drops what still comes
        self._last_active = self._loop.time()
        if len(data) <= FEED_SLICE and not self._unparsed:
            self._feed(data)
        else:
            # Sliced as views: a long read is not copied once per slice.
            self._unparsed = memoryview(bytes(self._unparsed) + data if self._unparsed else data)
            self._feed_held()
        self._next()

    def pause_writing(self) -> None:
        """The client does not read its answers: stop reading its requests."""
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        """The client reads again."""
        self._writing_paused = False
        self._flow()
        self._next()

    # --- feeding the parser -------------------------------------------------------------

    def _feed_held(self) -> None:
        """Parse held input a slice at a time while few requests wait."""
        while self._unparsed and not self._input_done and not self._closed:
            if len(self._exchanges) > MAX_PIPELINED:
                self._flow()  # parsing resumes from _finish
                return
            piece = self._unparsed[:FEED_SLICE]
            self._unparsed = (
                self._unparsed[FEED_SLICE:] if len(self._unparsed) > FEED_SLICE else _NOTHING
            )
            self._feed(piece)

    def _feed(self, data: bytes | memoryview) -> None:
        heads = self._heads
        parsing = self._parsing
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError:
            if self._head_too_large:
                self._refuse(431, b"request head too large")
            else:
                self._refuse(400, b"Invalid HTTP request received.")
            return
        # Only slices that arrive wholly inside a head begun earlier are counted (a slice
        # that begins or ends one also holds bodies or other requests): an endless head is
        # refused a slice late at worst, a legal one never. Heads that end are measured
        # exactly, in on_headers_complete.
        if self._head_open and self._heads == heads:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, b"request head too large")
                return
        # Likewise a body phase, whose chunk framing and trailers the parser holds.
        if parsing is not None and parsing is self._parsing and self._heads == heads:
            parsing.wire += len(data)
            if parsing.wire > self._max_wire:
                parsing.request.too_large = True
                parsing.chunks.clear()
                self._stop_input()

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request head begins."""
        self._heads += 1
        self._head_open = True
        self._head_size = 0
        self._head_bytes = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        """Part of the request target."""
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header (names kept in lower case); a trailer after a chunked body is not
        a header of the request, and is dropped."""
        if self._head_open:
            self._headers.append((name.lower(), value))
            self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        """The head is complete: queue its request."""
        self._head_open = False
        if self._head_size > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise BadRequest("request head too large")
        parser = self._parser
        try:
            url = httptools.parse_url(self._url)
            path = url.path.decode("ascii") if url.path is not None else "/"
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError) as exc:
            raise BadRequest(f"invalid request target {self._url!r}") from exc
        if "%" in path:
            path = unquote(path)
        request = Request(
            parser.get_method().decode("ascii"),
            path,
            url.query or b"",
            self._headers,
            max_body=self._max_body,
        )
        http_11 = parser.get_http_version() == "1.1"
        expects_continue = False
        for name, value in self._headers:
            if name == b"content-length":
                if value.isdigit() and int(value) > self._max_body:
                    request.too_large = True  # refused before a byte of it is read
            elif name == b"expect":
                # An HTTP/1.0 client's expectation is ignored (RFC 9110, 10.1.1).
                expects_continue = http_11 and value.lower() == b"100-continue"
        exchange = _Exchange(
            request,
            self._url,
            keep_alive=http_11 and parser.should_keep_alive(),
            expects_continue=expects_continue,
        )
        self._parsing = exchange
        self._exchanges.append(exchange)
        if len(self._exchanges) > MAX_PIPELINED:
            self._flow()

    def on_body(self, body: bytes) -> None:
        """Part of the body: kept up to the limit, past it dropped."""
        exchange = self._parsing
        if exchange is None or exchange.request.too_large:
            return
        exchange.size += len(body)
        if exchange.size > self._max_body:
            exchange.request.too_large = True
            exchange.chunks.clear()
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        """The body is whole."""
        exchange = self._parsing
        if exchange is not None:
            exchange.complete = True
            self._parsing = None

    # --- requests and answers -----------------------------------------------------------

    def _next(self) -> None:
        """Start the oldest request once its turn has come and it can be answered."""
        if self._running or self._closed or self._writing_paused:
            return  # resume_writing calls again
        if not self._exchanges:
            if self._refusal is not None:
                self._write(self._refusal)
                self.close()
            elif self._input_done:
                self.close()  # nothing more will come to answer
            return
        exchange = self._exchanges[0]
        request = exchange.request
        if exchange.complete or request.too_large or request.upgrade_refused:
            self._running = True
            task = self._loop.create_task(self._answer(exchange))
            self._server.tasks.add(task)
            task.add_done_callback(self._server.tasks.discard)
        elif exchange.expects_continue and exchange.size == 0:
            # Its turn has come, and the client waits for leave to send the body.
            exchange.expects_continue = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _answer(self, exchange: _Exchange) -> None:
        request = exchange.request
        reply: Reply
        try:
            chunks = exchange.chunks
            if chunks:
                request.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            handler, request.path_params = self._server.router.resolve(request.method, request.path)
            reply = await handler(request)
        except (Exception, asyncio.CancelledError) as exc:
            # CancelledError: the shutdown grace is over; this answers it (the error
            # answer says the provider stopped) and ends the task.
            reply = self._error_answer(request, exc)
        try:
            self._finish(exchange, reply)
        except Exception:
            # The connection's state is unknown now: a request left unanswered would shift
            # every answer after it onto the wrong request. End the connection instead.
            log.exception("answering %s %s failed", request.method, request.path)
            self.abort()

    def _error_answer(self, request: Request, exc: BaseException) -> Answer:
        try:
            return self._server.on_error(request, exc)
        except Exception:
            # The error answer itself failed: still answer, or the connection would wait
            # for an answer that never comes.
            log.exception("the error answer failed for %s %s", request.method, request.path)
            return _INTERNAL_ERROR

    def _finish(self, exchange: _Exchange, reply: Reply) -> None:
        self._running = False
        if self._closed:
            return  # the client left: nowhere to answer
        self._exchanges.popleft()
        request = exchange.request
        if isinstance(reply, Dropped):
            self.close()  # not one byte of an answer
            return
        close = (
            not exchange.keep_alive
            or self._ending
            or request.too_large  # the rest of the body may still be on its way
            or request.upgrade_refused
        )
        date = self._server.clock.date()
        with_body = request.method != "HEAD"
        try:
            data, close = encode_answer(reply, date=date, with_body=with_body, close=close)
        except Exception as exc:  # a handler's answer that cannot be sent as it is
            reply = self._error_answer(request, exc)
            try:
                data, close = encode_answer(reply, date=date, with_body=with_body, close=close)
            except Exception:
                reply = _INTERNAL_ERROR
                data, close = encode_answer(reply, date=date, with_body=with_body, close=close)
        self._write(data)
        if self._server.access_log:
            access_log.info(
                '%s - "%s %s" %d',
                self._client,
                request.method,
                # As received: llhttp lets no control character into a target, and the
                # percent-decoded path could forge a line of the log.
                exchange.target.decode("ascii", "backslashreplace"),
                reply.status,
            )
        if close:
            self.close()
            return
        self._last_active = self._loop.time()
        if self._unparsed:
            self._feed_held()
        if self._reading_paused:
            self._flow()
        self._next()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _upgrade(self) -> None:
        # llhttp stops at the head of a request that asks to change protocols: its body
        # and anything after it are never parsed. It gets its answer, then the close.
        if self._exchanges:
            exchange = self._exchanges[-1]
            exchange.request.upgrade_refused = True
            exchange.keep_alive = False
            exchange.complete = True
            if self._parsing is exchange:
                self._parsing = None
        self._stop_input()

    def _refuse(self, status: int, reason: bytes) -> None:
        """Stop reading; answer the requests already whole, then this plain answer, then
        close. The request it refuses (the one arriving) is dropped."""
        self._refusal = (
            b"%scontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (_STATUS_LINES[status], len(reason), reason)
        )
        self._stop_input()

    def _stop_input(self) -> None:
        """Parse nothing more. A request whose body is not whole is never answered (unless
        it is the one running: a 413 that did not wait for its body)."""
        self._input_done = True
        self._head_open = False
        self._unparsed = _NOTHING
        parsing, self._parsing = self._parsing, None
        if parsing is not None and not parsing.request.too_large:
            self._exchanges.remove(parsing)

    def _flow(self) -> None:
        """Read only while the client reads its answers and few requests wait."""
        if self._closed or self._transport is None or self._input_done:
            return
        pause = (
            self._writing_paused
            or len(self._exchanges) > MAX_PIPELINED
            or bool(self._unparsed)  # held input is parsed first
        )
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests parsed and not yet answered."""
        return len(self._exchanges)

    @property
    def unsent(self) -> int:
        """Bytes of answers written and not yet taken by the kernel."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def sweep(self, now: float, keep_alive: float) -> None:
        """Close the connection if it has been idle (or stalled mid-request) for
        ``keep_alive`` seconds; end a close that lingered or that its client ignores."""
        if not self._closed:
            if not self._running and self._last_active < now - keep_alive:
                self.close()
            return
        transport = self._transport
        if transport is None:
            return
        if self._closed_at < now - max(keep_alive, LINGER_SECONDS):
            transport.abort()  # the client takes neither its last answer nor its FIN
        elif self._closed_at < now - LINGER_SECONDS and not transport.is_closing():
            transport.close()

    def end(self) -> None:
        """Shutdown: close now if nothing runs, else after the running request's answer."""
        self._ending = True
        if not self._running:
            self.close()

    def close(self) -> None:
        """Send what is written, then a FIN; the transport closes once the client closes
        its side too, or after LINGER_SECONDS (see the module doc)."""
        if self._closed:
            return
        self._closed = True
        self._closed_at = self._loop.time()
        self._unparsed = _NOTHING
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._reading_paused:
            transport.resume_reading()  # read (and drop) what the client still sends
            self._reading_paused = False

    def abort(self) -> None:
        """Close at once, dropping what is not sent."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
