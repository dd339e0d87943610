"""The provider's HTTP plumbing: requests, answers and routes over ASGI, served by uvicorn.

Why not aiohttp's ``web.Application``, which the replicas use: the provider is the busiest
process of every benchmark, and py-spy put aiohttp's server machinery at about 60 % of its
Python time per charge. uvicorn's httptools protocol (llhttp) on uvloop answered the same
fixed request for roughly two thirds of the CPU, side by side in ``load.bench_provider``.
Nothing here parses HTTP: uvicorn does. This module only routes a parsed request to a
handler and turns the handler's :class:`Answer` into the two ASGI messages.

:class:`ProviderProtocol`, a thin subclass of uvicorn's protocol, adds what ASGI cannot
say or uvicorn leaves to a proxy in front of it: closing the connection without any answer
(the provider's "response lost after the charge" fault), a bound on a request's head (431),
one write per answer, a clean 400 for an ``Upgrade`` it does not speak, and a running request
told of its client's disconnect even with another request pipelined behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# The scope extension through which a handler closes its connection without an answer.
CLOSE_EXTENSION = "paydispatch.close_connection"
# Set on a request that asked for an Upgrade: its body was never parsed (answered 400).
UPGRADE_EXTENSION = "paydispatch.upgrade_refused"
# A request line plus headers larger than this is refused (431), as aiohttp refused a line
# or field over 8 KiB: without a bound, one endless header would grow without limit.
MAX_HEAD_BYTES = 64 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is over the configured limit (answered 413)."""


class UpgradeRefused(Exception):
    """The request asked for an ``Upgrade``; its body was not parsed (answered 400)."""


class ClientGone(Exception):
    """The client disconnected before its request body arrived in full."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a handler answers: status, body and its type, extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """A handler's way to say "close the connection, answer nothing"."""


DROPPED = Dropped()
Reply = Answer | Dropped


@dataclass(slots=True)
class Request:
    """One parsed request: what the handlers need of an ASGI scope, and its body on demand."""

    method: str
    path: str
    query_string: bytes
    raw_headers: Sequence[tuple[bytes, bytes]]
    path_params: dict[str, str]
    _receive: Receive
    max_body: int
    upgrade_refused: bool = False
    _query: dict[str, str] | None = field(default=None)

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), decoded as aiohttp did: UTF-8,
        undecodable bytes carried as lone surrogates so that validation can refuse them."""
        for key, value in self.raw_headers:
            if key == name:
                return value.decode("utf-8", "surrogateescape")
        return None

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters, the first value of each name (percent-decoded, ``+`` a space;
        undecodable bytes as lone surrogates, refused by validation)."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in parse_qsl(
                self.query_string.decode("latin-1"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="surrogateescape",
            ):
                query.setdefault(name, value)
            self._query = query
        return self._query

    async def read(self) -> bytes:
        """The whole body; :class:`BodyTooLarge` past the limit, :class:`ClientGone` if the
        client left first."""
        if self.upgrade_refused:
            raise UpgradeRefused
        declared = self.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise BodyTooLarge  # refused before reading a byte of it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


Handler = Callable[[Request], Awaitable[Reply]]


class NotFound(Exception):
    """No route has this path (404)."""


class MethodNotAllowed(Exception):
    """A route has this path, not for this method (405, ``Allow`` lists the methods)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = tuple(allowed)


@dataclass(frozen=True, slots=True)
class _Route:
    segments: tuple[str, ...]  # "{name}" matches one non-empty segment
    handlers: dict[str, Handler]


