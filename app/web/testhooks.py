"""Test hooks (``PAYDISPATCH_TEST_HOOKS``): break a replica on purpose, or look inside it.

Undocumented on purpose (never in /openapi.json), so their answers are plain dicts rather
than response models from app/web/schemas.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

log = logging.getLogger(__name__)


async def block_loop(request: web.Request) -> web.Response:
    """POST /_test/block-loop?seconds=N — block the event loop on purpose (test hook)."""
    seconds = float(request.query.get("seconds", "3"))
    log.warning("test hook: blocking the event loop for %.1fs", seconds)
    time.sleep(seconds)  # noqa: ASYNC251  # blocking the loop is this hook's whole point
    return web.json_response({"blocked_s": seconds})


async def dump_tasks(request: web.Request) -> web.Response:
    """GET /_test/tasks — every task's name and current stack (test hook, for diagnosis)."""
    out = {}
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        out[f"{task.get_name()}#{id(task)}"] = [
            f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
            for f in frames
        ]
    return web.json_response(out)


def add_test_hooks(app: web.Application) -> None:
    """Register the /_test/* routes."""
    app.router.add_post("/_test/block-loop", block_loop)
    app.router.add_get("/_test/tasks", dump_tasks)
