"""The provider's requests, answers and routes: what its handlers see of HTTP.

Nothing here touches a socket: :mod:`app.sandbox.http` parses requests off the wire into a
:class:`Request`, finds their handler through a :class:`Router` and writes the handler's
:class:`Answer` (or, for a :class:`Dropped`, closes the connection without one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl


class BodyTooLarge(Exception):
    """The request body is over the configured limit (answered 413)."""


class UpgradeRefused(Exception):
    """The request asked for an ``Upgrade``; its body was not parsed (answered 400)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a handler answers: status, body and its type, extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """A handler's way to say "close the connection, answer nothing"."""


DROPPED = Dropped()
Reply = Answer | Dropped


@dataclass(slots=True)
class Request:
    """One parsed request: method, path (percent-decoded), query, headers (names in lower
    case) and, once the server hands it to a handler, its whole body."""

    method: str
    path: str
    query_string: bytes
    raw_headers: Sequence[tuple[bytes, bytes]]
    path_params: dict[str, str] = field(default_factory=dict)
    max_body: int = 0
    body: bytes = b""
    # The body was over ``max_body`` (declared or as it arrived): it was not kept.
    too_large: bool = False
    # The request asked for an Upgrade: its body was never parsed.
    upgrade_refused: bool = False
    _query: dict[str, str] | None = None

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), decoded as aiohttp did: UTF-8,
        undecodable bytes carried as lone surrogates so that validation can refuse them."""
        for key, value in self.raw_headers:
            if key == name:
                return value.decode("utf-8", "surrogateescape")
        return None

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters, the first value of each name (percent-decoded, ``+`` a space;
        undecodable bytes as lone surrogates, refused by validation)."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in parse_qsl(
                self.query_string.decode("latin-1"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="surrogateescape",
            ):
                query.setdefault(name, value)
            self._query = query
        return self._query

    def read(self) -> bytes:
        """The whole body; :class:`BodyTooLarge` past the limit, :class:`UpgradeRefused` for
        a request whose body was never parsed."""
        if self.upgrade_refused:
            raise UpgradeRefused
        if self.too_large:
            raise BodyTooLarge
        return self.body


Handler = Callable[[Request], Awaitable[Reply]]


class NotFound(Exception):
    """No route has this path (404)."""


class MethodNotAllowed(Exception):
    """A route has this path, not for this method (405, ``Allow`` lists the methods)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = tuple(allowed)


@dataclass(frozen=True, slots=True)
class _Route:
    segments: tuple[str, ...]  # "{name}" matches one non-empty segment
    handlers: dict[str, Handler]


class Router:
    """Method and path to handler. A GET route answers HEAD too, as aiohttp's did."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Route ``method`` on ``path`` (segments like ``{id}`` capture one segment)."""
        segments = tuple(path.strip("/").split("/"))
        route = next((r for r in self._routes if r.segments == segments), None)
        if route is None:
            route = _Route(segments, {})
            self._routes.append(route)
        route.handlers[method] = handler
        if method == "GET":
            route.handlers.setdefault("HEAD", handler)

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and captured segments; :class:`NotFound` or :class:`MethodNotAllowed`."""
        if not path.startswith("/"):
            raise NotFound
        parts = path[1:].split("/")
        for route in self._routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            handler = route.handlers.get(method)
            if handler is None:
                raise MethodNotAllowed(sorted(route.handlers))
            return handler, params
        raise NotFound


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for segment, part in zip(segments, parts, strict=True):
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params
