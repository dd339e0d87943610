"""The operator CLI sends its keys only where the operator said (issue 10, "Also").

Real HTTP servers on loopback stand in for a replica that redirects (a misconfigured proxy, or
someone who took over a name) and for an address planted in etcd as the leader's: a
``collector`` records every Authorization header that reaches it. Nothing may reach it
unless the operator confirmed that address.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from app.stack.ports import free_port

ADMIN_KEY = "operator-admin-key"
API_KEY = "operator-api-key"


@dataclass
class Server:
    url: str
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth


Handler = Callable[[web.Request], Awaitable[web.Response]]


async def serve(handler: Handler) -> tuple[Server, web.AppRunner]:
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}")

    async def record(request: web.Request) -> web.Response:
        server.seen.append((request.method, request.path, request.headers.get("Authorization")))
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return server, runner


@pytest.fixture
async def collector() -> AsyncIterator[Server]:
    """Answers anything 200 with a plausible body, and remembers who sent which key."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": 1, "status": "pending", "previous": "pending", "node_id": "evil"}
            | {"handed_over_token": 1, "leader": None, "replicas": [], "queue": {}}
        )

    server, runner = await serve(answer)
    try:
        yield server
    finally:
        await runner.cleanup()


async def cli(url: str, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    env = {
        **os.environ,
        "PAYDISPATCH_URL": url,
        "PAYDISPATCH_API_KEY": API_KEY,
        "PAYDISPATCH_ADMIN_API_KEY": ADMIN_KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(
    "command",
    [("payments", "retry", "1"), ("payments", "reconcile", "1"), ("status",)],
    ids=["retry", "reconcile", "status"],
)
async def test_no_key_follows_a_redirect(
    collector: Server, code: int, command: tuple[str, ...]
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=code, headers={"Location": collector.url + request.path})

    redirector, runner = await serve(redirect)
    try:
        status, output = await cli(redirector.url, *command)
    finally:
        await runner.cleanup()
    assert redirector.seen, "the command never reached the configured URL"
    assert collector.seen == [], f"a key followed the redirect: {collector.seen}"
    assert status == 1
    assert "redirect" in output
    assert "Traceback" not in output


@pytest.fixture
async def planted_leader(collector: Server) -> AsyncIterator[Server]:
    """A replica whose /v1/leader names the collector as the leader (as a key planted in etcd
    would make every replica say)."""

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/v1/leader":
            return web.json_response(
                {"node_id": "replica-9", "url": collector.url, "token": 7, "since": "now"}
            )
        return web.json_response({"title": "Not Found"}, status=404)

    server, runner = await serve(answer)
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("answer", [b"", b"n\n"], ids=["no-terminal", "declined"])
async def test_resign_does_not_send_the_admin_key_to_an_unconfirmed_leader_address(
    planted_leader: Server, collector: Server, answer: bytes
) -> None:
    status, output = await cli(planted_leader.url, "leader", "resign", stdin=answer)

    assert status == 1
    assert collector.url in output  # the operator is shown where it would have gone
    assert collector.seen == []
    assert all(auth != f"Bearer {ADMIN_KEY}" for _, _, auth in planted_leader.seen)


@pytest.mark.parametrize("how", [("--yes",), ()], ids=["--yes", "answered-y"])
async def test_resign_sends_the_admin_key_to_the_leader_once_confirmed(
    planted_leader: Server, collector: Server, how: tuple[str, ...]
) -> None:
    status, output = await cli(planted_leader.url, "leader", "resign", *how, stdin=b"y\n")

    assert status == 0, output
    assert collector.seen == [("POST", "/v1/admin/leader/resign", f"Bearer {ADMIN_KEY}")]
