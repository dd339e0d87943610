"""A well-behaved client population: posts payments over the replicas (or a load balancer),
retrying with the *same* Idempotency-Key until acknowledged. Bounded in count and time.

Loopback only by construction: every URL is checked before the first request is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from app.errors import ConfigurationError


@dataclass
class LoadResult:
    """What the clients saw."""

    acknowledged: dict[str, int] = field(default_factory=dict)  # key → payment id
    statuses: Counter[int] = field(default_factory=Counter)  # every answer, retries included
    latencies_ms: list[float] = field(default_factory=list)  # of acknowledged answers
    # (seconds since start when sent, ms) of each acknowledged answer: latency over time.
    timed_latencies: list[tuple[float, float]] = field(default_factory=list)
    # Seconds since start of every attempt that ended in a transport error or a 5xx.
    error_times: list[float] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)  # keys never acknowledged in time
    started: float = 0.0
    finished: float = 0.0

    @property
    def client_errors(self) -> int:
        """Attempts that ended in a transport error or a 5xx: what a client saw fail."""
        return sum(n for status, n in self.statuses.items() if status == 0 or status >= 500)

    def percentile(self, p: float) -> float:
        """Ingest latency percentile in ms (0 when nothing was measured)."""
        return percentile(self.latencies_ms, p)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (nearest rank; 0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# How long a client skips a replica that refused it (no load balancer in front): long
# enough not to hammer a dead one, short enough to use it again soon after a restart.
SKIP_REFUSING_S = 1.0


class Targets:
    """Round robin over ``urls`` that skips, for a short while, one that refused a request
    (connection error or 503) — what a client without a load balancer does."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self._cycle = itertools.cycle(self.urls)
        self._skip_until: dict[str, float] = {}

    def next(self) -> str:
        """The next URL not being skipped (any, when all are)."""
        now = time.monotonic()
        for _ in range(len(self.urls)):
            url = next(self._cycle)
            if self._skip_until.get(url, 0.0) <= now:
                return url
        return next(self._cycle)

    def refused(self, url: str) -> None:
        """``url`` failed a request: skip it for a while."""
        if len(self.urls) > 1:
            self._skip_until[url] = time.monotonic() + SKIP_REFUSING_S


def require_loopback(urls: Sequence[str]) -> None:
    """Refuse any target outside 127.0.0.0/8 or ::1 (load never leaves this machine)."""
    for url in urls:
        host = urlsplit(url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigurationError(f"load targets must be on loopback, got {url}")


def default_amount(i: int) -> int:
    """Amounts that vary but stay small."""
    return 100 + (i % 997)


async def post_payments(
    urls: Sequence[str],
    count: int,
    *,
    rate: float | None = None,
    concurrency: int = 32,
    deadline_s: float = 120.0,
    key_prefix: str | None = None,
    amount: Callable[[int], int] = default_amount,
    progress: Callable[[LoadResult], None] | None = None,
    api_key: str | None = None,
    allow_remote: bool = False,
    keep_going: Callable[[], bool] | None = None,
) -> LoadResult:
    """Post ``count`` payments round-robin over ``urls`` (``rate`` per second if given).

    With ``keep_going``, posting goes on at the same rate past ``count`` while it answers
    True (a scenario keeps load flowing until its last fault has been measured); the
    deadline bounds it either way. Each payment is retried with its own key on 5xx or
    connection errors until 2xx or until ``deadline_s`` passes; what never got a 2xx lands
    in ``gave_up``.
    """
    if not allow_remote:
        require_loopback(urls)
    prefix = key_prefix or f"load-{uuid.uuid4().hex[:8]}"
    result = LoadResult(started=time.monotonic())
    stop_at = result.started + deadline_s
    targets = Targets(urls)
    gate = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        key = f"{prefix}-{i}"
        body = json.dumps({"amount": amount(i), "currency": "EUR", "reference": key})
        async with gate:
            while time.monotonic() < stop_at:
                url = targets.next()
                sent = time.monotonic()
                try:
                    async with http.post(
                        f"{url}/v1/payments",
                        data=body,
                        headers=headers | {"Idempotency-Key": key},
                    ) as resp:
                        result.statuses[resp.status] += 1
                        if resp.status in (200, 202):
                            result.acknowledged[key] = (await resp.json())["id"]
                            latency = (time.monotonic() - sent) * 1000
                            result.latencies_ms.append(latency)
                            result.timed_latencies.append((sent - result.started, latency))
                            return
                        if resp.status < 500:
                            result.gave_up.append(key)  # a 4xx will not change on retry
                            return
                except (aiohttp.ClientError, TimeoutError):
                    result.statuses[0] += 1
                result.error_times.append(sent - result.started)
                targets.refused(url)
                await asyncio.sleep(0.05)
            result.gave_up.append(key)

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        tasks = []
        i = -1
        while True:
            i += 1
            if i >= count and not (keep_going is not None and keep_going()):
                break
            if rate:
                delay = result.started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.monotonic() > stop_at:
                break
            tasks.append(asyncio.create_task(one(http, i)))
            if progress and i % 100 == 0:
                progress(result)
        await asyncio.gather(*tasks)
    result.finished = time.monotonic()
    return result
