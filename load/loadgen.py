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
    gave_up: list[str] = field(default_factory=list)  # keys never acknowledged in time
    started: float = 0.0
    finished: float = 0.0

    def percentile(self, p: float) -> float:
        """Ingest latency percentile in ms (0 when nothing was measured)."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


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
) -> LoadResult:
    """Post ``count`` payments round-robin over ``urls`` (``rate`` per second if given).

    Each payment is retried with its own key on 5xx or connection errors until 2xx or until
    ``deadline_s`` passes; what never got a 2xx lands in ``gave_up``.
    """
    if not allow_remote:
        require_loopback(urls)
    prefix = key_prefix or f"load-{uuid.uuid4().hex[:8]}"
    result = LoadResult(started=time.monotonic())
    stop_at = result.started + deadline_s
    targets = itertools.cycle(urls)
    gate = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        key = f"{prefix}-{i}"
        body = json.dumps({"amount": amount(i), "currency": "EUR", "reference": key})
        async with gate:
            while time.monotonic() < stop_at:
                url = next(targets)
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
                            result.latencies_ms.append((time.monotonic() - sent) * 1000)
                            return
                        if resp.status < 500:
                            result.gave_up.append(key)  # a 4xx will not change on retry
                            return
                except (aiohttp.ClientError, TimeoutError):
                    result.statuses[0] += 1
                await asyncio.sleep(0.05)
            result.gave_up.append(key)

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        tasks = []
        for i in range(count):
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
