"""A lean HTTP/1.1 client for one thing: POSTing charges to the provider over keep-alive
connections.

Why not aiohttp's ClientSession for this: on the drain profile its per-request machinery
(request and response objects, header multidicts, payload registry, timers, connector
bookkeeping) was more than half of the leader's CPU per payment. A charge is a small POST with
a small answer: here it is one ``write`` of prebuilt bytes and a parse of the status line, the
headers we need and the body (Content-Length, chunked, or until close). aiohttp still serves
every other call (ledger lookups, the API).

What it never does: follow a redirect, retry, or reuse a connection whose exchange did not end
cleanly. Any failure before a complete answer raises ``HttpError`` — the caller treats it as an
unknown outcome (the charge may or may not have been made) and retries with the same key.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# Bounds on what one answer may hold: a provider that sends more is not answering a charge.
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
# Idle connections older than this are closed rather than reused: servers drop idle
# keep-alive connections after a while (aiohttp's server after 75 s), and a request written
# into a connection the server is closing fails as an unknown outcome.
IDLE_LIMIT = 15.0


class HttpError(Exception):
    """The exchange failed before a complete answer arrived (the request may have been
    processed)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer: status, the headers (lower-cased names), the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = time.monotonic()
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> None:
        """Wait for more bytes (or the end of the connection)."""
        if self.closed:
            raise HttpError("the connection closed before the answer was complete")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes) -> tuple[Answer, bool]:
        """Send ``request``; the answer and whether the connection may be reused."""
        assert self.transport is not None
        self.transport.write(request)
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                status, version, headers = _parse_head(head)
                if 100 <= status < 200:
                    continue  # an interim answer (100 Continue): the real one follows
                break
            if len(self.buffer) > MAX_HEAD:
                raise HttpError("the answer's head is too large")
            await self._more()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if status in (204, 304):
            return Answer(status, headers, b""), keep
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            if encoding != "chunked":
                raise HttpError(f"unsupported transfer encoding {encoding!r}")
            return Answer(status, headers, await self._chunked()), keep
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY:
                raise HttpError(f"unusable Content-Length {length[:40]!r}")
            size = int(length)
            while len(self.buffer) < size:
                await self._more()
            body = bytes(self.buffer[:size])
            del self.buffer[:size]
            return Answer(status, headers, body), keep and not self.buffer
        # No framing: the body runs until the server closes the connection.
        while not self.closed:
            if len(self.buffer) > MAX_BODY:
                raise HttpError("the answer's body is too large")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return Answer(status, headers, bytes(self.buffer)), False

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise HttpError("a chunk header is too large")
                await self._more()
                end = self.buffer.find(b"\r\n")
            size_text = bytes(self.buffer[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError("a malformed chunk size") from None
            if size < 0 or len(body) + size > MAX_BODY:
                raise HttpError("the answer's body is too large")
            del self.buffer[: end + 2]
            if size == 0:
                # Trailers (if any) end with an empty line.
                while True:
                    end = self.buffer.find(b"\r\n")
                    while end < 0:
                        await self._more()
                        end = self.buffer.find(b"\r\n")
                    line = bytes(self.buffer[:end])
                    del self.buffer[: end + 2]
                    if not line:
                        return bytes(body)
            while len(self.buffer) < size + 2:
                await self._more()
            body += self.buffer[:size]
            del self.buffer[: size + 2]


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError("a malformed header line")
        key = name.strip().lower()
        value = value.strip()
        # Repeated headers are joined, as HTTP allows for list-valued ones; a repeated
        # Content-Length that disagrees then fails the digit check.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(parts[1]), parts[0], headers


class Http1Pool:
    """Keep-alive connections to one origin (``http://`` or ``https://``), at most ``limit``
    of them busy at once; POST only."""

    def __init__(self, base_url: str, *, limit: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._tls else None

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Answer:
        """POST ``body`` to ``path``; the complete answer, or HttpError / TimeoutError."""
        lines = [
            f"POST {self._prefix}{path} HTTP/1.1",
            f"Host: {self._host_header}",
            f"Content-Length: {len(body)}",
        ]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        # UTF-8, as aiohttp writes header values (a key from before migration 0003 is the
        # client's own, which may hold any printable character).
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        async with self._slots, asyncio.timeout(timeout):
            conn = await self._connection()
            reusable = False
            try:
                answer, reusable = await conn.exchange(request)
            except (OSError, UnicodeError) as exc:
                raise HttpError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                if reusable and not conn.closed:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.close()
            return answer

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if not conn.closed and not conn.buffer and now - conn.idle_since < IDLE_LIMIT:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._tls else None,
            )
        except OSError as exc:
            raise HttpError(f"cannot connect: {exc}") from exc
        return protocol

    def close(self) -> None:
        """Close every idle connection (busy ones close when their exchange ends)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
