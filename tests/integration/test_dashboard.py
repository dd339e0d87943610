"""The dashboard at ``/`` in a real headless Chromium, against three real replicas.

The browser is Debian's chromium (``/usr/bin/chromium``) driven by playwright; playwright
never downloads a browser here. Every wait is on a condition the page must reach (the
leader it shows, a token above the old one), with a bound, never a blind sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from app.settings import Settings
from app.stack.etcd import EtcdCluster
from app.stack.sandbox_process import SandboxProcess, start_sandbox_process, stop_sandbox_process
from app.web.app import create_app
from app.web.dashboard import CONTENT_SECURITY_POLICY, add_dashboard, load_page
from tests.cluster import TEST_API_KEY, Replicas, cluster_env, running_replicas

pytestmark = pytest.mark.chaos

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (we run as root in a container), and nothing that phones home: the test network
# is closed, and a browser waiting on a blocked update or sync endpoint only adds noise.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard.png"
SVG_NAMESPACE = "http://www.w3.org/2000/svg"

DECLINED_AMOUNT = 113
FAILOVER_BOUND_MS = 15_000

# Returns true once the page shows a leader other than ``old`` with a token above ``token``.
NEW_LEADER_SHOWN = """([old, token]) => {
  const node = document.querySelector('#leader-node').textContent.trim();
  const shown = Number(document.querySelector('#leader-token').textContent);
  return node !== '' && node !== old && node !== 'no leader' && shown > token;
}"""
# Page-side probes are written as functions: a bare expression would be run through eval,
# which the page's CSP (rightly) refuses.
SUCCEEDED_COUNT = """() => Number(document.querySelector(
  '#queue [data-status="succeeded"] dd').textContent.replace(/,/g, '')) || 0"""
SUCCEEDED_ABOVE = f"(n) => ({SUCCEEDED_COUNT})() > n"
CHART_SECONDS_AT_LEAST = "(n) => Number(document.querySelector('#chart').dataset.seconds) >= n"
RATE_ABOVE_ZERO = "() => Number(document.querySelector('#rate-now').textContent) > 0"


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium "
            "(.ci/run installs it)"
        )


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[BrowserContext]:
    """A headless Debian chromium with a fresh profile; closed (and reaped) on exit."""
    _require_chromium()
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            await context.close()


# The only things the page may ask for: itself and the four API reads it polls.
ALLOWED_PATHS = {"/", "/v1/cluster", "/v1/node", "/v1/payments"}


class PageWatch:
    """Everything a page did that it must not: script errors, CSP violations, requests to
    any origin but the replica's or to anything but the page and its API reads."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.unexpected: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        page.on("request", lambda req: self._request(req.url))

    def _console(self, msg: ConsoleMessage) -> None:
        if "Content Security Policy" in msg.text:
            self.errors.append(msg.text)

    def _request(self, url: str) -> None:
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin or parts.path not in ALLOWED_PATHS:
            self.unexpected.append(url)

    def assert_clean(self) -> None:
        """No script error, no CSP violation, no unexpected request so far."""
        assert not self.errors, self.errors
        assert not self.unexpected, f"unexpected requests: {self.unexpected}"


