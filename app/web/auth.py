"""Bearer-token authentication for ``/v1/*``; health, metrics and the dashboard page stay
open (they reveal no payment data). Admin routes need a key from the admin list, and so do
the ``/_test/*`` hooks when they are switched on (they can freeze the process or dump its
insides), whatever else is configured."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from app.web.problems import problem

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin/"
TEST_HOOK_PREFIX = "/_test/"


def _matches(presented: str, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key, always: the time taken must not tell which key (or how
    # much of one) matched. The keys come encoded once, when the middleware is made.
    token = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def auth_middleware(api_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> Middleware:
    """Reject unauthenticated /v1/* requests with 401 (and non-admin /v1/admin/* with 403).

    With no keys at all (explicitly allowed by PAYDISPATCH_ALLOW_NO_AUTH) nothing is checked.
    """
    open_api = not (api_keys or admin_keys)
    api = tuple(key.encode() for key in api_keys)
    admin = tuple(key.encode() for key in admin_keys)
    challenge = {"WWW-Authenticate": 'Bearer realm="paydispatch"'}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(TEST_HOOK_PREFIX):
            # Even with PAYDISPATCH_ALLOW_NO_AUTH: no admin key configured, no hooks.
            token = bearer_token(request)
            if token is not None and _matches(token, admin):
                return await handler(request)
            known = token is not None and _matches(token, api)
            return problem(
                403 if known else 401,
                "Admin key required" if known else "Authentication required",
                "test hooks need a key from PAYDISPATCH_ADMIN_API_KEYS",
                headers=None if known else challenge,
            )
        if open_api or not path.startswith(PROTECTED_PREFIX):
            return await handler(request)
        token = bearer_token(request)
        if token is None:
            return problem(
                401,
                "Authentication required",
                "send Authorization: Bearer <key> (a key from PAYDISPATCH_API_KEYS)",
                headers=challenge,
            )
        is_admin = _matches(token, admin)
        if path.startswith(ADMIN_PREFIX):
            if not is_admin:
                known = _matches(token, api)
                return problem(
                    403 if known else 401,
                    "Admin key required" if known else "Invalid API key",
                    "admin actions need a key from PAYDISPATCH_ADMIN_API_KEYS",
                    headers=None if known else challenge,
                )
        elif not (is_admin or _matches(token, api)):
            return problem(
                401,
                "Invalid API key",
                "the bearer token is not a configured key",
                headers=challenge,
            )
        return await handler(request)

    return middleware
