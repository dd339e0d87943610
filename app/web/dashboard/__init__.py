"""The live dashboard page served at ``/`` on every replica.

The page is static: one self-contained HTML file (inline CSS and JS) that polls this
replica's own ``/v1`` API with the operator's key. It therefore carries no data and is
served without authentication, like ``/livez``; everything it shows comes through the
authenticated API. The Content-Security-Policy pins every load to this origin, so even a
payment reference crafted as markup could never pull anything in from elsewhere.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PAGE_RESOURCE = "dashboard.html"

# connect-src is left to default-src ('self'): the page may only talk to this replica.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:"
)

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # The page is tiny and changes with the release; always revalidate.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # The key lives in the tab, not in a cookie, but a framing page could still trick an
    # operator into clicks; nothing needs to embed this page.
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def load_page() -> bytes:
    """The dashboard HTML, read from the installed package (works editable or as a wheel)."""
    return resources.files(__name__).joinpath(PAGE_RESOURCE).read_bytes()


def add_dashboard(app: web.Application) -> None:
    """Register ``GET /`` (and ``HEAD /``) serving the dashboard page.

    The file is read once here, so a missing resource fails at start-up, not on the first
    visit, and each request only copies bytes.
    """
    body = load_page()

    async def dashboard(request: web.Request) -> web.Response:
        """GET / — the dashboard page; it holds no data, so it needs no key."""
        return web.Response(
            body=body,
            content_type="text/html",
            charset="utf-8",
            headers=PAGE_HEADERS,
        )

    app.router.add_get("/", dashboard, name="dashboard")