async def trickle_payments(urls: list[str], stop: asyncio.Event, per_worker_rate: float) -> int:
    """Post payments round-robin until ``stop`` is set (4 workers); errors are ignored (a
    killed replica refuses). Only here so the page has live numbers and a chart to show."""
    accepted = 0

    async def worker(worker_id: int, http: aiohttp.ClientSession) -> None:
        nonlocal accepted
        i = 0
        while not stop.is_set():
            key = f"dash-{worker_id}-{i}"
            amount = DECLINED_AMOUNT if i % 25 == 7 else 100 + i % 900
            body = {"amount": amount, "currency": "EUR", "reference": f"order-{worker_id}-{i}"}
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(
                    f"{urls[i % len(urls)]}/v1/payments",
                    json=body,
                    headers={"Idempotency-Key": key, "Authorization": f"Bearer {TEST_API_KEY}"},
                ) as resp:
                    accepted += resp.status in (200, 202)
            i += 1
            # Pacing that ends at once when the test is done.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / per_worker_rate)

    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(worker(n, http) for n in range(4)))
    return accepted


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    # A few provider 5xx with a budget of one attempt park payments in needs_reconciliation
    # (the provider never charged them, so the leader's sweep leaves them there), which
    # gives the page's problems table real rows to show.
    sandbox = await start_sandbox_process(
        tmp_path,
        error_rate=0.04,
        decline_amounts=(DECLINED_AMOUNT,),
        latency_ms_min=2,
        latency_ms_max=15,
        seed=3,
    )
    try:
        yield sandbox
    finally:
        await stop_sandbox_process(sandbox.process)


@pytest.fixture
def replicas(
    database_url: str, etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> Iterator[Replicas]:
    env = cluster_env(
        database_url,
        etcd.endpoints_csv,
        PAYDISPATCH_PROVIDER_URL=provider.base_url,
        PAYDISPATCH_MAX_ATTEMPTS="1",
    )
    with running_replicas(3, env, tmp_path / "replicas") as group:
        yield group


async def test_page_is_served_open_with_a_strict_csp_and_loads_nothing_external(
    settings: Settings,
) -> None:
    app = create_app(settings)  # with API keys configured: the page must still be open
    add_dashboard(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.port)
    await site.start()
    try:
        async with (
            aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.port}") as http,
            http.get("/") as page,
            http.get("/v1/payments") as api,
        ):
            html = await page.text()
            assert page.status == 200
            assert page.headers["Content-Type"] == "text/html; charset=utf-8"
            assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert CONTENT_SECURITY_POLICY == (
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src 'self' data:"
            )
            assert api.status == 401  # the data stays behind the key
    finally:
        await runner.cleanup()

    assert html.encode() == load_page()
    urls = set(re.findall(r"https?://[^\s\"'<>)]*", html, flags=re.IGNORECASE))
    assert urls <= {SVG_NAMESPACE}, urls
    # No external resource of any kind, not even a relative one: everything is inline.
    assert not re.search(r"<(iframe|object|embed|img|script\s[^>]*src)\b|@import|url\(", html)
    references = re.findall(r"\b(?:href|src)\s*=\s*[\"']?([^\"'\s>]*)", html)
    assert all(ref.startswith("data:") for ref in references), references
    assert TEST_API_KEY not in html


