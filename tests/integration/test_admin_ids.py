"""Admin routes parse the payment id with the same rules as the public ones: an id that is no
positive 63-bit integer — however long, whatever its characters — names no payment and is
answered 404 problem+json, never a 500 from a number Python or Postgres cannot hold."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from app.settings import load_settings
from app.stack.ports import free_port
from app.web.admin import add_admin_routes
from app.web.app import create_app

ADMIN_KEY = "admin-ids-key"
ADMIN_ROUTES = ("/v1/admin/payments/{id}/retry", "/v1/admin/payments/{id}/reconcile")
NO_SUCH_IDS = {
    "huge": "9" * 5000,  # int() refuses more than 4,300 digits
    "one past bigint": str(2**63),
    "zero": "0",
    "negative": "-1",
    "decimal": "1.5",
    "letters": "abc",
    "hex": "0x1f",
    "non-ASCII digits": "١٢٣",
    "padded": "%201",
}


@pytest.fixture
async def admin_url(database_url: str) -> AsyncIterator[str]:
    """The API with the admin routes on a real port over a real database. No election: the
    payment routes of the admin API need only the database, and an id is refused before it."""
    settings = load_settings(
        database_url=database_url, port=free_port(), api_keys="plain", admin_api_keys=ADMIN_KEY
    )
    app = create_app(settings)
    add_admin_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("route", ADMIN_ROUTES)
@pytest.mark.parametrize("raw_id", NO_SUCH_IDS.values(), ids=NO_SUCH_IDS.keys())
async def test_an_id_that_names_no_payment_is_a_404_problem_on_every_admin_route(
    admin_url: str, route: str, raw_id: str
) -> None:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http,
        http.post(admin_url + route.format(id=raw_id)) as resp,
    ):
        assert resp.status == 404, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        problem = await resp.json(content_type=None)
    assert problem["title"] == "Payment not found"
    assert {"type", "title", "detail"} <= problem.keys()
