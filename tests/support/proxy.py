"""A TCP proxy on loopback that a test can cut and heal: the network between one process and
Postgres, without touching Postgres itself (which other clients keep reaching directly)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class CuttableProxy:
    """Forwards connections to ``host:port`` until ``cut()``; ``heal()`` lets new ones in."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.is_cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.listen_port = 0
        self._lose_reply: bytes | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def url_for(self, url: str) -> str:
        """``url`` (a postgresql:// URL of the proxied server) routed through this proxy."""
        parts = urlsplit(url)
        return url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{self.listen_port}")

    def cut(self) -> None:
        """Drop every connection now and refuse new ones (a partition, seen from one side)."""
        self.is_cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def heal(self) -> None:
        self.is_cut = False

    def lose_reply_with(self, marker: bytes) -> None:
        """The next answer from the server that contains ``marker`` is never delivered: its
        connection is cut instead. The server did the work; its client cannot know."""
        self._lose_reply = marker

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if replies and self._lose_reply is not None and self._lose_reply in data:
                        self._lose_reply = None
                        up_writer.transport.abort()
                        break
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(
            pipe(reader, up_writer, replies=False), pipe(up_reader, writer, replies=True)
        )
        self._writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[CuttableProxy]:
    """A cuttable proxy in front of the server of ``url`` for the duration of the block."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    proxy = CuttableProxy(parts.hostname, parts.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
