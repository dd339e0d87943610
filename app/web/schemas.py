"""Response shapes of the replica's API and how they are written out."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def json_response(payload: Any, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON response (the stdlib encoder; payloads are plain dicts)."""
    return web.Response(
        text=json.dumps(payload), status=status, content_type="application/json", **kwargs
    )
