"""Logging: structlog over the stdlib, so our lines and every library's share one format.

JSON lines by default (one object per line: timestamp, level, logger, event, node_id and
whatever context is bound: token for leader work, payment_id and idempotency_key for payment
work); a human-readable renderer when stderr is a terminal. A last processor redacts
secrets: configured API keys, bearer tokens and anything shaped like a card number never
reach the output, whatever a message or a library put in it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# 13-19 digits, optionally grouped by spaces or dashes: a primary account number's shape.
_PAN = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


class Redactor:
    """A structlog processor that masks secrets in every string value of an event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a key that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with secrets, bearer tokens and card-number-like digit runs masked."""
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        text = _BEARER.sub(r"\1[REDACTED]", text)
        return _PAN.sub("[REDACTED-PAN]", text)

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if isinstance(value, str):
                event[key] = self.redact(value)
        return event


def configure_logging(
    level: str,
    *,
    node_id: str | None = None,
    secrets: Iterable[str] = (),
    json_output: bool | None = None,
) -> None:
    """Route stdlib logging through structlog. Call once, at process start (the CLI)."""
    json_output = (not sys.stderr.isatty()) if json_output is None else json_output

    def add_node(
        logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if node_id is not None:
            event.setdefault("node_id", node_id)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_node,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            Redactor(secrets),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic narrates every plugin it loads at INFO; operators need only its warnings.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