class Router:
    """Method and path to handler. A GET route answers HEAD too, as aiohttp's did."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Route ``method`` on ``path`` (segments like ``{id}`` capture one segment)."""
        segments = tuple(path.strip("/").split("/"))
        route = next((r for r in self._routes if r.segments == segments), None)
        if route is None:
            route = _Route(segments, {})
            self._routes.append(route)
        route.handlers[method] = handler
        if method == "GET":
            route.handlers.setdefault("HEAD", handler)

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and captured segments; :class:`NotFound` or :class:`MethodNotAllowed`."""
        if not path.startswith("/"):
            raise NotFound
        parts = path[1:].split("/")
        for route in self._routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            handler = route.handlers.get(method)
            if handler is None:
                raise MethodNotAllowed(sorted(route.handlers))
            return handler, params
        raise NotFound


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for segment, part in zip(segments, parts, strict=True):
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params


ErrorAnswer = Callable[[Request, BaseException], Answer]


class AsgiApp:
    """An ASGI application over a :class:`Router`. ``on_error`` turns every exception a
    handler raises (and routing's NotFound, MethodNotAllowed, BodyTooLarge) into an answer,
    so no request ever gets a traceback or uvicorn's bare 500."""

    def __init__(self, router: Router, *, max_body_bytes: int, on_error: ErrorAnswer) -> None:
        self._router = router
        self._max_body = max_body_bytes
        self._on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request (the provider serves no lifespan or websocket scopes)."""
        if scope["type"] != "http":
            return
        request = Request(
            scope["method"],
            scope["path"],
            scope["query_string"],
            scope["headers"],
            {},
            receive,
            self._max_body,
            UPGRADE_EXTENSION in scope.get("extensions", {}),
        )
        try:
            handler, request.path_params = self._router.resolve(request.method, request.path)
            reply = await handler(request)
        except ClientGone:
            return  # nobody to answer
        except (Exception, asyncio.CancelledError) as exc:
            # CancelledError: uvicorn cancels what still runs when the shutdown grace is
            # over; this answers it (and ends the task) instead of uvicorn's bare 500.
            reply = self._on_error(request, exc)
        if isinstance(reply, Dropped):
            await _drop(scope)
            return
        await send_answer(send, reply)


async def send_answer(send: Send, answer: Answer) -> None:
    """``answer`` as the two ASGI messages (uvicorn leaves the body out for HEAD)."""
    headers = [
        (b"content-type", answer.content_type.encode("latin-1")),
        (b"content-length", b"%d" % len(answer.body)),
    ]
    if answer.headers:
        headers.extend(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in answer.headers.items()
        )
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


async def _drop(scope: Scope) -> None:
    close = scope.get("extensions", {}).get(CLOSE_EXTENSION, {}).get("close")
    if close is None:
        raise RuntimeError(
            "the server gives no way to close a connection without an answer: serve the "
            "provider with ProviderProtocol"
        )
    # Returns once the server has seen the connection go: returning earlier, with no
    # answer started, makes uvicorn log an error and write a 500 to the closed transport.
    await close()


class _CorkedTransport(asyncio.Transport):
    """A connection's transport that sends what is written during one answer as one
    write: uvicorn writes an answer's head and its body separately, two system calls
    (~10 µs each on this VM) where one does. Flushed when the answer is complete, before
    a close, and in any case at the next turn of the event loop."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold ``data`` until the flush."""
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Hold every piece until the flush."""
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is held to the real transport, as one write."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        # A closed uvloop transport raises on write where asyncio's drops the bytes; the
        # client is gone either way (it left mid-answer, or the answer was dropped).
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Flush, then close (the real transport sends what it buffered first)."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is held and close at once."""
        self._pending.clear()
        self._transport.abort()

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        """As the real transport."""
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        """As the real transport."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport."""
        return self._transport.get_extra_info(name, default)

    def is_reading(self) -> bool:
        """As the real transport."""
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        """As the real transport."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """As the real transport."""
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """As the real transport."""
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """As the real transport."""
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As the real transport."""
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """As the real transport."""
        return self._transport.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        """What the real transport buffered, plus what is held here."""
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))


class ProviderProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus what ASGI cannot say or uvicorn leaves out (see
    the module doc). It leans on uvicorn internals (the running cycle's ``disconnected``,
    ``message_event``, ``keep_alive``), so uvicorn is pinned to the minor version these
    were read from; tests/integration/test_sandbox_wire.py exercises each of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._corked: _CorkedTransport | None = None
        # The cycle whose application runs (uvicorn runs one at a time per connection).
        self._running: RequestResponseCycle | None = None
        self._gone: asyncio.Future[None] = self.loop.create_future()
        self._heads = 0  # request heads begun on this connection
        self._head_open = False  # the latest head has begun and is not complete
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Serve the connection through a :class:`_CorkedTransport`."""
        self._corked = _CorkedTransport(transport, self.loop)
        super().connection_made(self._corked)

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the running request too: uvicorn tells only the newest one, so a request
        with another pipelined behind it would wait for its disconnect forever."""
        running = self._running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        if not self._gone.done():
            self._gone.set_result(None)
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        """The answer is written: send it now, as one write."""
        if self._corked is not None:
            self._corked.flush()
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        """Parse, then refuse a head that has grown past MAX_HEAD_BYTES. Only chunks that
        arrive wholly inside a head begun earlier are counted (a chunk that begins or ends
        one also holds bodies or other requests): a head is refused a chunk late at
        worst, a legal request never."""
        heads = self._heads
        super().data_received(data)
        if self._head_open and self._heads == heads and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(b"431 Request Header Fields Too Large", b"request head too large")

    def on_message_begin(self) -> None:
        """A new request: its scope carries the close extension."""
        super().on_message_begin()
        self._heads += 1
        self._head_open = True
        self._head_bytes = 0
        self.scope["extensions"] = {CLOSE_EXTENSION: {"close": self._close_without_answer}}

    def on_headers_complete(self) -> None:
        """The head is complete."""
        self._head_open = False
        super().on_headers_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """An ``Upgrade`` (``h2c`` from ``curl --http2``, say): uvicorn stops parsing and
        would leave the request waiting for a body that is never parsed. End the request's
        body here, mark it so that reading its body answers 400, and close after it."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
            return
        cycle.scope.setdefault("extensions", {})[UPGRADE_EXTENSION] = {}
        cycle.keep_alive = False
        cycle.more_body = False
        cycle.message_event.set()

    async def _close_without_answer(self) -> None:
        self.transport.close()
        await asyncio.shield(self._gone)

    def _refuse(self, status: bytes, reason: bytes) -> None:
        """A plain answer and a close; only the close while an earlier request's answer
        is still to come, which an answer sent now would overtake."""
        running = self._running
        if running is None or running.response_complete:
            self.transport.write(
                b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (status, len(reason), reason)
            )
        self.transport.close()
