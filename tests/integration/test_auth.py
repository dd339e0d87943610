"""Bearer-token auth on /v1/*: open health endpoints, 401/403 problems, refusing to start
without keys unless explicitly told to."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from app.errors import ConfigurationError
from app.settings import Settings, load_settings
from app.stack.ports import free_port
from app.web.app import create_app

BODY = {"amount": 100, "currency": "EUR"}


@pytest.fixture
async def secured(database_url: str) -> AsyncIterator[str]:
    settings = load_settings(
        database_url=database_url, port=free_port(), api_keys="alpha,beta", admin_api_keys="root"
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await runner.cleanup()


async def call(
    url: str, path: str, token: str | None, method: str = "GET"
) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = {"Idempotency-Key": "auth-1"}
    if token is not None:
        headers["Authorization"] = token
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, f"{url}{path}", json=BODY if method == "POST" else None, headers=headers
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


@pytest.mark.parametrize(
    "token", [None, "Bearer", "Bearer wrong", "Basic alpha", "Bearer alphaa", "alpha"]
)
async def test_missing_or_wrong_credentials_are_a_401_problem(
    secured: str, token: str | None
) -> None:
    status, headers, body = await call(secured, "/v1/payments", token, "POST")
    assert status == 401
    assert headers["Content-Type"].startswith("application/problem+json")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "PAYDISPATCH_API_KEYS" in str(body["detail"]) or "key" in str(body["detail"])


@pytest.mark.parametrize("token", ["Bearer alpha", "Bearer beta", "bearer beta", "Bearer root"])
async def test_any_configured_key_is_accepted(secured: str, token: str) -> None:
    status, _, _ = await call(secured, "/v1/payments", token, "POST")
    assert status in (200, 202)


async def test_admin_routes_need_an_admin_key(secured: str) -> None:
    status, _, body = await call(secured, "/v1/admin/anything", "Bearer alpha")
    assert status == 403
    assert "ADMIN" in str(body["detail"])
    status, _, _ = await call(secured, "/v1/admin/anything", "Bearer root")
    assert status == 404  # authorised; the route itself does not exist


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
async def test_health_endpoints_stay_open(secured: str, path: str) -> None:
    status, _, _ = await call(secured, path, None)
    assert status == 200


def test_the_app_refuses_to_start_without_keys(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="PAYDISPATCH_API_KEYS"):
        create_app(settings.model_copy(update={"api_keys": ()}))


async def test_no_auth_must_be_asked_for_explicitly(database_url: str) -> None:
    settings = load_settings(database_url=database_url, port=free_port(), allow_no_auth=True)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        status, _, _ = await call(f"http://127.0.0.1:{settings.port}", "/v1/payments", None, "POST")
        assert status == 202
    finally:
        await runner.cleanup()


def test_serve_without_keys_exits_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYDISPATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "PAYDISPATCH_API_KEYS" in result.stderr
    assert "Traceback" not in result.stderr