async def test_the_page_follows_a_leader_kill_live_in_chromium(
    replicas: Replicas, tmp_path: Path
) -> None:
    old = await asyncio.to_thread(replicas.wait_leader)
    victim = replicas.by_id(old["node_id"])
    viewer = next(r for r in replicas.all if r is not victim)
    node_ids = sorted(r.node_id for r in replicas.all)

    stop_load = asyncio.Event()
    load = asyncio.create_task(trickle_payments([r.url for r in replicas.all], stop_load, 20))
    try:
        async with chromium(tmp_path / "chromium-profile") as browser:
            # A wrong key in the fragment: the form comes back with the 401 explained, and
            # the key typed there is taken.
            page = await browser.new_page()
            watch = PageWatch(page, viewer.url)
            await page.goto(f"{viewer.url}/#key=not-a-key")
            await expect(page.locator("#login")).to_be_visible()
            await expect(page.locator("#login-message")).to_contain_text("401")
            await expect(page.locator("#board")).to_be_hidden()
            assert "not-a-key" not in page.url
            await page.fill("#key-input", TEST_API_KEY)
            await page.press("#key-input", "Enter")
            await expect(page.locator("#leader-node")).to_have_text(old["node_id"])
            watch.assert_clean()
            await page.close()

            # The documented way in: the key in the fragment, gone from the address bar.
            page = await browser.new_page()
            watch = PageWatch(page, viewer.url)
            await page.goto(f"{viewer.url}/#key={TEST_API_KEY}")
            await expect(page.locator("#leader-node")).to_have_text(old["node_id"])
            await expect(page.locator("#leader-token")).to_have_text(str(old["token"]))
            assert page.url == f"{viewer.url}/"
            stored = await page.evaluate("sessionStorage.getItem('paydispatch.apiKey')")
            assert stored == TEST_API_KEY
            await expect(page.locator("#observer")).to_have_text(viewer.node_id)
            for node_id in node_ids:
                await expect(page.locator("#replicas")).to_contain_text(node_id)
            await expect(page.locator("#replicas tbody tr")).to_have_count(3)
            for status in ("pending", "in_flight", "succeeded", "declined", "failed"):
                await expect(page.locator(f'#queue [data-status="{status}"] dd')).to_have_text(
                    re.compile(r"^[\d,]+$")
                )
            # Live: the numbers move and the chart draws a rate above zero.
            await page.wait_for_function(SUCCEEDED_ABOVE, arg=0, timeout=10_000)
            await page.wait_for_function(RATE_ABOVE_ZERO, timeout=10_000)
            await expect(page.locator("#chart path.line")).to_have_count(1)
            # A few seconds of history before the fault, so the screenshot shows the chart
            # before and after the takeover rather than a sliver.
            await page.wait_for_function(CHART_SECONDS_AT_LEAST, arg=6, timeout=10_000)
            await expect(page.locator("#banner")).to_be_hidden()

            await asyncio.to_thread(victim.kill)
            await page.wait_for_function(
                NEW_LEADER_SHOWN, arg=[old["node_id"], old["token"]], timeout=FAILOVER_BOUND_MS
            )
            survivors = [r for r in replicas.all if r is not victim]
            new = await asyncio.to_thread(
                replicas.wait_leader, survivors, above=old["token"], timeout=5
            )
            # What the page shows is what the replicas themselves report.
            await expect(page.locator("#leader-node")).to_have_text(new["node_id"])
            await expect(page.locator("#leader-token")).to_have_text(str(new["token"]))
            changes = page.locator("#changes li")
            await expect(changes.first).to_contain_text(new["node_id"])
            await expect(changes.first).to_contain_text(str(new["token"]))
            await expect(page.locator("#changes")).to_contain_text(old["node_id"])
            await expect(page.locator("#changes")).to_contain_text(str(old["token"]))
            await expect(page.locator("#replicas tbody tr")).to_have_count(2)
            await expect(page.locator("#chart line.marker")).to_have_count(1)

            # The new leader charges: succeeded grows past what the page showed at takeover.
            at_takeover = await page.evaluate(SUCCEEDED_COUNT)
            await page.wait_for_function(SUCCEEDED_ABOVE, arg=at_takeover, timeout=10_000)
            await expect(page.locator("#problems")).to_contain_text(
                "needs reconciliation", timeout=10_000
            )
            await expect(page.locator("#node-role")).to_have_text(
                "leader" if viewer.node_id == new["node_id"] else "follower"
            )

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            # The page's own replica goes away: the last data stays, a red banner says so.
            await asyncio.to_thread(viewer.kill)
            await expect(page.locator("#banner")).to_contain_text(
                "Replica unreachable", timeout=5_000
            )
            await expect(page.locator("#leader-node")).to_have_text(new["node_id"])
            watch.assert_clean()
    finally:
        stop_load.set()
        accepted = await load
    assert accepted > 0


def test_page_resource_ships_with_the_package() -> None:
    """The HTML is package data: ``load_page`` finds it through importlib.resources."""
    html = load_page().decode()
    for element_id in ("leader-node", "leader-token", "replicas", "queue", "changes"):
        assert f'id="{element_id}"' in html
    assert 'id="problems"' in html
    assert 'id="chart"' in html
    assert TEST_API_KEY not in html
