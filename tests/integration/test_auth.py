"""Bearer-token auth on /v1/*: open health endpoints, 401/403 problems, refusing to start
without keys unless explicitly told to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

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


# --- test hooks answer only an admin key ----------------------------------------------------


@pytest.fixture
async def hooked(database_url: str) -> AsyncIterator[str]:
    """The API with the /_test/* hooks switched on, as the test clusters run it."""
    from app.web.testhooks import add_test_hooks

    settings = load_settings(
        database_url=database_url,
        port=free_port(),
        api_keys="alpha",
        admin_api_keys="root",
        test_hooks=True,
    )
    app = create_app(settings)
    add_test_hooks(app)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("Bearer nope", 401), ("Bearer alpha", 403), ("Bearer root", 200)],
)
async def test_test_hooks_answer_only_an_admin_key_even_when_switched_on(
    hooked: str, token: str | None, status: int
) -> None:
    got, headers, body = await call(hooked, "/_test/tasks", token)
    assert got == status
    if status != 200:
        assert headers["Content-Type"].startswith("application/problem+json")
        assert "tasks" not in json.dumps(body)  # nothing from inside the process


async def test_test_hooks_refuse_everyone_when_no_admin_key_is_configured(
    database_url: str,
) -> None:
    from app.web.testhooks import add_test_hooks

    settings = load_settings(
        database_url=database_url, port=free_port(), allow_no_auth=True, test_hooks=True
    )
    app = create_app(settings)
    add_test_hooks(app)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        url = f"http://127.0.0.1:{settings.port}"
        assert (await call(url, "/_test/tasks", None))[0] == 401
        assert (await call(url, "/_test/block-loop?seconds=5", "Bearer x", "POST"))[0] == 401
    finally:
        await runner.cleanup()


# --- unauthenticated answers reveal nothing of the infrastructure ---------------------------

# Where the (unreachable) database is said to live: none of it may appear in an answer.
SECRET_HOST_URL = "postgresql://postgres:hunter2@127.0.0.1:1/secret_db"
SECRET_SOCKET_URL = "postgresql://postgres@/secret_db?host=/srv/secret-socket-dir"
LEAKS = ("127.0.0.1", "hunter2", "secret", "Errno", "Connect", "/srv", "5432", ":1", "asyncpg")


@pytest.mark.parametrize("database", [SECRET_HOST_URL, SECRET_SOCKET_URL], ids=["tcp", "socket"])
async def test_unauthenticated_answers_never_reveal_hosts_ports_paths_or_driver_messages(
    database: str,
) -> None:
    settings = load_settings(
        database_url=database,
        port=free_port(),
        allow_no_auth=True,  # so /v1/* answers without a key too
        db_timeout=0.5,
        readyz_timeout=0.5,
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    url = f"http://127.0.0.1:{settings.port}"
    answers: dict[str, tuple[int, str]] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for path, method in (
                ("/readyz", "GET"),
                ("/livez", "GET"),
                ("/v1/payments", "POST"),
                ("/v1/payments/1", "GET"),
                ("/metrics", "GET"),
                ("/nowhere", "GET"),
            ):
                async with http.request(
                    method, url + path, json=BODY, headers={"Idempotency-Key": "leak-1"}
                ) as resp:
                    answers[path] = (resp.status, await resp.text())
    finally:
        await runner.cleanup()
    status, text = answers["/readyz"]
    assert status == 503
    body = json.loads(text)
    assert set(body) == {"status", "database"}  # the documented shape (schemas.NotReady)
    assert body["status"] == "not_ready"
    assert answers["/v1/payments"][0] == 503
    for path, (_, text) in answers.items():
        words = metrics_words(text) if path == "/metrics" else text
        leaked = [word for word in LEAKS if word in words]
        assert not leaked, f"{path} revealed {leaked}: {text}"


def metrics_words(text: str) -> str:
    """The words of a Prometheus exposition, without its sample values.

    A value or a timestamp is a number the process measured (a latency of 0.0054321 s, a
    creation time); it cannot carry a host or a driver message, but its digits can happen to
    spell a port. Names, help texts and label values are where a leak would be.
    """
    words: list[str] = []
    for family in text_string_to_metric_families(text):
        words += [family.name, family.documentation]
        for sample in family.samples:
            words.append(sample.name)
            words += [f"{key}={value}" for key, value in sample.labels.items()]
    return "\n".join(words)
