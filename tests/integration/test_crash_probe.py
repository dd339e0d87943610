"""The crash detector's second signal against real sockets: a listener that closes shortly
after the first probe (a killed process whose Postgres session ended before its listener
closed) still counts as refusing; one that stays open, or a port that never answered, not."""

from __future__ import annotations

import asyncio
import socket

from app.failover.detector import refuses_connections, refuses_soon


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_address_that_stops_listening_between_probes_counts_as_refusing() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert not await refuses_connections(url, 1.0)  # the first probe alone: "alive"

    async def close_soon() -> None:
        await asyncio.sleep(0.02)
        server.close()
        await server.wait_closed()

    closing = asyncio.create_task(close_soon())
    assert await refuses_soon(url, 1.0)
    await closing


async def test_an_address_that_keeps_listening_is_not_refusing() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert not await refuses_soon(f"http://127.0.0.1:{port}", 1.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_closed_port_refuses_at_once_and_a_bad_url_never_does() -> None:
    assert await refuses_soon(f"http://127.0.0.1:{_free_port()}", 1.0)
    assert not await refuses_soon("http://:80", 1.0)  # no host: nothing proven
    assert not await refuses_soon("http://127.0.0.1:99999", 1.0)  # no such port
