"""How many payments a leader keeps in flight: a slow start at the beginning of each term.

A new leader's first moments are when it knows least about the provider (a failover often
follows trouble) and when it has the most to do at once: everything that queued while no
one led. Claiming the full ``dispatch_concurrency`` (256) at once turned that backlog into
one burst: on the 2-core box, where replicas, provider and Postgres share the CPU, ingest
on every replica slowed to 5-14x its steady p99 for the half second of a pause's catch-up.
A term therefore starts at ``dispatch_initial_concurrency`` (16) and ramps up
exponentially to the full limit over ``dispatch_ramp_seconds`` (4: doubling every second),
the way TCP's slow start opens a new connection's window. Measured (``pause-leader`` at
200/s, three runs of three pauses each): the ingest p99 of a pause window came to 1.5-3.1x
steady, against 4.8-13.9x with no ramp; 32 ramping over 3 s gave 2.2-4.5x. The backlog
still drains faster than the soak's 250/s arrive: 16 in flight carried 313 payments/s here
(a payment holds its place until its outcome's batched record, written at most every
50 ms), and the limit doubles every second from there. A long drain that starts after the
ramp runs at the full limit.

Not adapted to round trips: a latency gradient (Netflix concurrency-limits' Gradient2) was
tried and halved the drain here, because most of a payment's time in flight is spent
waiting for its batched record, which the round trip of the call does not show.

Pure: the caller passes clock readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlowStart:
    """The in-flight limit of a term that started at monotonic time ``started``: from
    ``initial``, doubling at an even pace, to ``ceiling`` after ``ramp`` seconds."""

    initial: int
    ceiling: int
    ramp: float
    started: float

    def __post_init__(self) -> None:
        if self.ceiling < 1 or self.initial < 1:
            raise ValueError(
                f"in-flight limits must be at least 1 (initial {self.initial}, "
                f"ceiling {self.ceiling})"
            )
        if not math.isfinite(self.ramp) or self.ramp < 0:
            raise ValueError(f"the ramp must be a duration in seconds (got {self.ramp})")

    @property
    def flat(self) -> bool:
        """True when there is no ramp: the ceiling from the start."""
        return self.initial >= self.ceiling or self.ramp == 0

    def limit(self, now: float) -> int:
        """Payments that may be in flight at monotonic time ``now``."""
        if self.flat:
            return self.ceiling
        # A clock that reads earlier than the start (or NaN) gives the initial limit.
        elapsed = now - self.started
        if not elapsed > 0:
            return self.initial
        if elapsed >= self.ramp:
            return self.ceiling
        grown = self.initial * (self.ceiling / self.initial) ** (elapsed / self.ramp)
        return min(self.ceiling, max(self.initial, int(grown)))

    def reaches(self, limit: int) -> float:
        """The monotonic time from which ``limit(now) >= limit`` (``inf``: never)."""
        if limit > self.ceiling:
            return math.inf
        if limit <= self.initial or self.flat:
            return self.started
        share = math.log(limit / self.initial) / math.log(self.ceiling / self.initial)
        return self.started + self.ramp * share
