"""A small blocking JSON client of a replica's HTTP API: the operator CLI, the local stack's
probes and the load scenarios all talk to replicas through it, like any other client.

It never follows a redirect: urllib would re-send the Authorization header to wherever the
``Location`` points, so one misconfigured proxy (or a hostile one) would collect the keys.
A 3xx comes back as its status, for the caller to refuse."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from typing import Any


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every 3xx into an HTTPError carrying that status instead of following it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def http_json(
    url: str, timeout: float = 1.0, *, method: str = "GET", api_key: str | None = None
) -> tuple[int, Any]:
    """``method`` ``url`` → (status, decoded JSON or None); (0, None) when nothing answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"null")
        return exc.code, None
    except (OSError, ValueError):
        return 0, None
