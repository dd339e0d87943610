"""One parser for path and query parameters (ids, limits, cursors), used by every route.

An id that is not a positive 63-bit integer names no payment: the answer is 404, never a 500
from a number the database cannot hold.
"""

from __future__ import annotations

from typing import Any

BIGINT_MAX = 2**63 - 1
# Page sizes of GET /v1/payments (the handler, the response model and the document share them).
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500


# Longer than any 63-bit integer; checked before int() so a huge string is never converted
# (Python refuses to parse more than 4,300 digits, and a 500 must never come from input).
MAX_DIGITS = 19


def parse_id(raw: str) -> int | None:
    """A path id as a positive 63-bit integer, or None (the caller answers 404)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_DIGITS:
        return None
    value = int(raw)
    return value if 0 < value <= BIGINT_MAX else None


def int_param(
    params: Any, name: str, default: int, low: int, high: int, errors: list[dict[str, str]]
) -> int:
    """Query parameter ``name`` as an integer in [low, high], ``default`` when absent; a bad
    value appends a field error to ``errors`` (the caller answers 422 with all of them)."""
    raw = params.get(name)
    if raw is None:
        return default
    digits = raw.lstrip("0") or "0"
    if raw.isascii() and raw.isdigit() and len(digits) <= MAX_DIGITS and low <= int(digits) <= high:
        return int(raw)
    errors.append({"field": name, "message": f"must be an integer from {low} to {high}"})
    return default
